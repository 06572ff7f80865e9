"""eval/study.py (issue 14): the convergence verdict, the held-out text split and the names it reads back."""

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "eval"))  # as when the command runs

import study
import study_report
from lab.saes import ARCHITECTURES
from lab.stages import stage, stage_seconds
from lab.text import lee_articles


def curve(fves, dead=0.0, total=1000):
    # Checkpoints at 10%, 20%, ... (SAE-Lens saves each on the first step past it) and the final point.
    points = [{"tokens": round(total * (i + 1) / len(fves)) + (3 if i < len(fves) - 1 else 0), "fve": f}
              for i, f in enumerate(fves)]  # fmt: skip
    return points, {"dead_fraction": dead}


@pytest.mark.parametrize(
    ("fves", "dead", "fit", "two_point"),
    [
        ([0.5, 0.7, 0.8, 0.85, 0.88, 0.897, 0.898, 0.899, 0.899, 0.900], 0.01, True, True),
        # One checkpoint's jitter (the 90% point): the two-point reading says still moving, the line through the
        # last 40% does not.
        ([0.5, 0.7, 0.8, 0.85, 0.88, 0.897, 0.899, 0.900, 0.896, 0.900], 0.01, True, False),
        # A steady climb of 0.003 per 10% of the tokens: both readings see it.
        ([0.5, 0.7, 0.8, 0.85, 0.88, 0.888, 0.891, 0.894, 0.897, 0.900], 0.01, False, False),
        ([0.5, 0.7, 0.8, 0.85, 0.88, 0.897, 0.898, 0.899, 0.899, 0.900], 0.06, False, False),  # too many dead
    ],
)
def test_convergence_is_read_from_a_line_through_the_last_checkpoints_and_from_two_points(fves, dead, fit, two_point):
    points, final = curve(fves, dead)
    reading = study_report.convergence(points, final)
    assert (reading["fit"], reading["two_point"]) == (fit, two_point)
    assert study_report.converged(points, final) == (fit, reading["fit_move"])
    tail = [p for p in points if p["tokens"] >= 0.6 * points[-1]["tokens"]]
    slope = np.polyfit([p["tokens"] / points[-1]["tokens"] for p in tail], [p["fve"] for p in tail], 1)[0]
    assert reading["fit_move"] == pytest.approx(0.1 * slope)
    assert reading["fit_se"] >= 0


def test_a_run_with_no_checkpoint_cannot_be_called_converged():
    reading = study_report.convergence([{"tokens": 10, "fve": 0.9}], {"dead_fraction": 0.0})
    assert not reading["fit"] and not reading["two_point"] and reading["fit_move"] == math.inf


def letters(fractions, positives=100):
    return {letter: {"fraction": f, "positives": positives} for letter, f in zip("abcdefgh", fractions, strict=False)}


def test_the_paired_letter_comparison_counts_each_letter_and_names_the_one_that_drives_the_mean():
    soft = letters([0.1, 0.2, 0.1, 0.9, 0.0])
    topk = letters([0.2, 0.1, 0.1, 0.1, 0.1])
    pair = study_report.paired_letters(soft, topk)
    assert pair["letters"] == 5 and (pair["lower"], pair["higher"]) == (2, 2)
    assert pair["mean"] == pytest.approx((-0.1 + 0.1 + 0 + 0.8 - 0.1) / 5)
    assert pair["largest"] == "d" and pair["mean_without_largest"] == pytest.approx(-0.1 / 4)
    assert pair["sign_p"] == pytest.approx(1.0)  # 2 of 4 non-zero differences each way
    pair = study_report.paired_letters(letters([0.0] * 6), letters([0.1] * 6))
    assert pair["sign_p"] == pytest.approx(2 / 2**6)  # exact two-sided sign test, every letter lower
    sentence = study_report.paired_sentence(pair, "TopK", "here")
    assert "lower on 6, higher on 0 (sign test p = 0.03)" in sentence


def test_the_absorption_sentences_follow_the_numbers():
    absorb = {("topk", 42): {"absorption": 0.08}, ("matryoshka_batchtopk", 42): {"absorption": 0.28}}
    per_letter = {("softsae", 42): letters([0.1, 0.3]), ("topk", 42): letters([0.1, 0.1])}
    failed = study_report.absorption_context(absorb, per_letter, "the probe")
    assert "SoftSAE minus TopK +0.1000" in failed[0] and "the control **fails**" in failed[1]
    absorb[("matryoshka_batchtopk", 42)] = {"absorption": 0.05}
    per_letter[("softsae", 42)] = letters([0.0, 0.0])
    held = study_report.absorption_context(absorb, per_letter, "the probe")
    assert "SoftSAE minus TopK -0.1000" in held[0] and held[1].endswith("the control holds.")
    scale = {"sweep_k": 32, "d_sae": 2304}
    assert "2,304 latents, at k = 32" in study_report.regime_label(scale)
    assert "65,536 latents, at k = 96" in study_report.regime_label({"sweep_k": 96, "d_sae": 65536})


def test_the_fve_verdict_follows_the_differences_and_the_measured_spread():
    scale = {"seeds": [42, 43], "sweep_k": 32, "ks": [32], "absorption_vocab_size": None}
    runs = {"s": {"arch": "softsae", "k": 32, "seed": 42, "summary": {"mean_l0": 32.0}}}
    results = {"scale": scale, "measures": {"runs": runs}}
    ok = {(a, 32, s): True for a in ARCHITECTURES for s in (42, 43)}
    spread = {"softsae": 0.002, "topk": 0.001}
    ahead = study_report.claims(results, [0.01], spread, {}, ok, {})[1]
    behind = study_report.claims(results, [-0.01], spread, {}, ok, {})[1]
    level = study_report.claims(results, [0.001], spread, {}, ok, {})[1]
    assert ahead.endswith("SoftSAE is ahead.") and behind.endswith("SoftSAE is behind.")
    assert level.endswith("SoftSAE is level (within seed noise).") and "up to 0.0020" in level
    unmeasured = study_report.claims(results, [0.01], {"softsae": math.nan}, {}, ok, {})[1]
    assert "not judged" in unmeasured and "ahead" not in unmeasured


def test_the_limitations_follow_the_settings():
    scale = {"ks": [16, 32, 64], "sweep_k": 32, "layer": 6, "d_sae": 2304, "training_tokens": 2_048_000,
             "lr_decay_fraction": 0.0, "seeds": [42, 43], "lrs": [1e-3, 3e-3]}  # fmt: skip
    text = "\n".join(study_report.limitations({"scale": scale}))
    assert "k up to 64" in text and "constant learning rate" in text and "one at k 16, 64" in text
    decayed = "\n".join(study_report.limitations({"scale": {**scale, "ks": [32, 128], "lr_decay_fraction": 0.2}}))
    assert "k up to 128" in decayed and "decays over the last 20%" in decayed


def test_lee_articles_hold_out_every_tenth_and_train_on_the_rest():
    train, heldout = lee_articles("train"), lee_articles("heldout")
    assert len(heldout) == 29 and len(train) == 264
    assert not set(train) & set(heldout)


def test_absorption_rows_map_each_eval_name_to_its_own_run():
    # sae-lens eval prefixes each SAE with its folder: "batchtopk-..." also ends with the TopK run's name.
    runs = {f"{arch}-k32-s42": {"arch": arch, "seed": 42, "summary": {"mean_l0": 32.0}} for arch in ARCHITECTURES}
    rows = [{"SAE": f"k32-s42-{name}", "mean_absorption_fraction_score": str(i / 10), "mean_num_split_features": "1"}
            for i, name in enumerate(runs)]  # fmt: skip
    absorbed = study_report.absorption_rows({"measures": {"runs": runs}, "absorption": {"rows": rows}})
    assert {arch: r["absorption"] for (arch, _), r in absorbed.items()} == {
        arch: i / 10 for i, arch in enumerate(ARCHITECTURES)
    }


def test_seed_spread_reads_only_converged_runs():
    # Seed 43 of SoftSAE did not converge: its FVE gap to seed 42 is distance from convergence, not seed noise.
    fve = {("softsae", 42): 0.92, ("softsae", 43): 0.90, ("topk", 42): 0.90, ("topk", 43): 0.901}
    runs = {f"{a}-{s}": {"arch": a, "k": 32, "seed": s, "summary": {"fve": v}} for (a, s), v in fve.items()}
    ok = {(a, 32, s): (a, s) != ("softsae", 43) for a in ARCHITECTURES for s in (42, 43)}
    spread = study_report.seed_spread({"scale": {"sweep_k": 32}, "measures": {"runs": runs}}, ok)
    assert math.isnan(spread["softsae"]) and spread["topk"] == pytest.approx(0.001)
    absorb = {key: {"absorption": v} for key, v in fve.items()}
    assert study_report.absorption_spread(absorb, ok, 32) == {"topk": pytest.approx(0.001)}


def test_the_full_vocabulary_check_is_read_by_architecture_and_seed_and_set_beside_the_reduced_numbers(tmp_path):
    (tmp_path / "summary.csv").write_text(
        "SAE,architecture,mean_absorption_fraction_score,mean_num_split_features\n"
        "softsae-k32-s42,softsae,0.25,1.5\n"
        "batchtopk-k32-s42,batchtopk,0.5,\n"  # a metric SAEBench could not compute stays visible as n/a
    )
    full = study_report.full_vocab_rows(tmp_path)
    assert full[("softsae", 42)] == {"absorption": 0.25, "splitting": 1.5}
    assert math.isnan(full[("batchtopk", 42)]["splitting"])
    lines = study_report.full_vocab_section(
        full, {("softsae", 42): {"absorption": 0.75, "splitting": 2.0}}, 3000, "here"
    )
    assert "| SoftSAE | 42 | 0.2500 / 0.7500 | 1.50 / 2.00 |" in lines
    assert "| BatchTopK | 42 | 0.5000 / n/a | n/a / n/a |" in lines
    assert study_report.full_vocab_rows(tmp_path / "absent") == {}


def test_the_absorption_claim_compares_converged_seeds_against_the_spread_of_converged_pairs():
    rows = {("softsae", 42): {"absorption": 0.12}, ("softsae", 43): {"absorption": 0.5},
            ("topk", 42): {"absorption": 0.08}, ("topk", 43): {"absorption": 0.09}}  # fmt: skip
    ok = {(a, 32, s): (a, s) != ("softsae", 43) for a in ARCHITECTURES for s in (42, 43)}
    line = study_report.absorption_claim(rows, ok, 32, [42], "full")
    assert "SoftSAE 0.1200, TopK 0.0800" in line and "up to 0.0100, measured on TopK" in line
    assert line.endswith("**missed**.")  # 0.04 apart: beyond the spread
    rows[("softsae", 42)] = {"absorption": 0.085}
    assert study_report.absorption_claim(rows, ok, 32, [42], "full").endswith("**missed**, within seed noise.")
    assert "not compared" in study_report.absorption_claim(rows, ok, 32, [], "full")


def test_the_full_study_is_at_the_issues_scale():
    full = study.SCALES["full"]
    assert full.training_tokens >= 2_000_000 and full.d_sae == 2304 and full.ks == (16, 32, 64)
    assert full.layer == 6 and len(full.seeds) >= 2 and full.sweep_k == 32 and 1e-2 in full.lrs


def test_a_finished_stage_is_read_back_unless_its_inputs_changed(tmp_path):
    calls = []

    def compute():
        calls.append(1)
        return {"value": len(calls)}

    with tqdm(total=4, disable=True) as bar:
        first = stage(tmp_path, "lr", bar, compute, {"lrs": (1e-3, 3e-3)})
        again = stage(tmp_path, "lr", bar, compute, {"lrs": (1e-3, 3e-3)})
        assert (first["value"], again["value"], len(calls)) == (1, 1, 1)
        changed = stage(tmp_path, "lr", bar, compute, {"lrs": (1e-3, 3e-3, 1e-2)})
    assert changed["value"] == 2 and changed["lrs"] == [1e-3, 3e-3, 1e-2]
    assert json.loads((tmp_path / "lr.json").read_text())["value"] == 2
    assert not list(tmp_path.glob("*.tmp"))  # saved atomically


def test_the_tiny_study_runs_every_stage_writes_its_report_and_skips_finished_stages_when_run_again(tmp_path):
    work, report = tmp_path / "work", tmp_path / "STUDY.md"
    args = ["--scale", "tiny", "--work", str(work), "--report", str(report), "--threads", "1"]
    study.main(args)
    text = report.read_text()
    for heading in ("## Learning rates", "## Convergence", "## FVE, L0 and loss recovered", "## SAEBench absorption",
                    "## What this says about the paper's claims"):  # fmt: skip
        assert heading in text
    assert {p.name for p in (tmp_path / "study").glob("*.png")} == {
        "frontier.png", "training_curves.png", "k_hat.png", "absorption_vs_l0.png"
    }  # fmt: skip
    curves = json.loads((work / "curves.json").read_text())["runs"]
    scale = study.SCALES["tiny"]
    assert len(curves) == len(ARCHITECTURES) * (len(scale.ks) + len(scale.seeds) - 1)
    for run in curves.values():  # the checkpoints in token order, ending at the run's length
        tokens = [p["tokens"] for p in run["points"]]
        assert tokens == sorted(tokens) and tokens[-1] == scale.training_tokens and len(tokens) > 2
    absorbed = json.loads((work / "absorption.json").read_text())["rows"]
    assert len(absorbed) == len(ARCHITECTURES) * len(scale.seeds)
    saved = {p.name: p.stat().st_mtime_ns for p in work.glob("*.json") if p.name != "scale.json"}
    study.main(args)  # every stage finished: read back, none run again
    assert {p.name: p.stat().st_mtime_ns for p in work.glob("*.json") if p.name != "scale.json"} == saved
    assert report.read_text() == text


def test_a_resumed_stage_counts_its_whole_run_from_the_share_its_last_call_trained(tmp_path):
    (tmp_path / "scale.json").write_text('{"ks": [16]}')
    (tmp_path / "cache.json").write_text('{"seconds": 60.0}')
    (tmp_path / "k16-s42.json").write_text('{"seconds": 300.0, "tokens": 2000, "resumed_from": "500"}')
    (tmp_path / "k32-s42.json").write_text('{"seconds": 400.0, "tokens": 2000, "resumed_from": null}')
    timed = stage_seconds(tmp_path)
    assert timed["stage_seconds"] == {"cache": 60.0, "k16-s42": 400.0, "k32-s42": 400.0}
    assert timed["stages_resumed"] == ["k16-s42"]
