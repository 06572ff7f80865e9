"""eval/reproduce.py (issue 6): the pure helpers it takes from eval/lab, and the whole command at its smoke-test
scale."""

import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parent.parent / "eval" / "reproduce.py"
ARCHITECTURES = ("softsae", "topk", "batchtopk", "matryoshka_batchtopk")
sys.path.insert(0, str(SCRIPT.parent))  # eval/, as when the command runs: its framework `lab` and its modules

import reproduce  # noqa: E402
from lab.activations import synthetic_activations  # noqa: E402
from lab.measures import dictionary_recovery, matched_fve  # noqa: E402
from lab.text import split_sentences  # noqa: E402


def test_matched_fve_interpolates_inside_the_sweep():
    fve, extrapolated = matched_fve(15.0, [20.0, 10.0, 40.0], [0.8, 0.7, 0.9])
    assert fve == pytest.approx(0.75) and not extrapolated
    assert matched_fve(10.0, [10.0, 20.0], [0.7, 0.8]) == (pytest.approx(0.7), False)


def test_matched_fve_extends_the_nearest_segment_outside_the_sweep():
    # np.interp would clamp to 0.7 and 0.9; the nearest segment's line is extended instead.
    below, flagged_below = matched_fve(5.0, [10.0, 20.0, 40.0], [0.7, 0.8, 0.9])
    above, flagged_above = matched_fve(60.0, [10.0, 20.0, 40.0], [0.7, 0.8, 0.9])
    assert below == pytest.approx(0.65) and flagged_below
    assert above == pytest.approx(1.0) and flagged_above


@pytest.mark.parametrize(("l0s", "fves"), [([10.0], [0.5]), ([10.0, 20.0], [0.5])])
def test_matched_fve_rejects_a_sweep_it_cannot_interpolate(l0s, fves):
    with pytest.raises(ValueError, match="matched_fve: expected >= 2 reference points"):
        matched_fve(12.0, l0s, fves)


def test_synthetic_inputs_hold_exactly_their_true_count_of_directions():
    # With more dimensions than directions the coefficients are recoverable by least squares.
    x, counts, directions = synthetic_activations(500, 48, 24, 6, seed=3, normalise=False)
    assert counts.min() >= 1 and counts.max() <= 6 and set(counts.tolist()) == set(range(1, 7))
    coefficients = torch.linalg.lstsq(directions.T.double(), x.T.double()).solution.T
    assert torch.equal((coefficients.abs() > 1e-6).sum(-1), counts)
    used = coefficients[coefficients.abs() > 1e-6]
    assert used.min() >= 0.5 - 1e-6 and used.max() <= 1.5 + 1e-6
    assert torch.allclose(directions.norm(dim=-1), torch.ones(24))


def test_normalised_synthetic_inputs_share_one_norm_and_keep_the_same_counts():
    x, counts, _ = synthetic_activations(300, 16, 32, 8, seed=0, normalise=True)
    _, natural_counts, _ = synthetic_activations(300, 16, 32, 8, seed=0, normalise=False)
    assert torch.allclose(x.norm(dim=-1), torch.full((300,), 4.0))
    assert torch.equal(counts, natural_counts)


def test_synthetic_activations_rejects_a_count_above_the_directions():
    with pytest.raises(ValueError, match="max_count=9"):
        synthetic_activations(10, 4, 8, 9, seed=0, normalise=False)


def test_dictionary_recovery_is_one_for_the_same_directions_in_any_order_and_scale():
    directions = torch.nn.functional.normalize(torch.randn(10, 6, generator=torch.Generator().manual_seed(1)), dim=-1)
    decoder = torch.cat([3 * directions.flip(0), torch.randn(5, 6)])
    assert dictionary_recovery(directions, decoder) == pytest.approx(1.0)
    assert dictionary_recovery(directions, torch.randn(10, 6)) < 1.0


def test_split_sentences_keeps_whole_sentences_of_the_allowed_length():
    text = 'Short one. This sentence has exactly six words. "Quoted text starts here and goes on." Too few!'
    assert split_sentences(text) == [
        "This sentence has exactly six words.",
        '"Quoted text starts here and goes on."',
    ]


def test_scales_share_every_section_and_the_full_scale_meets_the_issue():
    full = reproduce.SCALES["full"]
    assert full.emb_d_sae_factor == 8 and len(full.emb_ks) >= 4 and len(full.lm_ks) >= 3 and len(full.lrs) >= 3
    assert set(reproduce.SCALES) == {"tiny", "full"}


def test_each_section_records_the_settings_it_reads_so_a_change_reruns_only_the_sections_that_read_it():
    tiny = reproduce.SCALES["tiny"]
    # A changed setting -> the sections whose stage inputs it changes (those run again; the others are read back).
    reruns = {
        ("lm_steps", 21): {"lm"},
        ("synth_batch", 128): {"synth"},
        ("n_texts", 320): {"emb"},
        ("lrs", (1e-3,)): {"emb", "lm"},
        ("seed", 7): {"synth", "emb", "lm"},
    }
    for (field, value), sections in reruns.items():
        other = dataclasses.replace(tiny, **{field: value})
        changed = {
            key
            for key, (_, _, fields) in reproduce.SECTIONS.items()
            if reproduce.section_inputs(other, *fields) != reproduce.section_inputs(tiny, *fields)
        }
        assert changed == sections, field


@pytest.mark.slow
def test_tiny_reproduction_writes_the_report_plots_and_finite_tables_and_a_rerun_reads_every_section_back(tmp_path):
    out, report, work = tmp_path / "report", tmp_path / "REPORT.md", tmp_path / "work"
    command = [sys.executable, str(SCRIPT), "--scale", "tiny", "--threads", "1", "--out", str(out), "--report",
               str(report), "--work", str(work)]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    text = report.read_text()
    _rerun_reads_every_section_back(command, env, work, [report, out / "results.json"])
    for heading in ("## f. Goals", "## a. Embedding", "## b. Language-model", "## c. Sparsity", "## d. Adaptivity",
                    "## e. Ablations"):  # fmt: skip
        assert heading in text
    before_adaptivity = text.split("## d. Adaptivity")[0]
    cells = [
        cell.strip() for line in before_adaptivity.splitlines() if line.startswith("|") for cell in line.split("|")
    ]
    assert "nan" not in cells
    for png in ("embedding_frontier", "lm_frontier", "embedding_k_hat", "lm_k_hat", "synthetic_k_hat"):
        assert (out / f"{png}.png").stat().st_size > 1000
        assert f"report/{png}.png" in text  # linked relative to the report
    results = json.loads((out / "results.json").read_text())
    for setting, ks in (("emb", reproduce.SCALES["tiny"].emb_ks), ("lm", reproduce.SCALES["tiny"].lm_ks)):
        for arch in ARCHITECTURES:
            for k in ks:
                summary = results[setting]["main"][f"{arch} {k}"]["summary"]
                assert math.isfinite(summary["fve"]) and summary["mean_l0"] > 0, (setting, arch, k)
                if setting == "lm":
                    assert math.isfinite(results[setting]["main"][f"{arch} {k}"]["recovered"]["ce_loss_score"])
    for setting, k in (("emb", reproduce.SCALES["tiny"].emb_ks[0]), ("lm", reproduce.SCALES["tiny"].lm_ks[0])):
        summary = results[setting]["main"][f"softsae {k}"]["summary"]
        assert summary["train_mean_l0"] > 0  # the L0 the hard phase calibrates, beside the held-out one
    assert set(results["synth"]) == set(reproduce.SYNTHETIC_VARIANTS)
    for name, run in results["synth"].items():
        assert -1 <= run["spearman"] <= 1 and -1 <= run["spearman_positive_codes"] <= 1, name
    assert set(results["emb"]["ablations"]) == {"default", "tau anneal off", "target-k anneal off",
                                                "hard final phase off", "paper budget (softplus)"}  # fmt: skip


def _rerun_reads_every_section_back(command: list[str], env: dict[str, str], work: Path, written: list[Path]):
    """Run `command` again on the same `work` folder: every section's stage is read back (its JSON untouched, no SAE
    trained again) and the `written` files (report, numbers) come out byte for byte as the first run wrote them."""
    first = {path: path.read_text() for path in written}
    stages = {path.name: path.stat().st_mtime_ns for path in work.glob("*.json")}
    assert set(stages) == {f"{name}.json" for name, _, _ in reproduce.SECTIONS.values()}
    trained = [work / folder for folder in ("emb_runs", "lm_runs", "synthetic")]
    for folder in trained:
        shutil.rmtree(folder)  # a section run again would train its SAEs here anew
    again = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-4000:]
    assert {path.name: path.stat().st_mtime_ns for path in work.glob("*.json")} == stages
    assert not any(folder.exists() for folder in trained)
    assert {path: path.read_text() for path in written} == first
