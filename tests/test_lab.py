"""eval/lab, the experiment framework of eval/'s commands: the pieces the commands' own tests do not reach alone."""

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "eval"))  # as when the commands run

from lab.activations import cached_activations, spread_sample
from lab.saes import ARCHITECTURES
from lab.stages import CHECKPOINT_RUN, resume_point, stage
from lab.tables import fixed, write_csv
from lab.training import learning_rate_then_k_sweep


def test_a_stage_resumes_from_its_last_checkpoint_only_when_it_was_written_for_the_same_inputs(tmp_path):
    folder = tmp_path / "k32-s42-checkpoints"
    assert resume_point(folder, {"lr": 1e-3}) is None  # nothing saved yet
    for step in ("512", "2048", "1024"):
        (folder / CHECKPOINT_RUN / step).mkdir(parents=True)
    assert resume_point(folder, {"lr": 1e-3}).name == "2048"  # numbered, not sorted as text
    assert resume_point(folder, {"lr": 3e-3}) is None  # another run's checkpoints: deleted
    assert not (folder / CHECKPOINT_RUN).exists() and (folder / "inputs.json").exists()


def test_a_stage_hands_on_its_result_as_read_back_and_reruns_only_for_changed_inputs(tmp_path):
    calls = []

    def compute():
        calls.append(1)
        return {"k_hat": np.array([1.5, 2.0]), "pair": (np.float32(0.25), 3), "by_k": {8: "a"}}

    with tqdm(disable=True) as bar:
        fresh = stage(tmp_path, "s", bar, compute, {"lrs": (1e-3,)})
        again = stage(tmp_path, "s", bar, compute, {"lrs": (1e-3,)})
        assert len(calls) == 1  # read back, not computed again
        stage(tmp_path, "s", bar, compute, {"lrs": (3e-3,)})
    assert len(calls) == 2  # another input: computed again
    # The fresh result is the one a later run reads back: arrays and tuples as lists, keys as strings.
    assert {key: value for key, value in fresh.items() if key != "seconds"} == {
        "lrs": [1e-3], "k_hat": [1.5, 2.0], "pair": [0.25, 3], "by_k": {"8": "a"}
    }  # fmt: skip
    assert again == fresh


def test_the_sweep_trains_each_architectures_other_ks_only_at_the_rate_that_scored_best():
    trained = []

    def train(arch, k, lr):
        trained.append((arch, k, lr))
        best = {"softsae": 3e-3}.get(arch, 1e-3)
        return {"arch": arch, "k": k, "lr": lr, "summary": {"fve": 1 - abs(lr - best)}}

    with tqdm(disable=True) as bar:
        runs, best_lr, main = learning_rate_then_k_sweep(train, (1e-3, 3e-3), 16, (8, 16, 32), bar, "test")
    assert best_lr == {arch: 3e-3 if arch == "softsae" else 1e-3 for arch in ARCHITECTURES}
    assert len(runs) == 2 * len(ARCHITECTURES)  # the sweep's runs, at k 16
    assert set(main) == {(arch, k) for arch in ARCHITECTURES for k in (8, 16, 32)}
    assert all(run["lr"] == best_lr[arch] for (arch, _), run in main.items())
    assert len(trained) == len(ARCHITECTURES) * (2 + 2)  # k 16 is not trained again at its chosen rate


def _cache(tmp_path, rows=4, context=5, d=3):
    from datasets import Dataset

    ids = torch.arange(rows * context).reshape(rows, context) % 7
    acts = torch.arange(rows * context * d, dtype=torch.float32).reshape(rows, context, d)
    Dataset.from_dict({"hook": acts.numpy(), "token_ids": ids.numpy()}).save_to_disk(str(tmp_path / "cache"))
    return tmp_path / "cache", acts, ids


def test_cached_activations_are_one_entry_per_token_with_positions_and_special_tokens_masked(tmp_path):
    cache, acts, ids = _cache(tmp_path)
    read = cached_activations(cache, "hook", special=[0])
    assert torch.equal(read["acts"], acts.reshape(-1, 3)) and torch.equal(read["ids"], ids.reshape(-1))
    assert read["positions"].tolist() == list(range(5)) * 4
    assert torch.equal(read["keep"], ids.reshape(-1) != 0)
    some = cached_activations(cache, "hook", special=[0], rows=[3, 1])
    assert torch.equal(some["acts"], torch.cat([acts[3], acts[1]]))


def test_a_spread_sample_takes_whole_rows_from_the_whole_cache_without_special_tokens(tmp_path):
    cache, acts, ids = _cache(tmp_path)
    sample = spread_sample(cache, "hook", 6, special=[0])
    # 6 tokens: 2 rows of 5, spread from the first to the last (rows 0 and 3), their non-special tokens, cut to 6.
    expected = torch.cat([acts[0][ids[0] != 0], acts[3][ids[3] != 0]])[:6]
    assert torch.equal(sample, expected)


@pytest.mark.parametrize(
    ("value", "missing", "text"),
    [(0.12345, "n/a", "0.123"), (np.float32(0.5), "nan", "0.500"), (math.nan, "nan", "nan"), (None, "n/a", "n/a")],
)
def test_a_number_is_written_with_fixed_decimals_and_a_missing_one_as_its_report_says(value, missing, text):
    assert fixed(value, 3, missing) == text


def test_a_csv_row_without_a_column_leaves_its_cell_empty(tmp_path):
    path = write_csv(tmp_path / "t.csv", [{"a": 1.5, "b": "x"}, {"b": "y"}], ["a", "b"], lambda v: v)
    assert path.read_text().splitlines() == ["a,b", "1.5,x", ",y"]
