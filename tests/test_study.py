"""eval/study.py (issue 14): the convergence verdict, the held-out text split and the names it reads back."""

import importlib.util
import math
import sys
from pathlib import Path

import pytest

EVAL = Path(__file__).resolve().parent.parent / "eval"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, EVAL / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is created
    spec.loader.exec_module(module)
    return module


study = _load("study")


def curve(fves, dead=0.0, total=1000):
    # Checkpoints at 10%, 20%, ... (SAE-Lens saves each on the first step past it) and the final point.
    points = [{"tokens": round(total * (i + 1) / len(fves)) + (3 if i < len(fves) - 1 else 0), "fve": f}
              for i, f in enumerate(fves)]  # fmt: skip
    return points, {"dead_fraction": dead}


@pytest.mark.parametrize(
    ("fves", "dead", "converged", "move"),
    [
        ([0.5, 0.7, 0.8, 0.85, 0.88, 0.89, 0.895, 0.898, 0.899, 0.900], 0.01, True, 0.001),
        ([0.5, 0.7, 0.8, 0.85, 0.88, 0.89, 0.895, 0.898, 0.896, 0.900], 0.01, False, 0.004),  # still moving
        ([0.5, 0.7, 0.8, 0.85, 0.88, 0.89, 0.895, 0.898, 0.899, 0.900], 0.06, False, 0.001),  # too many dead
    ],
)
def test_a_run_converged_when_few_latents_are_dead_and_its_last_tenth_moved_little(fves, dead, converged, move):
    points, final = curve(fves, dead)
    verdict, measured = study.converged(points, final)
    assert verdict is converged
    assert measured == pytest.approx(move)


def test_a_run_with_no_checkpoint_cannot_be_called_converged():
    assert study.converged([{"tokens": 10, "fve": 0.9}], {"dead_fraction": 0.0}) == (False, math.inf)


def test_lee_articles_hold_out_every_tenth_and_train_on_the_rest():
    train, heldout = study.lee_articles("train"), study.lee_articles("heldout")
    assert len(heldout) == 29 and len(train) == 264
    assert not set(train) & set(heldout)


def test_absorption_rows_map_each_eval_name_to_its_own_run():
    # sae-lens eval prefixes each SAE with its folder: "batchtopk-..." also ends with the TopK run's name.
    runs = {f"{arch}-k32-s42": {"arch": arch, "seed": 42, "summary": {"mean_l0": 32.0}} for arch in study.ARCHITECTURES}
    rows = [{"SAE": f"k32-s42-{name}", "mean_absorption_fraction_score": str(i / 10), "mean_num_split_features": "1"}
            for i, name in enumerate(runs)]  # fmt: skip
    absorbed = study.absorption_rows({"measures": {"runs": runs}, "absorption": {"rows": rows}})
    assert {arch: r["absorption"] for (arch, _), r in absorbed.items()} == {
        arch: i / 10 for i, arch in enumerate(study.ARCHITECTURES)
    }


def test_the_full_study_is_at_the_issues_scale():
    full = study.SCALES["full"]
    assert full.training_tokens >= 2_000_000 and full.d_sae == 2304 and full.ks == (16, 32, 64)
    assert full.layer == 6 and len(full.seeds) >= 2 and full.sweep_k == 32 and full.absorption_vocab_size is None
