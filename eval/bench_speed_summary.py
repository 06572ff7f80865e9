"""bench_speed.py's Markdown summary: issue 13's goals met or missed, then every section's table; and the results of
an earlier run read back from its files."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

from bench_speed_settings import CHEAP_HEAD, GOALS, LABELS, PREFIX, SHAPES, SOFTSAE_PHASES, K
from bench_speed_smollm2 import QUALITY_D_SAE, QUALITY_K, QUALITY_K_MAX
from bench_speed_soft_topk import TAU, TOPK_LABELS, TOPK_METHODS
from lab.tables import md_table


def _status(value: float, goal: float) -> str:
    return "n/a" if math.isnan(value) else ("met" if value <= goal else "**missed**")


def goal_rows(steps: list[dict[str, Any]], topk_rows: list[dict[str, Any]]) -> list[list[Any]]:
    """One row per goal of issue 13: what was measured (median of per-round ratios, with their interquartile range),
    the matmul floor, the target, met or missed."""
    out: list[list[Any]] = []
    for shape in SHAPES:
        sub = {r["key"]: r for r in steps if r.get("shape") == shape}
        if not sub:
            continue
        where = f"{sub['topk']['d_in']}/{sub['topk']['d_sae']}, batch {sub['topk']['batch']}"
        checks = [(f"{p}_{head}", f"soft phase ({p}), {label} / TopK", f"soft_{head}")
                  for head, label in (("paper", "paper head"), ("cheap", f"head {CHEAP_HEAD}"))
                  for p in ("start", "mid", "final")]  # fmt: skip
        checks += [("hard_paper", "hard phase, paper head / TopK", "gemma_hard" if shape == "gemma" else "hard_paper"),
                   ("hard_cheap", f"hard phase, head {CHEAP_HEAD} / TopK",
                    "gemma_hard" if shape == "gemma" else "hard_cheap")]  # fmt: skip
        if shape == "gemma":
            checks += [
                ("infer_paper", "inference encode + decode, paper head / TopK", "infer_paper"),
                ("infer_cheap", f"inference encode + decode, head {CHEAP_HEAD} / TopK", "infer_cheap"),
            ]
        for key, what, goal in checks:
            if key in sub:
                r = sub[key]
                spread = f"{r['ratio_q1']:.2f}-{r['ratio_q3']:.2f}" if "ratio_q1" in r else ""
                out.append([f"{what} ({where})", r["ratio_vs_topk"], spread, r.get("floor_ratio_vs_topk", ""),
                            GOALS[goal], _status(r["ratio_vs_topk"], GOALS[goal])])  # fmt: skip
        soft = [r for r in sub.values() if r["model"].startswith("softsae") and r["phase"] in SOFTSAE_PHASES]
        if soft:
            worst = max(soft, key=lambda r: r["peak_ratio_vs_topk"])
            out.append([f"peak memory / TopK, worst softsae case {worst['key']} ({where})",
                        worst["peak_ratio_vs_topk"], "", "", GOALS["memory"],
                        _status(worst["peak_ratio_vs_topk"], GOALS["memory"])])  # fmt: skip
    if topk_rows:
        goal_n = max(r["rows"] for r in topk_rows if r["n"] == 16384)
        at = {r["method"]: r for r in topk_rows if r["n"] == 16384 and r["rows"] == goal_n}
        for method in ("fast_fused_product", "fast_product"):
            if method in at:
                ratio = at[method]["ratio_vs_torch_topk"]
                out.append([f"{TOPK_LABELS[method]} / torch.topk (n 16384, {goal_n} rows, k {K})", ratio, "", "",
                            GOALS["soft_topk"], _status(ratio, GOALS["soft_topk"])])  # fmt: skip
    return out


def write_summary(results: dict[str, Any], info: dict[str, Any], out_dir: Path) -> str:
    """The Markdown summary (goals first, then every section's table); written and returned."""
    steps, topk_rows = results.get("steps", []), results.get("soft_topk", [])
    lines = [
        f"Machine: {info['cpu']} ({info['cpu_count']} cores, {info['torch_threads']} torch threads), "
        f"device {info['device']}{', ' + info['gpu'] if 'gpu' in info else ''}, torch {info['torch']}; "
        f"load average at start {info['load_average_start']}, at end {info.get('load_average_end')}; "
        f"{info.get('elapsed_s', math.nan):.0f} s in all.",
        "",
    ]
    goals = goal_rows(steps, topk_rows)
    if goals:
        lines += [
            "Goals (issue 13); each ratio is the median over interleaved rounds in one process of that round's "
            "ratio to TopK, with the rounds' interquartile range beside it:",
            "",
        ]
        lines += md_table(["goal", "measured", "IQR", "matmul floor", "target", "status"], goals)
    timed_steps = [r for r in steps if "floor_ms" in r]
    if timed_steps:
        lines += [
            "One SAETrainer step (forward, backward, clip_grad_norm_, Adam); SoftSAE at the points of a real "
            "schedule (start: tau 0.05, target k_max; mid: tau mid-anneal; final: tau 0.005; hard: the last step; "
            "mid_floor80: mid-anneal with soft top-k's old flush floor e^-80, whose subnormals stalled it); floor = "
            "the step's matmul FLOPs at the GEMM speed measured in the same rounds; peak = parameters + Adam state + "
            "the step's peak rise (see the README for the method):",
            "",
        ]
        lines += md_table(
            ["d_in/d_sae", "batch", "architecture", "phase", "median ms", "ratio vs TopK", "ratio IQR",
             "floor ratio", "floor ms", "peak MB", "peak ratio", "load"],
            [
                [f"{r['d_in']}/{r['d_sae']}", r["batch"], LABELS[r["model"]], r["phase"], r["median_ms"],
                 r["ratio_vs_topk"], f"{r['ratio_q1']:.2f}-{r['ratio_q3']:.2f}", r["floor_ratio_vs_topk"],
                 r["floor_ms"], r["peak_mb"], r["peak_ratio_vs_topk"], f"{r['load_start']:.1f}-{r['load_end']:.1f}"]
                for r in timed_steps
            ],
        )  # fmt: skip
    inference = [r for r in steps if r["phase"] == "inference"]
    if inference:
        lines += ["Inference, decode(encode(x)) without gradients (SoftSAE decodes from the kept codes):", ""]
        lines += md_table(
            ["d_in/d_sae", "batch", "SAE", "median ms", "ratio vs TopK", "ratio IQR"],
            [[f"{r['d_in']}/{r['d_sae']}", r["batch"], LABELS[r["model"]], r["median_ms"], r["ratio_vs_topk"],
              f"{r['ratio_q1']:.2f}-{r['ratio_q3']:.2f}"] for r in inference],
        )  # fmt: skip
    short = [r for r in steps if r["phase"] == "short run"]
    if short:
        lines += [
            f"A whole short run ({short[0]['n_rounds']} steps of the real schedule at {short[0]['d_in']}/"
            f"{short[0]['d_sae']}, batch {short[0]['batch']}): the average step:",
            "",
        ]
        lines += md_table(
            ["architecture", "ms per step", "ratio vs TopK"],
            [[LABELS[r["model"]], r["median_ms"], r["ratio_vs_topk"]] for r in short],
        )
    if topk_rows:
        lines += [
            f"soft_topk forward + backward / torch.topk (values + backward), k = {K}, tau = {TAU}, Gaussian "
            "scores (median ms in brackets):",
            "",
        ]
        methods = [m for m in TOPK_METHODS if m != "torch.topk"]
        points = sorted(
            {(r["rows"], r["n"]) for r in topk_rows},
            key=lambda p: (p[0] != min(q[0] for q in {(r["rows"], r["n"]) for r in topk_rows}), p[1]),
        )
        table = []
        for rows_, n in points:
            at = {r["method"]: r for r in topk_rows if (r["rows"], r["n"]) == (rows_, n)}
            table.append(
                [rows_, n, f"{at['torch.topk']['median_ms']:.1f}"]
                + [
                    f"{at[m]['ratio_vs_torch_topk']:.2f} ({at[m]['median_ms']:.0f})" if m in at else "-"
                    for m in methods
                ]
            )
        lines += md_table(["rows", "n", "torch.topk ms", *(TOPK_LABELS[m] for m in methods)], table)
        first = {r["method"]: r["first_call_s"] for r in topk_rows if r["n"] == 16384}
        lines += [
            f"First fused call at a new shape (compilation; cache state as found): "
            f"{first.get('fast_fused', math.nan):.1f} s.",
            "",
        ]
    if results.get("fallback"):
        lines += ["Fast-path fallback (rows handed to the full sort), margin 16:", ""]
        lines += md_table(
            ["scores", "tau", "rows", "exact zeros per row", "fallback rows", "rate"],
            [
                [r["scores"], r["tau"], r["rows"], r.get("zeros_per_row", ""), r["fallback_rows"], r["rate"]]
                for r in results["fallback"]
            ],
        )
    if results.get("quality"):
        q = results["quality"]
        lines += [
            f"The k head's quality: SmolLM2-135M layer 6, d_sae {QUALITY_D_SAE}, k {QUALITY_K} (k_max "
            f"{QUALITY_K_MAX}), {q[0]['steps']} steps x {q[0]['batch']}, {q[0]['train_tokens']} training and "
            f"{q[0]['eval_tokens']} held-out tokens:",
            "",
        ]
        lines += md_table(
            ["architecture", "FVE", "L0", "k_hat mean", "k_hat std", "k_hat IQR / k", "dead", "train s"],
            [
                [
                    r["label"],
                    r["fve"],
                    r["mean_l0"],
                    r["k_hat_mean"],
                    r["k_hat_std"],
                    r["k_hat_iqr_over_k"],
                    r["dead_fraction"],
                    r["train_seconds"],
                ]
                for r in q
            ],
        )
    if results.get("throughput"):
        lines += ["`sae-lens train --config configs/quickstart.yaml` (SmolLM2-135M, few tokens), one run each:", ""]
        lines += md_table(
            [
                "architecture",
                "tokens",
                "whole run s",
                "tokens/s (whole run)",
                "training loop s",
                "tokens/s (loop)",
                "loop time / TopK",
                "FVE",
                "L0",
            ],
            [
                [
                    r["architecture"],
                    r["training_tokens"],
                    r["wall_s"],
                    r["tokens_per_s_whole_run"],
                    r["fit_s"],
                    r["tokens_per_s_training_loop"],
                    r["training_loop_time_ratio_vs_topk"],
                    r["fve"],
                    r["mean_l0"],
                ]
                for r in results["throughput"]
            ],
        )
    text = "\n".join(lines)
    (out_dir / f"{PREFIX}_summary.md").write_text(text)
    return text


def _csv_value(text: str) -> Any:
    try:
        return int(text)
    except ValueError:
        try:
            return float(text)
        except ValueError:
            return text


def read_results(out_dir: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The results and machine record of an earlier run, read back from its CSV and JSON files in `out_dir`."""
    results: dict[str, Any] = {}
    for name in ("steps", "soft_topk", "quality", "fallback", "throughput"):
        path = out_dir / f"{PREFIX}_{name}.csv"
        if path.exists():
            with path.open(newline="") as handle:
                rows = list(csv.DictReader(handle))
            # The steps section mixes kinds of rows (training steps, inference, the short run), each with its own
            # fields; an empty cell there is a field the row never had.
            results[name] = [{k: _csv_value(v) for k, v in row.items() if v != "" or name != "steps"} for row in rows]
    return results, json.loads((out_dir / f"{PREFIX}_machine.json").read_text())
