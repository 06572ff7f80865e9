"""Reliability: clear errors for bad configs and inputs, finite data and weights, whole checkpoints, exact resumes."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import Dataset
from sae_lens import SAE
from sae_lens.config import LanguageModelSAERunnerConfig, LoggingConfig, SAETrainerConfig
from sae_lens.constants import SAE_CFG_FILENAME, SAE_WEIGHTS_FILENAME, TRAINER_STATE_FILENAME
from sae_lens.saes.sae import TrainingSAE
from sae_lens.saes.standard_sae import StandardTrainingSAEConfig
from sae_lens.saes.topk_sae import TopKTrainingSAEConfig
from sae_lens.training._interruption import InterruptedException
from sae_lens.training.sae_trainer import SAETrainer
from safetensors.torch import load_file, save_file
from transformer_lens import HookedTransformer, HookedTransformerConfig

from softsae_plugin import SoftSAE, SoftSAEConfig, SoftTrainingSAE, SoftTrainingSAEConfig, train_on_activations
from softsae_plugin.cli import main
from softsae_plugin.training import command
from softsae_plugin.training.config import load_yaml_config
from softsae_plugin.training.guards import GUARD_STATE_FILENAME, atomic_folder, check_checkpoint, guard_trainer
from softsae_plugin.training.language_model import _GuardedRunner
from softsae_plugin.training.store_state import STORE_STATE_DIRNAME
from softsae_plugin.training.summary import SUMMARY_FILENAME

REPO = Path(__file__).resolve().parents[1]
SAE_LENS = str(Path(sys.executable).with_name("sae-lens"))
D_IN, D_SAE = 16, 64


def activations(n: int = 2048, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    directions = torch.nn.functional.normalize(torch.randn(96, D_IN, generator=gen), dim=-1)
    return (torch.rand(n, 96, generator=gen) * (torch.rand(n, 96, generator=gen) < 0.06)) @ directions + 0.1


def soft_cfg(**overrides) -> SoftTrainingSAEConfig:
    return SoftTrainingSAEConfig(**{"d_in": D_IN, "d_sae": D_SAE, "k": 4, **overrides})


ARCHITECTURES = {
    "softsae": soft_cfg,
    "topk": lambda: TopKTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=4),
    "standard": lambda: StandardTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE),
}
QUICK = dict(batch_size=64, lr=2e-3, progress=False, n_batches_for_norm_estimate=2)


# 1. Configs


@pytest.mark.parametrize(
    ("cls", "overrides", "message"),
    [
        (SoftTrainingSAEConfig, dict(k="8"), "k='8' has type str; expected float"),
        (SoftTrainingSAEConfig, dict(hard_topk_steps=1.5), "hard_topk_steps=1.5 has type float; expected int or None"),
        (SoftTrainingSAEConfig, dict(hard_topk_steps=True), "hard_topk_steps=True has type bool; expected int"),
        (SoftTrainingSAEConfig, dict(k_max=8.0), "k_max=8.0 has type float; expected int or None"),
        (SoftTrainingSAEConfig, dict(tau="0.01"), "tau='0.01' has type str; expected float"),
        (
            SoftTrainingSAEConfig,
            dict(detach_soft_topk_scores=1),
            "detach_soft_topk_scores=1 has type int; expected bool",
        ),
        (SoftTrainingSAEConfig, dict(d_sae="64"), "d_sae='64' has type str; expected int"),
        (SoftTrainingSAEConfig, dict(k=math.inf), "k=inf is invalid; expected a finite number"),
        (SoftTrainingSAEConfig, dict(tau=math.nan), "tau=nan is invalid; expected a finite number"),
        (SoftTrainingSAEConfig, dict(sparsity_coefficient=-math.inf), "sparsity_coefficient=-inf is invalid"),
        (SoftTrainingSAEConfig, dict(total_training_steps=10, hard_topk_steps=20), "hard_topk_steps=20 is longer"),
        (SoftSAEConfig, dict(k="8"), "k='8' has type str; expected float"),
        (SoftSAEConfig, dict(k=4, k_max=100), "k_max <= d_sae"),
    ],
)
def test_config_rejects_bad_values_naming_field_value_and_expectation(cls, overrides, message):
    with pytest.raises((TypeError, ValueError), match=message.replace("(", r"\(").replace("+", r"\+")):
        cls(**{"d_in": D_IN, "d_sae": D_SAE, "k": 4, **overrides})


def test_config_accepts_numpy_numbers():
    cfg = SoftTrainingSAEConfig(d_in=np.int64(D_IN), d_sae=np.int32(D_SAE), k=np.float32(4.0), tau=np.float64(0.01))
    assert cfg.k_max == 8


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('k: "8"', "k='8': Input should be a valid number"),
        ("hard_topk_steps: 1.5", "hard_topk_steps=1.5: Input should be a valid integer"),
        ("hard_topk_steps: true", "hard_topk_steps=True: Input should be a valid integer"),
        ("d_sae: 2304.0", "d_sae=2304.0: Input should be a valid integer"),
        (
            "detach_soft_topk_scores: yes please",
            "detach_soft_topk_scores='yes please': Input should be a valid boolean",
        ),
        ("tau: .nan", "tau=nan: Input should be a finite number"),
        ("lr: .inf", "lr=inf: Input should be a finite number"),
        ("training_tokens: 1e6", "training_tokens=1000000.0: Input should be a valid integer"),
        ("sparsity_betta: 3.0", "unknown key 'sparsity_betta'.*did you mean 'sparsity_beta'"),
    ],
)
def test_yaml_rejects_wrong_types(tmp_path, line, message):
    path = tmp_path / "bad.yaml"
    path.write_text(f"architecture: softsae\n{line}\n")
    with pytest.raises(ValueError, match=message):
        load_yaml_config(path)


def test_yaml_reads_exponent_numbers_as_numbers(tmp_path):
    """PyYAML alone reads 1e-4 as the string '1e-4', which strict checking would then reject."""
    path = tmp_path / "ok.yaml"
    path.write_text("architecture: softsae\nlr: 1e-4\ntau: 5E-3\nskip_nonfinite_rows: true\n")
    assert load_yaml_config(path) == {"architecture": "softsae", "lr": 1e-4, "tau": 5e-3, "skip_nonfinite_rows": True}


def test_command_line_overrides_a_null_in_the_config(tmp_path, monkeypatch):
    """quickstart.yaml sets checkpoint_path: null; --checkpoint_path must still win, or no checkpoint is written."""
    runs = []
    monkeypatch.setattr(command, "run_llm_training", lambda cfg, **kwargs: runs.append(cfg))
    main(["train", "--config", str(REPO / "configs" / "quickstart.yaml"), "--checkpoint_path", str(tmp_path)])
    assert runs[0].checkpoint_path.startswith(str(tmp_path))


def test_hard_topk_steps_longer_than_the_run_stops_before_any_training(tmp_path, capsys):
    config = tmp_path / "long_hard_phase.yaml"
    config.write_text((REPO / "configs" / "quickstart.yaml").read_text() + "hard_topk_steps: 1000\n")
    # 409600 / 1024 = 400 steps; the model is never loaded.
    with pytest.raises(SystemExit):
        main(["train", "--config", str(config), "--output_path", str(tmp_path / "out")])
    assert re.search(
        r"hard_topk_steps=1000 is longer than the run \(total_training_steps=400\)", capsys.readouterr().err
    )
    with pytest.raises(ValueError, match=r"hard_topk_steps=50 is longer than the run \(total_training_steps=20\)"):
        train_on_activations(activations(256), soft_cfg(hard_topk_steps=50), training_steps=20, **QUICK)


# 2. Non-finite activations and weights


def stream_with_bad_batch(bad_batch: int, n_batches: int = 40) -> list[torch.Tensor]:
    """Clean batches of 64 rows, except batch `bad_batch`: one NaN, one inf in row 3 and one -inf in row 9."""
    stream = list(activations(64 * n_batches, seed=1).split(64))
    stream[bad_batch] = stream[bad_batch].clone()
    stream[bad_batch][3, 0], stream[bad_batch][3, 5], stream[bad_batch][9, 2] = math.nan, math.inf, -math.inf
    return stream


@pytest.mark.parametrize("architecture", sorted(ARCHITECTURES))
def test_nonfinite_batch_stops_training_naming_the_step_and_the_count(architecture):
    sae_cfg = ARCHITECTURES[architecture]()
    norm_batches = 2 if sae_cfg.normalize_activations == "expected_average_only_in" else 0
    with pytest.raises(ValueError, match=rf"training step {7 - norm_batches}: 3 of {64 * D_IN} values \(in 2 of 64"):
        train_on_activations(stream_with_bad_batch(7), sae_cfg, training_steps=20, **QUICK)


@pytest.mark.parametrize("architecture", sorted(ARCHITECTURES))
def test_skip_nonfinite_rows_drops_and_counts_them(tmp_path, architecture, caplog):
    sae = train_on_activations(
        stream_with_bad_batch(7),
        ARCHITECTURES[architecture](),
        training_steps=20,
        skip_nonfinite_rows=True,
        output_path=tmp_path,
        eval_activations=activations(512, seed=2),
        **QUICK,
    )
    assert all(bool(torch.isfinite(t).all()) for t in sae.state_dict().values() if t.is_floating_point())
    assert json.loads((tmp_path / SUMMARY_FILENAME).read_text())["nonfinite_rows_skipped"] == 2
    assert "skipped 2 rows with NaN or inf activations" in caplog.text


def tiny_language_model_runner(tmp_path: Path, skip_nonfinite_rows: bool) -> _GuardedRunner:
    """SAE-Lens' runner on a random one-layer transformer whose hooked activations hold one NaN per store batch."""
    torch.manual_seed(0)
    model = HookedTransformer(
        HookedTransformerConfig(n_layers=1, d_model=D_IN, n_ctx=16, d_head=4, d_vocab=50, act_fn="relu")
    )

    def poison(act: torch.Tensor, hook: object) -> torch.Tensor:
        act[0, 3, 5] = math.nan
        return act

    model.add_perma_hook("blocks.0.hook_resid_post", poison)
    dataset = Dataset.from_dict({"input_ids": torch.randint(0, 50, (256, 16)).tolist()})
    dataset.set_format(type="torch", columns=["input_ids"])
    cfg = LanguageModelSAERunnerConfig(
        sae=TopKTrainingSAEConfig(d_in=D_IN, d_sae=32, k=4),
        model_name="random-one-layer",
        hook_name="blocks.0.hook_resid_post",
        dataset_path="unused",
        is_dataset_tokenized=True,
        prepend_bos=False,
        context_size=16,
        training_tokens=64 * 20,
        train_batch_size_tokens=64,
        store_batch_size_prompts=4,
        n_batches_in_buffer=8,
        checkpoint_path=None,
        output_path=str(tmp_path / "out"),
        logger=LoggingConfig(log_to_wandb=False),
    )
    return _GuardedRunner(
        cfg, skip_nonfinite_rows=skip_nonfinite_rows, guard_state={}, override_model=model, override_dataset=dataset
    )


@pytest.fixture
def keep_signal_handlers():
    """SAE-Lens' runner installs its own SIGINT and SIGTERM handlers; give pytest its own back afterwards."""
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    yield
    for sig, handler in handlers.items():
        signal.signal(sig, handler)


@pytest.mark.usefixtures("keep_signal_handlers")
def test_language_model_runner_checks_every_batch(tmp_path):
    with pytest.raises(
        ValueError, match=rf"activations at training step \d+: \d+ of {64 * D_IN} values \(in \d+ of 64"
    ):
        tiny_language_model_runner(tmp_path, skip_nonfinite_rows=False).run()
    runner = tiny_language_model_runner(tmp_path, skip_nonfinite_rows=True)
    runner.run()
    assert runner.guard is not None and runner.guard.rows_skipped > 0
    saved = load_file(tmp_path / "out" / SAE_WEIGHTS_FILENAME)
    assert all(bool(torch.isfinite(t).all()) for t in saved.values())


@pytest.mark.usefixtures("keep_signal_handlers")
def test_sigterm_writes_one_whole_resumable_checkpoint(tmp_path):
    """SIGTERM mid-run (what torchrun sends every rank when one fails): SAE-Lens' handler saves and stops, and what it
    leaves is one whole checkpoint that a resume accepts (weights, trainer state, data position), not a folder of
    runner files alone; under torchrun only rank 0 writes it."""
    runner = tiny_language_model_runner(tmp_path, skip_nonfinite_rows=True)
    runner.cfg.checkpoint_path = str(tmp_path / "ckpt")
    calls = []

    def terminate_at_the_sixth_forward(act: torch.Tensor, hook: object) -> torch.Tensor:
        calls.append(1)
        if len(calls) == 6:
            os.kill(os.getpid(), signal.SIGTERM)
        return act

    runner.model.add_perma_hook("blocks.0.hook_resid_post", terminate_at_the_sixth_forward)
    with pytest.raises(InterruptedException):
        runner.run()
    (checkpoint,) = (tmp_path / "ckpt").iterdir()
    state = check_checkpoint(checkpoint, runner.cfg.sae, has_activations_store=True)
    assert state["batches_drawn"] > 0 and (checkpoint / SAE_WEIGHTS_FILENAME).exists()
    assert not (tmp_path / "out").exists()


def guarded_trainer(sae_cfg, checkpoint_path: Path) -> SAETrainer:
    sae = TrainingSAE.from_dict(sae_cfg.to_dict())
    cfg = SAETrainerConfig(
        total_training_samples=64 * 10,
        train_batch_size_samples=64,
        lr=1e-3,
        lr_warm_up_steps=0,
        lr_decay_steps=0,
        lr_end=1e-3,
        device="cpu",
        autocast=False,
        dead_feature_window=100,
        feature_sampling_window=100,
        n_checkpoints=0,
        checkpoint_path=str(checkpoint_path),
        logger=LoggingConfig(log_to_wandb=False),
        n_batches_for_norm_estimate=2,
    )
    trainer = SAETrainer(cfg=cfg, sae=sae, data_provider=iter(activations(640).split(64)))
    guard_trainer(trainer, skip_nonfinite_rows=False)
    return trainer


@pytest.mark.parametrize("architecture", sorted(ARCHITECTURES))
def test_nonfinite_weights_are_never_saved(tmp_path, architecture):
    trainer = guarded_trainer(ARCHITECTURES[architecture](), tmp_path)
    with torch.no_grad():
        trainer.sae.W_enc[2, 3] = math.inf
        trainer.sae.b_dec[1] = math.nan
    with pytest.raises(ValueError, match=r"refusing to save checkpoint '64' at training step 0: .*NaN or inf") as error:
        trainer.save_checkpoint("64")
    assert f"W_enc has 1 of {D_IN * D_SAE} values" in str(error.value) and "b_dec has 1 of 16" in str(error.value)
    assert list(tmp_path.iterdir()) == []
    if architecture == "softsae":  # also when a user saves it directly
        for save in (trainer.sae.save_model, trainer.sae.save_inference_model):
            with pytest.raises(ValueError, match=r"softsae: refusing to save this SAE: .*W_enc has 1 of"):
                save(tmp_path / "direct")
            assert not (tmp_path / "direct" / SAE_WEIGHTS_FILENAME).exists()


# 3. Shapes


@pytest.mark.parametrize("training", [False, True])
def test_wrong_last_dimension_is_rejected_naming_the_size_and_the_shape(training):
    cfg = soft_cfg(total_training_steps=10) if training else SoftSAEConfig(d_in=D_IN, d_sae=D_SAE, k=4)
    sae = SoftTrainingSAE(cfg) if training else SoftSAE(cfg)
    bad_input, bad_codes = torch.randn(3, D_IN + 1), torch.randn(2, 5, D_SAE - 1)
    for call in (sae.encode, sae.predict_k, sae.forward):
        with pytest.raises(
            ValueError, match=rf"expected input of shape \(\.\.\., d_in={D_IN}\), got \(3, {D_IN + 1}\)"
        ):
            call(bad_input)
    with pytest.raises(
        ValueError, match=rf"expected codes of shape \(\.\.\., d_sae={D_SAE}\), got \(2, 5, {D_SAE - 1}\)"
    ):
        sae.decode(bad_codes)


# 4. Crash safety and resuming


def test_atomic_folder_replaces_whole_or_keeps_the_previous(tmp_path):
    target = tmp_path / "sae"
    with atomic_folder(target) as staged:
        staged.mkdir()
        (staged / SAE_CFG_FILENAME).write_text("1")
    assert (target / SAE_CFG_FILENAME).read_text() == "1"
    with pytest.raises(OSError, match="disk full"), atomic_folder(target) as staged:
        staged.mkdir()
        (staged / SAE_CFG_FILENAME).write_text("2")
        raise OSError("disk full")
    assert [p.name for p in tmp_path.iterdir()] == ["sae"] and (target / SAE_CFG_FILENAME).read_text() == "1"
    with atomic_folder(target) as staged:
        staged.mkdir()
        (staged / "b").write_text("3")
    assert [p.name for p in target.iterdir()] == ["b"] and [p.name for p in tmp_path.iterdir()] == ["sae"]


def test_an_output_folder_holding_something_else_is_refused_before_training(tmp_path):
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match=r"exists and is not an SAE folder \(it has no cfg.json\)"):
        train_on_activations(activations(256), soft_cfg(), training_steps=5, output_path=tmp_path, **QUICK)
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_checkpoint_interrupted_midway_leaves_nothing_half_written(tmp_path):
    trainer = guarded_trainer(soft_cfg(total_training_steps=10), tmp_path)

    def fail(checkpoint_path: Path) -> None:  # the weights and cfg.json are already written by now
        raise OSError("disk full")

    trainer.save_trainer_state = fail
    with pytest.raises(OSError, match="disk full"):
        trainer.save_checkpoint("64")
    assert list(tmp_path.iterdir()) == []


def checkpoints(root: Path) -> list[Path]:
    """The visible mid-run checkpoints under root/<run id>/, oldest first (visible means whole: renamed into place)."""
    return sorted((p for p in root.glob("*/[!.]*") if p.name.isdigit()), key=lambda p: int(p.name))


def kill_after_checkpoints(command: list[str], root: Path, count: int, timeout: float) -> Path:
    """Run `command`, SIGKILL it as soon as `count` checkpoints are under `root`, and return the last of them."""
    process = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "HF_HUB_OFFLINE": "1"}
    )
    deadline = time.monotonic() + timeout
    while len(checkpoints(root)) < count and process.poll() is None:
        assert time.monotonic() < deadline, f"no {count} checkpoints within {timeout} s"
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL, "the run ended before it could be killed"
    return checkpoints(root)[count - 1]


def test_sigkill_mid_run_then_resume_gives_the_uninterrupted_weights(tmp_path):
    """`sae-lens train --activations` is killed after its first checkpoint and continued with --resume."""
    np.save(tmp_path / "acts.npy", activations(3000).numpy())
    steps = 600
    args = ["train", "--architecture", "softsae", "--activations", str(tmp_path / "acts.npy"), "--d_sae", str(D_SAE),
            "--k", "4", "--training_tokens", str(64 * steps), "--train_batch_size_tokens", "64", "--lr", "0.002",
            "--lr_warm_up_steps", "10", "--lr_decay_steps", "100", "--n_checkpoints", "5", "--seed", "5",
            "--n_batches_for_norm_estimate", "4", "--dead_feature_window", "50", "--feature_sampling_window", "100",
            "--tau_anneal_steps", "200", "--hard_topk_steps", "150"]  # fmt: skip
    killed = [SAE_LENS, *args, "--checkpoint_path", str(tmp_path / "ckpt_killed"), "--output_path", str(tmp_path / "o")]
    checkpoint = kill_after_checkpoints(killed, tmp_path / "ckpt_killed", count=1, timeout=300)
    assert not (tmp_path / "o").exists()
    for whole in checkpoints(tmp_path / "ckpt_killed"):
        check_checkpoint(whole, soft_cfg(total_training_steps=steps), has_activations_store=False)

    main([*args, "--checkpoint_path", str(tmp_path / "ckpt_resumed"), "--output_path", str(tmp_path / "out_r"),
          "--resume", str(checkpoint)])  # fmt: skip
    main([*args, "--checkpoint_path", str(tmp_path / "ckpt_full"), "--output_path", str(tmp_path / "out_u")])
    resumed, uninterrupted = (load_file(tmp_path / out / SAE_WEIGHTS_FILENAME) for out in ("out_r", "out_u"))
    for name, value in uninterrupted.items():
        torch.testing.assert_close(resumed[name], value, rtol=1e-5, atol=1e-6, msg=name)
    # The resumed run checkpoints where the uninterrupted one does after that point, at the same step.
    later = sorted(p.name for p in (tmp_path / "ckpt_full").glob("*/*") if int(p.name) > int(checkpoint.name))
    assert sorted(p.name for p in (tmp_path / "ckpt_resumed").glob("*/*")) == later
    for run in ("ckpt_resumed", "ckpt_full"):
        state = torch.load(next((tmp_path / run).glob(f"*/{later[-1]}")) / TRAINER_STATE_FILENAME, weights_only=True)
        assert state["n_training_steps"] == int(later[-1]) // 64 - 1  # SAE-Lens counts the step after saving


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ckpt")
    train_on_activations(activations(1024), soft_cfg(), training_steps=30, checkpoint_path=str(root), n_checkpoints=1,
                         **QUICK)  # fmt: skip
    (checkpoint,) = root.iterdir()
    assert json.loads((checkpoint / GUARD_STATE_FILENAME).read_text()) == {
        "batches_drawn": 18,
        "nonfinite_rows_skipped": 0,
        "world_size": 1,
    }
    return checkpoint


def corrupt(checkpoint: Path, tmp_path: Path, how: str, damage_sae) -> Path:
    damaged = tmp_path / "damaged"
    shutil.copytree(checkpoint, damaged)
    state = damaged / TRAINER_STATE_FILENAME
    if how == "missing trainer state":
        state.unlink()
    elif how == "truncated trainer state":
        state.write_bytes(state.read_bytes()[:1000])
    elif how == "pickled code":
        torch.save({"optimizer": _RunsCode()}, state)
    elif how == "run folder":
        damaged = tmp_path / "run"
        shutil.copytree(checkpoint, damaged / "1984")
    else:
        assert damage_sae(damaged, how), how
    return damaged


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


@pytest.mark.parametrize(
    ("how", "message"),
    [
        ("missing trainer state", r"is not a whole training checkpoint: it lacks \['trainer_state.pt'\]"),
        (
            "truncated weights",
            r"sae_weights.safetensors cannot be read safely \(SafetensorError: .*incomplete metadata",
        ),
        ("nan weights", r"sae_weights.safetensors is unusable: W_dec has 1 of 1024 values NaN or inf"),
        ("truncated trainer state", r"trainer_state.pt cannot be read safely \((OSError|RuntimeError)"),
        ("pickled code", r"trainer_state.pt cannot be read safely \(UnpicklingError: Weights only load failed"),
        ("architecture topk", r"has architecture='topk', but this run has architecture='softsae'"),
        ("run folder", r"lacks .*; it holds the checkpoints \['1984'\]: resume from one of them"),
    ],
)
def test_resume_refuses_a_damaged_checkpoint_clearly(checkpoint, tmp_path, damage_sae, how, message):
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        damaged = corrupt(checkpoint, tmp_path, how, damage_sae)
        train_on_activations(activations(1024), soft_cfg(), training_steps=30, resume_from=damaged, **QUICK)


def test_resume_refuses_a_different_run(checkpoint):
    with pytest.raises(ValueError, match=r"has total_training_steps=30, but this run has total_training_steps=40"):
        train_on_activations(activations(1024), soft_cfg(), training_steps=40, resume_from=checkpoint, **QUICK)
    with pytest.raises(ValueError, match=r"has d_sae=64, but this run has d_sae=128"):
        train_on_activations(activations(1024), soft_cfg(d_sae=128), training_steps=30, resume_from=checkpoint, **QUICK)


# 5. Loading


def test_loading_weights_of_another_architecture_under_a_softsae_cfg_is_clear(tmp_path):
    TrainingSAE.from_dict(TopKTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=4).to_dict()).save_inference_model(tmp_path)
    cfg = json.loads((tmp_path / SAE_CFG_FILENAME).read_text())
    (tmp_path / SAE_CFG_FILENAME).write_text(json.dumps({**cfg, "architecture": "softsae"}))
    with pytest.raises(ValueError, match=r"the weights file is not a SoftSAE's \(missing \['W_k_in', .*another arch"):
        SAE.load_from_disk(tmp_path)


def test_loading_nonfinite_weights_is_refused(tmp_path):
    SoftTrainingSAE(soft_cfg()).save_inference_model(tmp_path)
    tensors = load_file(tmp_path / SAE_WEIGHTS_FILENAME)
    tensors["w_k_out"][3] = math.inf
    save_file(tensors, tmp_path / SAE_WEIGHTS_FILENAME)
    with pytest.raises(
        ValueError, match=r"softsae: refusing to load these weights: w_k_out has 1 of 64 values NaN or inf"
    ):
        SAE.load_from_disk(tmp_path)


@pytest.mark.slow
@pytest.mark.usefixtures("keep_signal_handlers")
def test_language_model_run_killed_and_resumed_matches_the_uninterrupted_run(tmp_path):
    """`sae-lens train` on SmolLM2 is killed after its last checkpoint and continued with --resume: exactly from the
    store state saved with the checkpoint (no replay), and exactly from a checkpoint without it (as earlier versions
    wrote) with --exact_resume (the activation stream replayed)."""
    steps = 150
    args = ["train", "--config", str(REPO / "configs" / "quickstart.yaml"), "--hook_name", "blocks.2.hook_resid_post",
            "--d_sae", "576", "--k", "16", "--k_max", "32", "--training_tokens", str(256 * steps),
            "--train_batch_size_tokens", "256", "--n_batches_in_buffer", "8", "--store_batch_size_prompts", "8",
            "--n_batches_for_norm_estimate", "4", "--n_checkpoints", "3",
            "--save_final_checkpoint", "true"]  # fmt: skip
    # Killed after its last checkpoint (75%), so the resumed runs cross into the hard phase (the last 10%).
    killed = [SAE_LENS, *args, "--checkpoint_path", str(tmp_path / "ckpt_killed"), "--output_path", str(tmp_path / "o")]
    checkpoint = kill_after_checkpoints(killed, tmp_path / "ckpt_killed", count=3, timeout=1200)
    assert not (tmp_path / "o").exists()

    without_state = tmp_path / "without_state" / checkpoint.name
    shutil.copytree(checkpoint, without_state)
    shutil.rmtree(without_state / STORE_STATE_DIRNAME)
    main([*args, "--checkpoint_path", str(tmp_path / "ckpt_exact"), "--output_path", str(tmp_path / "out_x"),
          "--resume", str(without_state), "--exact_resume"])  # fmt: skip
    main([*args, "--checkpoint_path", str(tmp_path / "ckpt_resumed"), "--output_path", str(tmp_path / "out_r"),
          "--resume", str(checkpoint)])  # fmt: skip
    main([*args, "--checkpoint_path", str(tmp_path / "ckpt_full"), "--output_path", str(tmp_path / "out_u")])
    runs = ("ckpt_exact", "ckpt_resumed", "ckpt_full")
    finals = {run: next((tmp_path / run).glob("*/final_*")) for run in runs}
    assert len({path.name for path in finals.values()}) == 1
    states = {run: torch.load(path / TRAINER_STATE_FILENAME, weights_only=True) for run, path in finals.items()}
    saes = {run: TrainingSAE.load_from_disk(path) for run, path in finals.items()}
    for run, sae in saes.items():  # phase state: b_dec initialised once, k head frozen for the hard phase
        assert states[run]["n_training_steps"] == steps, run
        assert bool(sae.b_dec_initialised) and bool(sae.k_head_frozen), run
        assert sae.cfg.schedule(states[run]["n_training_steps"]) == saes["ckpt_full"].cfg.schedule(steps)
    exact, resumed, full = (load_file(tmp_path / out / SAE_WEIGHTS_FILENAME) for out in ("out_x", "out_r", "out_u"))
    for run in (exact, resumed):
        assert run.keys() == full.keys() and all(torch.equal(run[name], full[name]) for name in full)
