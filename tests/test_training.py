"""Training through SAE-Lens: the embedding path, the `sae-lens train` command and its YAML configs."""

import json
import os
import subprocess
import sys
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import Dataset
from sae_lens import SAE
from sae_lens.saes.topk_sae import TopKTrainingSAEConfig
from safetensors.torch import save_file

from softsae_plugin import SoftSAE, SoftTrainingSAEConfig, train_on_activations
from softsae_plugin.training.activations import MappedRows, batches, load_activations, map_activations, split_heldout
from softsae_plugin.training.config import load_sweep_config, load_yaml_config
from softsae_plugin.training.summary import K_HAT_HISTOGRAM_FILENAME, SUMMARY_FILENAME
from softsae_plugin.training.sweep import build_sweep

REPO = Path(__file__).resolve().parents[1]
SAE_LENS = str(Path(sys.executable).with_name("sae-lens"))
D_IN = 32


def synthetic_activations(n: int = 4096, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs that are positive mixes of a known, varying number (1..12) of ground-truth directions."""
    gen = torch.Generator().manual_seed(seed)
    directions = torch.nn.functional.normalize(torch.randn(128, D_IN, generator=gen), dim=-1)
    counts = torch.randint(1, 13, (n,), generator=gen)
    mask = torch.rand(n, 128, generator=gen).argsort(-1) < counts[:, None]
    x = (mask * torch.rand(n, 128, generator=gen)) @ directions
    return x, counts


def soft_cfg(**overrides) -> SoftTrainingSAEConfig:
    return SoftTrainingSAEConfig(**{"d_in": D_IN, "d_sae": 256, "k": 6, **overrides})


def test_embedding_path_trains_softsae_deterministically(tmp_path):
    x, counts = synthetic_activations()
    kwargs = dict(batch_size=128, training_steps=300, lr=2e-3, seed=3, progress=False)
    sae = train_on_activations(x[:3500], soft_cfg(), output_path=tmp_path, eval_activations=x[3500:], **kwargs)
    again = train_on_activations(x[:3500], soft_cfg(), **kwargs)
    for name, value in sae.state_dict().items():
        assert torch.equal(value, again.state_dict()[name]), name
    summary = json.loads((tmp_path / SUMMARY_FILENAME).read_text())
    assert summary["fve"] > 0.5
    assert 0.8 * 6 <= summary["mean_l0"] <= 1.2 * 6
    assert (tmp_path / K_HAT_HISTOGRAM_FILENAME).stat().st_size > 1000
    # The saved model takes raw activations; k_hat grows with the number of ingredients.
    loaded = SAE.load_from_disk(tmp_path)
    assert isinstance(loaded, SoftSAE)
    k_hat = loaded.predict_k(x[3500:]).detach()
    rank_corr = np.corrcoef(k_hat.argsort().argsort(), counts[3500:].argsort().argsort())[0, 1]
    assert rank_corr > 0.5
    assert torch.equal(loaded.encode(x[3500:]), sae.encode(x[3500:]))


def test_embedding_path_trains_builtin_architectures():
    x, _ = synthetic_activations(1024)
    sae = train_on_activations(x, TopKTrainingSAEConfig(d_in=D_IN, d_sae=128, k=4), batch_size=128,
                               training_steps=20, progress=False)  # fmt: skip
    assert ((sae.encode(x) != 0).sum(-1) == 4).all()


def test_activation_files_load_alike(tmp_path):
    x, _ = synthetic_activations(64)
    np.save(tmp_path / "acts.npy", x.numpy())
    save_file({"activations": x}, tmp_path / "acts.safetensors")
    Dataset.from_dict({"activations": x.numpy()}).save_to_disk(tmp_path / "acts_ds")
    for name in ("acts.npy", "acts.safetensors", "acts_ds"):
        assert torch.equal(load_activations(tmp_path / name), x), name
    with pytest.raises(ValueError, match="cannot read"):
        (tmp_path / "acts.txt").write_text("1 2 3")
        load_activations(tmp_path / "acts.txt")


def test_activation_files_are_mapped_and_a_batch_reads_only_its_share_of_rows(tmp_path):
    """.npy, float32 .safetensors and saved datasets are read lazily (`map_activations`): the same rows as a full
    load, and a stream whose batches are shared (as each data-parallel rank takes its slice) reads from the file only
    the rows of its share, never the rest. A bfloat16 .safetensors file, which numpy cannot map, is loaded whole."""
    x, _ = synthetic_activations(64)
    np.save(tmp_path / "acts.npy", x.numpy())
    save_file({"activations": x}, tmp_path / "acts.safetensors")
    Dataset.from_dict({"activations": x.numpy()}).save_to_disk(tmp_path / "acts_ds")
    save_file({"activations": x.bfloat16()}, tmp_path / "acts_bf16.safetensors")
    assert isinstance(map_activations(tmp_path / "acts_bf16.safetensors"), torch.Tensor)
    whole = list(islice(batches(x, 16, seed=5), 6))
    for name in ("acts.npy", "acts.safetensors", "acts_ds"):
        mapped = map_activations(tmp_path / name)
        assert isinstance(mapped, MappedRows) and mapped.shape == tuple(x.shape), name
        assert isinstance(mapped.array, np.memmap) or name == "acts_ds", name
        assert torch.equal(mapped.rows(), x), name
        read: list[int] = []
        array = mapped.array

        class Recording:
            def __getitem__(self, rows, array=array, read=read):
                read.extend(rows.tolist())
                return array[rows]

        mapped.array = Recording()
        halves = list(islice(batches(mapped, 16, seed=5, share=lambda rows: rows[:8]), 6))  # 6 batches: 2 epochs
        assert all(torch.equal(half, batch[:8]) for half, batch in zip(halves, whole, strict=True)), name
        assert len(read) == 6 * 8, name  # only the shares' rows were read
        train, heldout = split_heldout(map_activations(tmp_path / name), 0.25, seed=1)
        assert torch.equal(torch.cat([train.rows(), heldout.rows()]).sort(0).values, x.sort(0).values), name


def test_cli_embedding_path(tmp_path):
    x, _ = synthetic_activations(2048)
    np.save(tmp_path / "acts.npy", x.numpy())
    out = tmp_path / "out"
    result = subprocess.run(
        [SAE_LENS, "train", "--architecture", "softsae", "--activations", str(tmp_path / "acts.npy"),
         "--d_sae", "128", "--k", "4", "--training_tokens", str(128 * 100), "--train_batch_size_tokens", "128",
         "--lr", "0.002", "--output_path", str(out), "--checkpoint_path", str(tmp_path / "ckpt")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "FVE" in result.stdout
    cfg = json.loads((out / "cfg.json").read_text())
    assert cfg["architecture"] == "softsae" and cfg["d_in"] == D_IN and cfg["k"] == 4
    summary = json.loads((out / SUMMARY_FILENAME).read_text())
    assert summary["architecture"] == "softsae" and np.isfinite(summary["fve"])


def test_yaml_config_unknown_key_names_it_and_the_nearest(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("architecture: softsae\nk: 8\nsparsity_betta: 3.0\n")
    with pytest.raises(ValueError, match=r"unknown key 'sparsity_betta'.*'sparsity_beta'"):
        load_yaml_config(path)


def test_yaml_config_wrong_type_names_the_field(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("architecture: softsae\nk: eight\n")
    with pytest.raises(ValueError, match=r"k='eight'"):
        load_yaml_config(path)


@pytest.mark.parametrize("config", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_validate(config):
    if "sweep" in config.name:
        shared, saes = load_sweep_config(config)
        assert len(build_sweep(shared, saes).runner.saes) == len(saes) >= 6
    else:
        assert load_yaml_config(config)["architecture"]


def test_cli_help_lists_softsae_and_its_options():
    result = subprocess.run([SAE_LENS, "train", "--architecture", "softsae", "--help"],
                            capture_output=True, text=True, timeout=120)  # fmt: skip
    assert result.returncode == 0
    for flag in ("--config", "--activations", "--resume", "--exact_resume", "softsae", "--k_max", "--hard_topk_steps"):
        assert flag in result.stdout, flag


@pytest.mark.slow
@pytest.mark.parametrize("architecture", ["softsae", "topk"])
def test_sae_lens_train_on_smollm2(tmp_path, architecture):
    """The real runner on the real SmolLM2-135M and real text, a few hundred steps, through the CLI."""
    out = tmp_path / "out"
    own = ["--k_max", "32", "--tau", "0.005", "--tau_start", "0.05"] if architecture == "softsae" else []
    result = subprocess.run(
        [SAE_LENS, "train", "--architecture", architecture, "--model_name", "smollm2-135m-instruct-q4_1",
         "--dataset_path", "local:english-wikipedia", "--hook_name", "blocks.2.hook_resid_post",
         "--context_size", "128", "--exclude_special_tokens", "true", "--d_in", "576", "--d_sae", "1152",
         "--k", "16", *own, "--lr", "0.0005", "--training_tokens", str(200 * 256),
         "--train_batch_size_tokens", "256", "--n_batches_in_buffer", "8", "--store_batch_size_prompts", "8",
         "--n_batches_for_norm_estimate", "4", "--checkpoint_path", str(tmp_path / "ckpt"),
         "--output_path", str(out)],
        capture_output=True, text=True, timeout=900, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    sae = SAE.load_from_disk(out)
    assert sae.cfg.architecture() == architecture
    assert sae.cfg.metadata.model_name == "smollm2-135m-instruct-q4_1"
    assert sae.cfg.metadata.hook_name == "blocks.2.hook_resid_post"
    summary = json.loads((out / SUMMARY_FILENAME).read_text())
    assert summary["fve"] > 0.3
    assert summary["eval_data"].startswith("held-out text: every 10th paragraph")
    # A clean first run: no SAE-Lens warning that does not apply to the local sources, and the norm estimate's bar
    # finishes before the training bar starts instead of nesting inside it.
    for noise in ("fewer samples", "will override", "copy construct from a tensor", "model_from_pretrained_kwargs"):
        assert noise not in result.stderr, noise
    assert "tokens of training text" in result.stdout
    if architecture == "softsae":  # (SAE-Lens' TopK does not normalise by default: no estimate)
        assert result.stderr.index("Estimating norm scaling factor") < result.stderr.index("Training SAE")
    # Every saved SAE takes raw activations with unit-norm decoder rows, as SAEBench expects.
    torch.testing.assert_close(sae.W_dec.norm(dim=-1), torch.ones(sae.cfg.d_sae), atol=1e-5, rtol=0)
    if architecture == "softsae":
        assert isinstance(sae, SoftSAE)
        assert sae.cfg.k_max == 32
        assert (out / K_HAT_HISTOGRAM_FILENAME).exists()
        # The constraint and the hard phase's calibration: L0 on k, on training batches and on held-out text.
        assert summary["train_mean_l0"] == pytest.approx(16, rel=0.01)
        assert summary["mean_l0"] == pytest.approx(16, rel=0.05)
    else:
        assert summary["mean_l0"] == 16


@pytest.mark.slow
def test_sae_lens_python_idiom_trains_softsae(tmp_path):
    """SAE-Lens' documented idiom, LanguageModelSAETrainingRunner(LanguageModelSAERunnerConfig(sae=...)).run(), on
    the offline model: without the run length it stops with an error that shows the one line it needs; with it, it
    trains a SoftSAE like any built-in architecture."""
    from sae_lens import LanguageModelSAERunnerConfig, LanguageModelSAETrainingRunner
    from sae_lens.config import LoggingConfig

    from softsae_plugin.offline.smollm2 import SMOLLM2_ID, load_smollm2
    from softsae_plugin.offline.text import LOCAL_TEXT_ID, tokenized_english_text

    model = load_smollm2(first_n_layers=1)
    rows = tokenized_english_text(model.tokenizer, 64, split="train").with_format(None).select(range(400))
    cfg = LanguageModelSAERunnerConfig(
        sae=SoftTrainingSAEConfig(d_in=576, d_sae=1152, k=8),
        model_name=SMOLLM2_ID, hook_name="blocks.0.hook_resid_post", dataset_path=LOCAL_TEXT_ID,
        is_dataset_tokenized=True, context_size=64, exclude_special_tokens=True, training_tokens=60 * 256,
        train_batch_size_tokens=256, store_batch_size_prompts=8, n_batches_in_buffer=4,
        n_batches_for_norm_estimate=2, lr=5e-4, device="cpu", checkpoint_path=None,
        output_path=str(tmp_path / "out"), logger=LoggingConfig(log_to_wandb=False),
    )  # fmt: skip
    with pytest.raises(ValueError, match=r"`cfg\.sae\.total_training_steps = cfg\.total_training_steps`"):
        LanguageModelSAETrainingRunner(cfg, override_model=model, override_dataset=rows).run()
    cfg.sae.total_training_steps = cfg.total_training_steps
    LanguageModelSAETrainingRunner(cfg, override_model=model, override_dataset=rows).run()
    sae = SAE.load_from_disk(tmp_path / "out")
    assert isinstance(sae, SoftSAE) and sae.cfg.metadata.hook_name == "blocks.0.hook_resid_post"
    x = torch.randn(32, 576) * 3
    assert ((sae.encode(x) != 0).sum(-1) <= sae.cfg.k_max).all()


def test_the_embedding_summary_is_measured_on_held_out_rows_by_default(tmp_path):
    x, _ = synthetic_activations(2000)
    train_on_activations(x, soft_cfg(), output_path=tmp_path, batch_size=128, training_steps=30, progress=False)
    summary = json.loads((tmp_path / SUMMARY_FILENAME).read_text())
    assert summary["eval_data"] == "held out: a random 10% of the activation rows, never trained on"
    assert summary["n_eval_inputs"] == 200  # each held-out row once


def test_a_one_shot_stream_keeps_the_trained_sae_when_the_summary_runs_out(tmp_path, capsys):
    x, _ = synthetic_activations(64 * 24)
    stream = iter(x.split(64))  # 4 batches for the norm estimate and 20 steps, nothing left to measure on
    train_on_activations(stream, soft_cfg(), output_path=tmp_path / "out", batch_size=64, training_steps=20,
                         n_batches_for_norm_estimate=4, progress=False)  # fmt: skip
    assert isinstance(SAE.load_from_disk(tmp_path / "out"), SoftSAE)
    summary = json.loads((tmp_path / "out" / SUMMARY_FILENAME).read_text())
    assert summary["eval_data"].startswith("none (activations: the batch iterator ran out")
    assert "dead_fraction" in summary and "measured no held-out data" in capsys.readouterr().out


def test_progress_false_draws_no_bar(tmp_path, capfd):
    x, _ = synthetic_activations(1024)
    train_on_activations(x, soft_cfg(), batch_size=128, training_steps=5, n_batches_for_norm_estimate=2, progress=False)
    captured = capfd.readouterr()
    assert "Training SAE" not in captured.err + captured.out
    assert "Estimating norm scaling factor" not in captured.err + captured.out


def test_the_activations_path_honours_every_trainer_option_of_the_runner(tmp_path):
    """`sae-lens train --activations` uses the runner config's own conversion (to_sae_trainer_config): an option
    such as adam_beta1 or lr_scheduler_name reaches the trainer (it changes the weights)."""
    np.save(tmp_path / "acts.npy", synthetic_activations(1024)[0].numpy())
    base = ["train", "--architecture", "topk", "--activations", str(tmp_path / "acts.npy"), "--d_sae", "64", "--k",
            "4", "--training_tokens", str(20 * 64), "--train_batch_size_tokens", "64", "--n_batches_for_norm_estimate",
            "2", "--seed", "1"]  # fmt: skip
    from softsae_plugin.cli import main

    weights = {}
    for name, extra in (
        ("default", []),
        ("beta1", ["--adam_beta1", "0.5"]),
        ("cosine", ["--lr_scheduler_name", "cosineannealing"]),
    ):
        main([*base, *extra, "--output_path", str(tmp_path / name)])
        weights[name] = SAE.load_from_disk(tmp_path / name).W_enc.detach()
    assert not torch.equal(weights["default"], weights["beta1"])
    assert not torch.equal(weights["default"], weights["cosine"])


def test_the_summary_describes_the_saved_model_not_the_training_one(tmp_path):
    # SAE-Lens saves a BatchTopK SAE as a JumpReLU with a learned threshold: its L0 varies per input, while the
    # batch top-k it trained with keeps exactly k per input on average. The summary is of the saved model.
    from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAEConfig

    from softsae_plugin.training.summary import summarise

    x, _ = synthetic_activations()
    cfg = BatchTopKTrainingSAEConfig(d_in=D_IN, d_sae=128, k=6)
    train_on_activations(x, cfg, batch_size=256, training_steps=60, lr=3e-3, seed=0, progress=False,
                         output_path=tmp_path / "batchtopk", dead_feature_window=20)  # fmt: skip
    summary = json.loads((tmp_path / "batchtopk" / SUMMARY_FILENAME).read_text())
    saved = SAE.load_from_disk(tmp_path / "batchtopk")
    assert saved.cfg.architecture() == "jumprelu"
    assert summary["architecture"] == "batchtopk" and summary["saved_as"] == "jumprelu" and summary["k"] == 6
    heldout = x[torch.randperm(len(x), generator=torch.Generator().manual_seed(0))[: round(0.1 * len(x))]]
    direct = summarise(saved, [heldout])[0]
    assert summary["mean_l0"] == pytest.approx(direct["mean_l0"], rel=1e-6)
    assert summary["fve"] == pytest.approx(direct["fve"], rel=1e-6)
    assert summary["mean_l0"] != 6  # a JumpReLU's L0 is its own, not the batch top-k's exact k
    assert summary["l0_over_target"] == pytest.approx(summary["mean_l0"] / 6)


def test_dead_fraction_is_sae_lens_dead_latent_state_not_the_last_window(tmp_path):
    """`dead_fraction` is the share of latents SAE-Lens' trainer counts as dead at the end of training (no firing for
    more than dead_feature_window steps), even where the last feature-sampling window saw every latent fire."""
    from sae_lens.config import LoggingConfig, SAETrainerConfig
    from sae_lens.training.sae_trainer import SAETrainer

    from softsae_plugin import SoftTrainingSAE
    from softsae_plugin.training.summary import training_statistics

    sae = SoftTrainingSAE(SoftTrainingSAEConfig(d_in=8, d_sae=40, k=2, total_training_steps=100))
    cfg = SAETrainerConfig(total_training_samples=1000, train_batch_size_samples=10, lr=1e-3, lr_end=1e-3,
                           dead_feature_window=50, feature_sampling_window=5,
                           logger=LoggingConfig(log_to_wandb=False))  # fmt: skip
    trainer = SAETrainer(cfg=cfg, sae=sae, data_provider=iter(()))
    trainer.n_forward_passes_since_fired[:10] = 51  # 10 of 40 latents silent for longer than the window
    trainer.act_freq_scores[:] = 3.0  # yet every latent fired in the last sampling window
    trainer.n_frac_active_samples = 10
    stats = training_statistics(trainer)
    assert stats["dead_fraction"] == 0.25
    assert stats["train_mean_l0"] == pytest.approx(40 * 0.3)
