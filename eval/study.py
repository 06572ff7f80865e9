"""`make study`: SoftSAE against SAE-Lens' TopK, BatchTopK and Matryoshka BatchTopK at a scale where they converge.

    .venv/bin/python eval/study.py                       # full study -> eval/STUDY.md, eval/study/*.png
    .venv/bin/python eval/study.py --scale tiny --work /tmp/s --report /tmp/s/STUDY.md   # smoke test (minutes)

SmolLM2-135M (offline GGUF), `blocks.6.hook_resid_post`, English text from installed packages (gensim's Wikipedia
sample and Lee news corpus; every 10th paragraph or article held out, never trained on). Stages, each saved when it
finishes and skipped when run again (a stage cut short resumes from its last checkpoint):

  text      the training and held-out token rows; the held-out rows split into a test set (every reported number)
            and a validation set (the learning-rate choice only)
  cache     their activations, once, with SAE-Lens' CacheActivationsRunner
  lr        a learning-rate sweep at k = 32, all four architectures in one sweep (SAE-Lens' multi trainer), each
            architecture's rate picked on the validation set
  k16/k32/k64, k32-seed43   the main runs: one sweep per k (a second seed at k = 32), 10 checkpoints each
  curves    held-out FVE and SAE-Lens' dead fraction at every checkpoint; the convergence verdict
  measures  held-out FVE, mean L0 (held out and on training tokens), loss recovered (SAE-Lens' evals), k_hat and
            adaptivity for SoftSAE
  absorption  SAEBench's absorption and splitting through `sae-lens eval` at k = 32, both seeds; the first-letter
            probe trains on 3,000 of the vocabulary's alphabetic tokens (the full vocabulary's 47,078 would take
            the study past its 2.5 h; eval/results/study-absorption-full-vocab holds the seed 42 SAEs on it)
Stages remember their inputs: a changed learning-rate grid or pick reruns the stages it feeds.
A run counts as converged when its dead fraction is below 5% and its held-out FVE moves by less than 0.002 over 10%
of its tokens, read from a line fitted through the checkpoints of the last 40% (the two-point difference over the
last 10% is reported beside it); only converged runs are compared.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from lab import REPO
from lab.activations import CACHE_BATCH_ROWS, cache_activations, cached_activations
from lab.measures import lm_adaptivity, loss_recovered, training_curve
from lab.saes import ARCHITECTURES, k_hat_of, sae_config
from lab.stages import CHECKPOINT_RUN, resume_point, stage, stage_seconds
from lab.text import mixed_token_rows
from study_report import converged, per_letter_absorption, write_report
from tqdm.auto import tqdm

from softsae_plugin.training.summary import summarise


@dataclass(frozen=True)
class StudyScale:
    """Every size of the study; `SCALES` holds the full study and a smoke-test size."""

    layer: int
    d_sae: int
    ks: tuple[int, ...]
    sweep_k: int
    lrs: tuple[float, ...]
    sweep_tokens: int
    training_tokens: int
    batch: int
    seeds: tuple[int, ...]  # the first trains every k; the others k = sweep_k only
    heldout_rows: int  # context rows of held-out text for FVE, L0 and the curves
    lm_eval_batches: int  # loss recovered: batches of lm_eval_prompts held-out rows
    lm_eval_prompts: int
    n_checkpoints: int = 9  # at 10%, 20%, ... 90% of the tokens, and the final one
    dead_window_steps: int = 250
    absorption_vocab_size: int | None = None  # None: SAEBench's full first-letter vocabulary
    absorption_settings: tuple[str, ...] = ()  # `sae-lens eval --set` overrides of SAEBench's absorption config
    # A committed `sae-lens eval` folder (repo-relative) with some k = sweep_k SAEs on the full vocabulary, run
    # outside the study's time budget; the report sets it beside the reduced-vocabulary numbers.
    full_vocab_check: str | None = None
    context_size: int = 128
    train_rows: int | None = None  # None: every training row of the text; else its first rows (a multiple of 128)
    # The learning rate is constant after its warm-up, and SoftSAE's hard phase covers the last fifth of the run,
    # so that the last 10% of every run, where convergence is judged, is at a steady rate in a steady phase.
    lr_decay_fraction: float = 0.0
    softsae_hard_fraction: float = 0.2


SCALES = {
    "full": StudyScale(
        layer=6,
        d_sae=2304,
        ks=(16, 32, 64),
        sweep_k=32,
        lrs=(3e-4, 1e-3, 3e-3, 1e-2),
        sweep_tokens=204_800,
        training_tokens=2_048_000,
        batch=1024,
        seeds=(42, 43),
        heldout_rows=128,
        lm_eval_batches=2,
        lm_eval_prompts=8,
        # SAEBench's probe reads one prompt per alphabetic token: its full vocabulary (47,078 SmolLM2 tokens) is
        # 15.7 times the 3,000 here, which would take the study past its 2.5 h.
        absorption_vocab_size=3000,
        absorption_settings=("max_k_value=5",),
        full_vocab_check="eval/results/study-absorption-full-vocab",
    ),
    "tiny": StudyScale(
        layer=2,
        d_sae=576,
        ks=(8, 16),
        sweep_k=16,
        lrs=(1e-3, 3e-3),
        sweep_tokens=10_240,
        training_tokens=20_480,
        batch=512,
        seeds=(42, 43),
        heldout_rows=16,
        lm_eval_batches=1,
        lm_eval_prompts=2,
        dead_window_steps=10,
        train_rows=256,
        # tests/test_eval.py's small-vocabulary settings, under which SAEBench's probe is good enough to proceed
        absorption_vocab_size=520,
        absorption_settings=(
            "prompt_template={word}:",
            "prompt_token_pos=-2",
            "max_k_value=3",
            "k_sparse_probe_num_epochs=10",
            "min_feats_for_eval=3",
        ),
    ),
}


SPLITS = ("train", "heldout", "validation")
EVAL_DATA = {
    "heldout": "held-out text (test set): every 10th Wikipedia paragraph and Lee article, never trained on",
    "validation": "held-out text (validation set): other held-out rows than the test set's, never trained on",
}


# ---------------------------------------------------------------------------------------------------------------
# Training: one sweep per stage, resumable from its checkpoints


def run_names(k: int, seed: int) -> dict[str, str]:
    """Architecture -> SAE name within a training stage."""
    return {arch: f"{arch}-k{k}-s{seed}" for arch in ARCHITECTURES}


def train_stage(
    name: str,
    saes: dict[str, tuple[str, int, float]],
    tokens: int,
    seed: int,
    scale: StudyScale,
    data: dict[str, Any],
    work: Path,
    checkpoints: bool,
    measure_on: str = "heldout",
    overrides: dict[str, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """One sweep (`softsae_plugin.sweep.train_sweep_on_activations`: SAE-Lens' multi trainer, the same batches for
    every SAE, each at its own learning rate): `saes` maps SAE name -> (architecture, k, lr); each SAE's summary is
    measured on `data[measure_on]` (the test set, or the validation set of the learning-rate choice); `overrides`:
    SAE name -> config options of its own. Continues from the stage's last checkpoint when one exists."""
    from sae_lens.saes.sae import SAEMetadata

    from softsae_plugin.offline.smollm2 import SMOLLM2_ID
    from softsae_plugin.training.sweep import build_sweep, train_sweep_on_activations

    hook = f"blocks.{scale.layer}.hook_resid_post"
    metadata = SAEMetadata(model_name=SMOLLM2_ID, hook_name=hook, context_size=scale.context_size, prepend_bos=True)
    steps = tokens // scale.batch
    options: dict[str, dict[str, Any]] = {}
    for sae_name, (arch, k, lr) in saes.items():
        own = {"k_max": 3 * k, "hard_topk_steps": round(scale.softsae_hard_fraction * steps)}
        own = {**(own if arch == "softsae" else {}), **(overrides or {}).get(sae_name, {})}
        cfg = sae_config(arch, data["d_in"], scale.d_sae, k, **own)
        options[sae_name] = {"architecture": arch, **_fields(cfg), "metadata": metadata, "lr": lr}
    out, checkpoint_path = work / name, work / f"{name}-checkpoints"
    shared = {
        "hook_name": hook,
        "model_name": SMOLLM2_ID,
        "training_tokens": steps * scale.batch,
        "train_batch_size_tokens": scale.batch,
        "lr_warm_up_steps": steps // 20,
        "lr_decay_steps": round(scale.lr_decay_fraction * steps),
        "dead_feature_window": scale.dead_window_steps,
        "feature_sampling_window": scale.dead_window_steps,
        "n_batches_for_norm_estimate": 20,
        "seed": seed,
        "device": "cpu",
        "checkpoint_path": str(checkpoint_path) if checkpoints else None,
        "n_checkpoints": scale.n_checkpoints if checkpoints else 0,
        "output_path": str(out),
        "log_to_wandb": False,
        "wandb_id": CHECKPOINT_RUN,
    }
    sweep = build_sweep(shared, options)
    resume = resume_point(checkpoint_path, stage_inputs(saes, tokens, scale, overrides)) if checkpoints else None
    if resume is not None:
        sweep.runner.resume_from_checkpoint = str(resume)
    shutil.rmtree(out, ignore_errors=True)  # a folder left by a run cut short while saving
    train_sweep_on_activations(data["train"], sweep, eval_activations=data[measure_on], eval_data=EVAL_DATA[measure_on])
    return {"resumed_from": None if resume is None else resume.name}  # `stage` saves the inputs beside it


def _rows_after(n: int, total: int) -> range:
    """The validation rows: the `n` held-out rows after the first `n` (the test set), as many as there are."""
    if total < 2 * n:
        raise ValueError(f"the held-out text has {total} rows; the study needs {2 * n} (test and validation sets)")
    return range(n, 2 * n)


def stage_inputs(
    saes: dict[str, tuple[str, int, float]],
    tokens: int,
    scale: StudyScale,
    overrides: dict[str, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """What a training stage's result depends on: each SAE's architecture, k and learning rate (and its own config
    options, where it has any), the tokens and the schedule."""
    return {
        **({"overrides": overrides} if overrides else {}),
        "saes": {n: {"arch": a, "k": k, "lr": lr} for n, (a, k, lr) in saes.items()},
        "tokens": tokens // scale.batch * scale.batch,
        "schedule": {
            "lr_decay_fraction": scale.lr_decay_fraction,
            "softsae_hard_fraction": scale.softsae_hard_fraction,
        },
    }


def _fields(cfg: Any) -> dict[str, Any]:
    # The config's own fields as keyword arguments (metadata and the run length are set by the sweep).
    skip = {"metadata", "total_training_steps"}
    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.name not in skip}


# ---------------------------------------------------------------------------------------------------------------
# The study


def run(scale_name: str, work: Path, report: Path, plots: Path) -> dict[str, Any]:
    """Run (or continue) every stage at `scale_name` and write the report and plots."""
    from sae_lens import SAE
    from sae_lens.util import get_special_token_ids

    from softsae_plugin.offline.smollm2 import SMOLLM2_ID, load_smollm2

    scale = SCALES[scale_name]
    work.mkdir(parents=True, exist_ok=True)
    (work / "scale.json").write_text(json.dumps(dataclasses.asdict(scale)) + "\n")
    hook = f"blocks.{scale.layer}.hook_resid_post"
    main_stages = [(k, scale.seeds[0]) for k in scale.ks] + [(scale.sweep_k, s) for s in scale.seeds[1:]]
    n_stages = 5 + len(main_stages) + 1
    start = time.perf_counter()
    with tqdm(total=n_stages, desc="study", unit="stage") as bar:
        model = load_smollm2()
        special = get_special_token_ids(model.tokenizer)

        def text() -> dict[str, Any]:
            for split in ("train", "heldout"):
                # Whole cache buffers of 16 model batches (cache_activations sizes its buffers to divide the rows).
                rows = mixed_token_rows(model.tokenizer, split, scale.context_size, 16 * CACHE_BATCH_ROWS)
                rows.save_to_disk(str(work / f"rows-{split}"))
            return {}

        stage(work, "text", bar, text)
        from datasets import load_from_disk

        rows = {split: load_from_disk(str(work / f"rows-{split}")) for split in ("train", "heldout")}
        # The held-out text's first rows are the reported test set; the next as many are the validation set the
        # learning rate is chosen on, so that no reported number is measured on the rows that chose it.
        rows["validation"] = rows["heldout"].select(_rows_after(scale.heldout_rows, len(rows["heldout"])))
        rows["heldout"] = rows["heldout"].select(range(min(scale.heldout_rows, len(rows["heldout"]))))
        if scale.train_rows is not None:
            rows["train"] = rows["train"].select(range(min(scale.train_rows, len(rows["train"]))))

        def cache() -> dict[str, Any]:
            for split in SPLITS:
                folder = work / f"cache-{split}"
                cache_activations(
                    model, rows[split], folder, hook, context_size=scale.context_size, seed=scale.seeds[0]
                )
            return {split: len(rows[split]) * scale.context_size for split in rows}

        cache_result = stage(work, "cache", bar, cache, {"splits": SPLITS})
        train_cache = cached_activations(work / "cache-train" / "cache", hook, special)
        heldout_cache = cached_activations(work / "cache-heldout" / "cache", hook, special)
        validation_cache = cached_activations(work / "cache-validation" / "cache", hook, special)
        data = {
            "d_in": model.cfg.d_model,
            "train": train_cache["acts"][train_cache["keep"]],
            "heldout": heldout_cache["acts"][heldout_cache["keep"]],
            "validation": validation_cache["acts"][validation_cache["keep"]],
        }
        del validation_cache
        del train_cache["acts"]

        sweep = {f"{arch}-lr{lr:g}": (arch, scale.sweep_k, lr) for arch in ARCHITECTURES for lr in scale.lrs}

        def lr_sweep() -> dict[str, Any]:
            result = train_stage(
                "lr", sweep, scale.sweep_tokens, scale.seeds[0], scale, data, work, False, measure_on="validation"
            )
            fve = {n: json.loads((work / "lr" / n / "training_summary.json").read_text())["fve"] for n in sweep}
            return {**result, "fve": fve}

        lrs = stage(
            work, "lr", bar, lr_sweep, {**stage_inputs(sweep, scale.sweep_tokens, scale), "measured_on": "validation"}
        )
        lrs["best_lr"] = {a: max(scale.lrs, key=lambda lr, a=a: lrs["fve"][f"{a}-lr{lr:g}"]) for a in ARCHITECTURES}
        for k, seed in main_stages:
            names = run_names(k, seed)
            saes = {names[arch]: (arch, k, lrs["best_lr"][arch]) for arch in ARCHITECTURES}
            stage(
                work,
                f"k{k}-s{seed}",
                bar,
                lambda saes=saes, k=k, seed=seed: train_stage(
                    f"k{k}-s{seed}", saes, scale.training_tokens, seed, scale, data, work, True
                ),
                stage_inputs(saes, scale.training_tokens, scale),
            )
        picked = {"best_lr": lrs["best_lr"]}

        def curves() -> dict[str, Any]:
            result = {}
            for k, seed in main_stages:
                for arch, name in run_names(k, seed).items():
                    final = json.loads((work / f"k{k}-s{seed}" / name / "training_summary.json").read_text())
                    points = training_curve(
                        name,
                        work / f"k{k}-s{seed}-checkpoints",
                        data["heldout"],
                        scale.dead_window_steps,
                        final,
                        json.loads((work / f"k{k}-s{seed}.json").read_text())["tokens"],
                    )
                    ok, move = converged(points, final)
                    result[name] = {
                        "arch": arch,
                        "k": k,
                        "seed": seed,
                        "points": points,
                        "converged": ok,
                        "fve_move_last_10pct": move,
                        "final_dead_fraction": final["dead_fraction"],
                    }
            return {"runs": result}

        curve_result = stage(work, "curves", bar, curves, picked)

        def measures() -> dict[str, Any]:
            heldout_tokens = rows["heldout"].with_format("torch")["input_ids"]
            train_sample = data["train"][torch.linspace(0, len(data["train"]) - 1, 16384).long()]
            result: dict[str, Any] = {}
            for k, seed in main_stages:
                for arch, name in run_names(k, seed).items():
                    sae = SAE.load_from_disk(str(work / f"k{k}-s{seed}" / name))
                    summary = json.loads((work / f"k{k}-s{seed}" / name / "training_summary.json").read_text())
                    entry = {
                        "arch": arch,
                        "k": k,
                        "seed": seed,
                        "summary": summary,
                        "train_sample_l0": summarise(sae, [train_sample])[0]["mean_l0"],
                    }
                    if seed == scale.seeds[0]:
                        batches = {"n_batches": scale.lm_eval_batches, "prompts": scale.lm_eval_prompts}
                        entry["recovered"] = loss_recovered(sae, model, heldout_tokens, special, **batches)
                    if arch == "softsae" and seed == scale.seeds[0]:
                        train_ids = train_cache["ids"][train_cache["keep"]]
                        entry["adaptivity"] = lm_adaptivity(sae, heldout_cache, train_ids, model)
                        entry["k_hat"] = k_hat_of(sae, data["heldout"]).tolist()
                    result[name] = entry
            return {"runs": result}

        measured = stage(work, "measures", bar, measures, picked)

        def absorption() -> dict[str, Any]:
            folders = [
                work / f"k{scale.sweep_k}-s{seed}" / run_names(scale.sweep_k, seed)[arch]
                for seed in scale.seeds
                for arch in ARCHITECTURES
            ]
            out = work / "absorption"
            vocab = (
                []
                if scale.absorption_vocab_size is None
                else ["--absorption-vocab-size", str(scale.absorption_vocab_size)]
            )
            command = [
                str(Path(sys.executable).with_name("sae-lens")),
                "eval",
                "--evals",
                "absorption,splitting",
                *(arg for f in folders for arg in ("--sae", str(f))),
                "--model",
                SMOLLM2_ID,
                "--out",
                str(out),
                "--no-checkpoint-eval",
                *vocab,
                *(arg for setting in scale.absorption_settings for arg in ("--set", f"absorption.{setting}")),
            ]
            subprocess.run(command, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
            with (out / "summary.csv").open() as f:
                rows = list(csv.DictReader(f))
            return {"command": " ".join(command[1:]), "rows": rows, "per_letter": per_letter_absorption(out)}

        absorbed = stage(work, "absorption", bar, absorption, picked)
    results = {
        "scale": dataclasses.asdict(scale),
        "scale_name": scale_name,
        "hook": hook,
        "cache": cache_result,
        "lr": lrs,
        "curves": curve_result,
        "measures": measured,
        "absorption": absorbed,
        "seconds_this_call": time.perf_counter() - start,
        **stage_seconds(work),
    }
    write_report(results, report, plots)
    return results


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: --scale full|tiny, --work (stages, caches, SAEs), --report, --plots, --threads."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scale", default="full", choices=sorted(SCALES))
    parser.add_argument("--work", type=Path, default=None, help="stage results and SAEs (default: runs/study-SCALE)")
    parser.add_argument("--report", type=Path, default=REPO / "eval" / "STUDY.md")
    parser.add_argument("--plots", type=Path, default=None, help="PNG folder (default: REPORT's folder/study)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own)")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    work = args.work or REPO / "runs" / f"study-{args.scale}"
    plots = args.plots or args.report.parent / "study"
    run(args.scale, work, args.report, plots)
    print(f"wrote {args.report} and the plots in {plots}")


if __name__ == "__main__":
    main()
