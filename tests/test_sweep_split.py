"""Sweeps split by SAE across ranks (training/by_sae.py): each SAE as one process trains it, activations exchanged."""

import json
import subprocess
import sys
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import yaml
from test_distributed import ENV, TORCHRUN, max_relative_difference, train

from softsae_plugin.training import by_sae
from softsae_plugin.training.summary import SUMMARY_FILENAME
from softsae_plugin.training.sweep import build_sweep

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "eval"))  # as when the commands run
from lab.traffic import bytes_per_step, counted_command

D_IN, D_SAE, BATCH = 16, 512, 128
# 20 steps of 128 vectors in float64, dead latents (512 latents, a 3-step window: AuxK and the counters at work), a
# checkpoint halfway: SoftSAE, TopK and BatchTopK (its top-k over the whole batch), two SAEs on rank 0, one on rank 1.
SWEEP = {"d_sae": D_SAE, "training_tokens": 20 * BATCH, "train_batch_size_tokens": BATCH, "lr": 0.003, "seed": 3,
         "n_batches_for_norm_estimate": 3, "dead_feature_window": 3,
         "saes": {"soft": {"architecture": "softsae", "k": 4, "dtype": "float64", "lr": 0.002},
                  "top": {"architecture": "topk", "k": 4, "dtype": "float64",
                          "normalize_activations": "expected_average_only_in"},
                  "batch": {"architecture": "batchtopk", "k": 4, "dtype": "float64"}}}  # fmt: skip


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("split")
    np.save(folder / "acts.npy", np.random.default_rng(0).standard_normal((3000, D_IN)).astype(np.float32))
    (folder / "sweep.yaml").write_text(yaml.safe_dump(SWEEP))
    return folder


def counted_run(folder: Path, out: Path, *args: str) -> dict:
    """`sae-lens train *args` on 2 gloo ranks in `folder`, with the bytes each rank hands to collectives counted by
    the profiler over steps 4-7 (eval/lab/traffic.py); returns the counts."""
    command = counted_command(out / "counted.py", out, list(args), skip=2, steps=4)
    result = subprocess.run([TORCHRUN, "--standalone", "--nproc_per_node", "2", *command], capture_output=True,
                            text=True, timeout=600, env=ENV, cwd=folder)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return bytes_per_step(out)


def test_two_ranks_split_by_sae_exchange_only_activations_and_train_each_sae_as_one_process(folder, tmp_path):
    """2 gloo ranks, the sweep split by SAE (the default): per step each rank hands collectives exactly its half of
    the batch of activations (one all_gather, nothing else), and each SAE ends with the weights one process gives
    it, to float64 rounding; the checkpoint written halfway (rank 1's SAE sent to rank 0) resumes to the same
    weights."""
    args = ["--config", "sweep.yaml", "--activations", "acts.npy"]
    train(*args, "--output_path", "one", cwd=folder)
    counts = counted_run(folder, tmp_path, *args, "--output_path", "two", "--checkpoint_path", "ckpt",
                         "--n_checkpoints", "1")  # fmt: skip
    for rank in (0, 1):
        assert counts["per_rank"][rank]["by_op"] == {"all_gather": BATCH // 2 * D_IN * 4}  # float32 activations
    (checkpoint,) = (folder / "ckpt").glob("*/*")
    train(*args, "--output_path", "resumed", "--resume", str(checkpoint), ranks=2, cwd=folder)
    for name in SWEEP["saes"]:
        assert max_relative_difference(folder / "one" / name, folder / "two" / name) < 1e-6, name
        assert max_relative_difference(folder / "two" / name, folder / "resumed" / name) < 1e-6, name
        assert json.loads((folder / "two" / name / SUMMARY_FILENAME).read_text())["dead_fraction"] > 0, name


def test_a_data_parallel_sweep_all_reduces_every_gradient(folder, tmp_path):
    """`sweep_parallel: data` (DDP per SAE), counted as above: each rank all-reduces at least every SAE's gradients
    (float64) per step."""
    counts = counted_run(folder, tmp_path, "--config", "sweep.yaml", "--activations", "acts.npy", "--output_path",
                         "null", "--sweep_parallel", "data")  # fmt: skip
    parameters = {"soft": 3 * D_IN * D_SAE + 3 * D_SAE + D_IN + 1, "top": 2 * D_IN * D_SAE + D_SAE + D_IN}
    gradients = 8 * (parameters["soft"] + 2 * parameters["top"])  # batchtopk has topk's parameters
    for rank in (0, 1):
        assert counts["per_rank"][rank]["by_op"]["all_reduce"] >= gradients, counts


def test_the_mode_is_split_by_sae_when_every_rank_gets_an_sae_and_data_parallel_otherwise():
    """`choose_mode`: unset, `sae` with at least one SAE per rank, else `data`; `sae` asked of too few SAEs, and a
    mode that does not exist, are refused with errors naming the value."""
    with mock.patch.object(by_sae, "world_size", return_value=4):
        assert by_sae.choose_mode(None, 4) == "sae"
        assert by_sae.choose_mode("data", 8) == "data"
        assert by_sae.choose_mode(None, 3) == "data"
        with pytest.raises(ValueError, match="this sweep has 3 SAE\\(s\\) for 4 ranks; expected sweep_parallel: data"):
            by_sae.choose_mode("sae", 3)
    assert by_sae.choose_mode("sae", 1) == "data"  # one process: the two modes are the same
    saes = {"a": {"architecture": "topk", "k": 4, "d_in": 8, "d_sae": 16}}
    with pytest.raises(ValueError, match="sweep_parallel='model' is not a mode; expected 'sae' or 'data'"):
        build_sweep({"hook_name": "h", "sweep_parallel": "model"}, saes)
    assert build_sweep({"hook_name": "h", "sweep_parallel": "data"}, saes).parallel == "data"
