"""Sweeps: many SAEs from one pass of the model (SAE-Lens' MultiSAETrainingRunner) or one file of activations."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from sae_lens import SAE
from sae_lens.constants import SAE_WEIGHTS_FILENAME, TRAINER_STATE_FILENAME
from safetensors.torch import load_file

from softsae_plugin.cli import main
from softsae_plugin.training.summary import SUMMARY_FILENAME, SWEEP_PLOT, SWEEP_TABLE

SAE_LENS = str(Path(sys.executable).with_name("sae-lens"))
SHARED = {"d_sae": 128, "training_tokens": 40 * 64, "train_batch_size_tokens": 64, "n_batches_for_norm_estimate": 3,
          "lr": 0.002, "lr_warm_up_steps": 4, "lr_decay_steps": 8, "dead_feature_window": 10,
          "feature_sampling_window": 10, "seed": 7}  # fmt: skip
# Alike normalisation for both: a sweep draws the norm estimate's batches once, before training, for every SAE.
SAES = {
    "soft": {"architecture": "softsae", "k": 4, "lr": 0.003},
    "top": {"architecture": "topk", "k": 4, "normalize_activations": "expected_average_only_in"},
}


def activations(n: int = 2048, d: int = 24, seed: int = 0) -> np.ndarray:
    gen = torch.Generator().manual_seed(seed)
    directions = torch.nn.functional.normalize(torch.randn(96, d, generator=gen), dim=-1)
    mask = torch.rand(n, 96, generator=gen).argsort(-1) < torch.randint(1, 9, (n, 1), generator=gen)
    return ((mask * torch.rand(n, 96, generator=gen)) @ directions).numpy()


def test_a_sweep_gives_each_sae_the_weights_of_its_single_run(tmp_path):
    """One pass over the same activations trains SoftSAE and TopK, each with its own learning rate, to exactly the
    weights their single runs reach; each SAE gets its own folder and summary, the sweep a table and a plot."""
    np.save(tmp_path / "acts.npy", activations())
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(yaml.safe_dump({**SHARED, "output_path": str(tmp_path / "sweep"), "saes": SAES}))
    main(["train", "--config", str(sweep), "--activations", str(tmp_path / "acts.npy")])
    for name, options in SAES.items():
        own = {**SHARED, **options}
        args = [arg for key, value in own.items() for arg in (f"--{key}", str(value))]
        main(["train", *args, "--activations", str(tmp_path / "acts.npy"), "--output_path", str(tmp_path / name)])
        single, swept = (load_file(tmp_path / folder / SAE_WEIGHTS_FILENAME) for folder in (name, f"sweep/{name}"))
        assert single.keys() == swept.keys()
        for key in single:
            assert torch.equal(single[key], swept[key]), (name, key)
        summary = json.loads((tmp_path / "sweep" / name / SUMMARY_FILENAME).read_text())
        assert summary["architecture"] == options["architecture"] and np.isfinite(summary["fve"])
        assert summary == json.loads((tmp_path / name / SUMMARY_FILENAME).read_text())
    assert "| soft | softsae | 4 |" in (tmp_path / "sweep" / f"{SWEEP_TABLE}.md").read_text()
    assert (tmp_path / "sweep" / SWEEP_PLOT).stat().st_size > 1000


@pytest.mark.slow
def test_a_language_model_sweep_from_one_pass_checkpoints_and_resumes(tmp_path):
    """The real runner on the offline SmolLM2-135M: two SAEs from one forward pass, each with its learning rate,
    checkpointed whole (one folder per SAE) and resumed from the checkpoint with the same command."""
    config = {
        "model_name": "smollm2-135m-instruct-q4_1", "hook_name": "blocks.1.hook_resid_post",
        "dataset_path": "local:english-wikipedia", "context_size": 64, "exclude_special_tokens": True, "d_in": 576,
        "d_sae": 1152, "training_tokens": 40 * 512, "train_batch_size_tokens": 512, "store_batch_size_prompts": 8,
        "n_batches_in_buffer": 16, "n_batches_for_norm_estimate": 2, "lr": 0.0005, "seed": 42, "device": "cpu",
        "n_checkpoints": 1, "checkpoint_path": str(tmp_path / "ckpt"), "output_path": str(tmp_path / "out"),
        "saes": {"softsae-k8": {"architecture": "softsae", "k": 8, "k_max": 24, "lr": 0.001},
                 "topk-k8": {"architecture": "topk", "k": 8}},
    }  # fmt: skip
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(config))
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    run = subprocess.run([SAE_LENS, "train", "--config", str(tmp_path / "sweep.yaml")], capture_output=True,
                         text=True, timeout=900, env=env)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    for noise in ("fewer samples", "will override", "overrides cfg", "copy construct from a tensor"):
        assert noise not in run.stderr, noise
    (checkpoint,) = [p for p in (tmp_path / "ckpt").glob("*/*") if p.is_dir()]
    runner_cfg = json.loads((tmp_path / "out" / "runner_cfg.json").read_text())
    assert runner_cfg["output_path"] == str(tmp_path / "out") and runner_cfg["world_size"] == 1  # not the staging path
    for name, lr in (("softsae-k8", 0.001), ("topk-k8", 0.0005)):
        assert SAE.load_from_disk(tmp_path / "out" / name).cfg.metadata.hook_name == "blocks.1.hook_resid_post"
        summary = json.loads((tmp_path / "out" / name / SUMMARY_FILENAME).read_text())
        assert summary["fve"] > 0 and summary["eval_data"].startswith("held-out text")
        state = torch.load(checkpoint / name / TRAINER_STATE_FILENAME, weights_only=True)
        assert state["optimizer"]["param_groups"][0]["initial_lr"] == pytest.approx(lr), name
    assert json.loads((tmp_path / "out" / "softsae-k8" / SUMMARY_FILENAME).read_text())["train_mean_l0"] == (
        pytest.approx(8, rel=0.02)
    )
    resumed = subprocess.run(
        [SAE_LENS, "train", "--config", str(tmp_path / "sweep.yaml"), "--resume", str(checkpoint), "--output_path",
         str(tmp_path / "resumed"), "--checkpoint_path", str(tmp_path / "ckpt2")],
        capture_output=True, text=True, timeout=900, env=env,
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert (tmp_path / "resumed" / "softsae-k8" / SUMMARY_FILENAME).exists()
    # The store state saved with the checkpoint (text position, shuffle buffer, RNG) continues the same batches: the
    # resumed sweep ends with the uninterrupted one's weights, with no replay.
    assert (checkpoint / "softsae_store_state" / "rank0.pt").is_file()
    for name in ("softsae-k8", "topk-k8"):
        full, again = (load_file(tmp_path / run / name / SAE_WEIGHTS_FILENAME) for run in ("out", "resumed"))
        assert all(torch.allclose(full[key], again[key], rtol=1e-6, atol=0) for key in full), name


def test_a_diverging_sae_stops_alone_and_a_resume_leaves_it_out(tmp_path):
    """One SAE of a sweep given a learning rate that blows its loss up stops at the first non-finite loss; the other
    trains on to the weights of its single run and is saved, the table names the step and the cause, checkpoints
    hold only the healthy SAE, and a resume from one carries the record forward without that SAE."""
    np.save(tmp_path / "acts.npy", activations())
    saes = {"soft": SAES["soft"], "blowup": {"architecture": "topk", "k": 4, "lr": 1e30}}
    config = {**SHARED, "output_path": str(tmp_path / "sweep"), "checkpoint_path": str(tmp_path / "ckpt"),
              "n_checkpoints": 1, "saes": saes}  # fmt: skip
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(config))
    main(["train", "--config", str(tmp_path / "sweep.yaml"), "--activations", str(tmp_path / "acts.npy")])
    args = [arg for key, value in {**SHARED, **SAES["soft"]}.items() for arg in (f"--{key}", str(value))]
    main(["train", *args, "--activations", str(tmp_path / "acts.npy"), "--output_path", str(tmp_path / "single")])
    single, swept = (load_file(tmp_path / folder / SAE_WEIGHTS_FILENAME) for folder in ("single", "sweep/soft"))
    assert all(torch.equal(single[key], swept[key]) for key in single)
    assert not (tmp_path / "sweep" / "blowup").exists()
    table = (tmp_path / "sweep" / f"{SWEEP_TABLE}.md").read_text()
    (row,) = [line for line in table.splitlines() if line.startswith("| blowup |")]
    status = r"diverged at step [12]: the loss is (nan|inf) \(not finite\); not saved"
    assert re.fullmatch(rf"\| blowup \| topk \| 4 \|(  \|){{4}} {status} \|", row), row
    assert "| soft | softsae | 4 |" in table and "trained" in table
    (checkpoint,) = [p for p in (tmp_path / "ckpt").glob("*/*") if p.is_dir()]
    assert (checkpoint / "soft").is_dir() and not (checkpoint / "blowup").exists()
    guard = json.loads((checkpoint / "softsae_guard_state.json").read_text())
    assert set(guard["diverged"]) == {"blowup"} and guard["diverged"]["blowup"]["step"] <= 2
    main(["train", "--config", str(tmp_path / "sweep.yaml"), "--activations", str(tmp_path / "acts.npy"),
          "--resume", str(checkpoint), "--output_path", str(tmp_path / "resumed"), "--checkpoint_path",
          str(tmp_path / "ckpt2")])  # fmt: skip
    resumed = load_file(tmp_path / "resumed" / "soft" / SAE_WEIGHTS_FILENAME)
    assert all(torch.equal(single[key], resumed[key]) for key in single)
    assert "| blowup |" in (tmp_path / "resumed" / f"{SWEEP_TABLE}.md").read_text()
