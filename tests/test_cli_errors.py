"""Every subcommand reports a user's mistake in one line, `sae-lens <command>: error: ...`, with exit status 2."""

import numpy as np
import pytest

from softsae_plugin.cli import main


@pytest.fixture
def files(tmp_path):
    np.save(tmp_path / "acts.npy", np.random.default_rng(0).standard_normal((256, 8)).astype(np.float32))
    (tmp_path / "typo.yaml").write_text("architecture: softsae\nk: 8\nsparsity_betta: 3.0\n")
    (tmp_path / "a_file").write_text("not a folder")
    (tmp_path / "sweep.yaml").write_text("d_sae: 64\nsaes:\n  a: {architecture: softsae, k: 4, sparsity_betta: 3.0}\n")
    return tmp_path


ACTIVATIONS = ["--architecture", "softsae", "--d_sae", "64", "--k", "4", "--training_tokens", "640",
               "--train_batch_size_tokens", "64", "--n_batches_for_norm_estimate", "2"]  # fmt: skip

BAD_COMMAND_LINES = [
    (["train", "--config", "{d}/typo.yaml"], "train", "unknown key 'sparsity_betta' for architecture 'softsae'"),
    (["train", "--config", "{d}/missing.yaml"], "train", "missing.yaml"),
    (["train", "--activations", "{d}/missing.npy", *ACTIVATIONS], "train", "no file or folder at"),
    (["train", "--activations", "{d}/acts.npy", *ACTIVATIONS, "--k_max", "2"], "train", "k_max"),
    (["train", "--activations", "{d}/acts.npy", *ACTIVATIONS, "--output_path", "{d}/a_file"], "train",
     "is not an SAE folder"),
    (["train", "--activations", "{d}/acts.npy", *ACTIVATIONS, "--compile_sae", "true"], "train",
     "--activations cannot honour compile_sae"),
    (["train", "--exact_resume"], "train", "--exact_resume needs --resume"),
    (["train", "--config", "{d}/sweep.yaml"], "train",
     "saes.a: unknown key 'sparsity_betta' for architecture 'softsae'; did you mean 'sparsity_beta'?"),
    (["train", "--activations", "{d}/acts.npy", *ACTIVATIONS, "--resume", "{d}/nothing"], "train",
     "is not a whole training checkpoint"),
    (["eval", "--sae", "/nonexistent", "--out", "{d}/out"], "eval", "--sae /nonexistent: no such folder"),
    (["eval", "--sae", "{d}/a_file", "--out", "{d}/out"], "eval", "is a file; expected an SAE folder"),
    (["eval", "--sae", "{d}", "--out", "{d}/out"], "eval", "has no cfg.json or sae_weights.safetensors"),
    (["push", "{d}/a_file", "--repo-id", "user/name"], "push", "expected an SAE folder"),
    (["push", "{d}", "--repo-id", "not a repo"], "push", "not a repo"),
]  # fmt: skip


@pytest.mark.parametrize(("argv", "command", "message"), BAD_COMMAND_LINES, ids=lambda v: str(v)[:60])
def test_a_bad_command_line_is_one_clear_line(files, capsys, argv, command, message):
    with pytest.raises(SystemExit) as exit_info:
        main([arg.format(d=files) for arg in argv])
    assert exit_info.value.code == 2
    error = [line for line in capsys.readouterr().err.splitlines() if line.strip()][-1]
    assert error.startswith(f"sae-lens {command}: error: "), error
    assert message in error
    assert "Traceback" not in error


def test_debug_shows_the_traceback_instead(files):
    with pytest.raises(ValueError, match="unknown key 'sparsity_betta'"):
        main(["train", "--config", str(files / "typo.yaml"), "--debug"])
