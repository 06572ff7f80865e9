"""bench_speed.py's soft_topk section: LapSum's soft_topk forward + backward against torch.topk as the dictionary
grows."""

from __future__ import annotations

import gc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from bench_speed_settings import GOALS, PREFIX, K, write_csv
from lab.plots import pyplot
from lab.timing import load_average, median, quartiles, timed
from tqdm.auto import tqdm

from softsae_plugin.lapsum import soft_topk

TOPK_METHODS = ("torch.topk", "sort", "fast", "fast_fused", "fast_product", "fast_fused_product")
TOPK_LABELS = {
    "torch.topk": "torch.topk (values + backward)",
    "sort": "soft_topk, full sort",
    "fast": "soft_topk, fast path (eager)",
    "fast_fused": "soft_topk, fast path (fused)",
    "fast_product": "a * soft_topk(a), fast path (eager)",
    "fast_fused_product": "a * soft_topk(a), fast path (fused)",
}
TAU = 0.01


def soft_topk_run(method: str, rows: int, n: int, device: torch.device) -> Callable[[], None]:
    """One forward + backward of `method` on Gaussian scores (rows, n) at k = 64.

    Gradients flow to the scores and to k. The "product" variants are SoftSAE's use: the codes a times soft top-k of
    a detached copy of them (detach_soft_topk_scores), so a receives gradient through the product, k_hat through
    soft top-k; torch.topk's values are the TopK SAE's counterpart.
    """
    gen = torch.Generator(device=device).manual_seed(n)
    x = torch.randn(rows, n, generator=gen, device=device)
    k = torch.full((rows,), float(K), device=device, requires_grad=True)
    x.requires_grad_(True)
    if method == "torch.topk":
        upstream = torch.randn(rows, K, generator=gen, device=device)

        def run_topk() -> None:
            x.grad = None
            torch.topk(x, K, dim=-1).values.backward(upstream)

        return run_topk
    upstream = torch.randn(rows, n, generator=gen, device=device)
    kwargs: dict[str, Any] = {"method": "sort" if method == "sort" else "topk", "fused": "fused" in method}

    def run_soft() -> None:
        x.grad = k.grad = None
        if method.endswith("product"):
            (x * soft_topk(x.detach(), k, TAU, **kwargs)).backward(upstream)
        else:
            soft_topk(x, k, TAU, **kwargs).backward(upstream)

    return run_soft


def bench_soft_topk(device: torch.device, quick: bool, out_dir: Path) -> list[dict[str, Any]]:
    """Section 2: forward + backward time of each method for n = 1,024 ... 65,536, interleaved per size."""
    if device.type == "cuda":
        rows, goal_rows, sizes, reps = 2048, 8192, [2**p for p in range(10, 17)], 7
    elif quick:
        rows, goal_rows, sizes, reps = 64, 256, [2**p for p in range(10, 15)], 3
    else:
        rows, goal_rows, sizes, reps = 256, 1024, [2**p for p in range(10, 17)], 5
    points = [(rows, n) for n in sizes] + [(goal_rows, 16384)]
    out: list[dict[str, Any]] = []
    for r, n in tqdm(points, desc="soft_topk vs torch.topk", unit="size"):
        methods = [m for m in TOPK_METHODS if not (m == "sort" and r == goal_rows and r != rows)]
        torch.compiler.reset()  # each size compiles its own static kernels, as a training run would
        runs = {m: soft_topk_run(m, r, n, device) for m in methods}
        first_call = {m: timed(runs[m], device) for m in methods}  # compiles the fused kernels for this shape
        times: dict[str, list[float]] = {m: [] for m in methods}
        load = load_average()
        for _ in range(reps if n <= 16384 else max(2, reps - 2)):
            for m in methods:
                times[m].append(timed(runs[m], device))
        base = median(times["torch.topk"])
        for m in methods:
            out.append(
                {
                    "device": device.type,
                    "rows": r,
                    "n": n,
                    "k": K,
                    "method": m,
                    "median_ms": 1e3 * median(times[m]),
                    "q1_ms": 1e3 * quartiles(times[m])[0],
                    "q3_ms": 1e3 * quartiles(times[m])[1],
                    "ratio_vs_torch_topk": median(times[m]) / base,
                    "first_call_s": first_call[m],
                    "load": load,
                }
            )
        del runs
        gc.collect()
    write_csv("soft_topk", out, out_dir)
    plot_soft_topk(out, out_dir)
    return out


def plot_soft_topk(rows: list[dict[str, Any]], out_dir: Path) -> None:
    """Log-log time against n for every method (the sweep's row count), with the 2x-torch.topk goal."""
    plt = pyplot()
    sweep_rows = min(r["rows"] for r in rows)
    fig, (ax, ax_ratio) = plt.subplots(1, 2, figsize=(12, 4.5))
    for method in TOPK_METHODS:
        pts = sorted(
            (r["n"], r["median_ms"], r["ratio_vs_torch_topk"])
            for r in rows
            if r["method"] == method and r["rows"] == sweep_rows
        )
        if not pts:
            continue
        style = "--" if method.endswith("product") else "-"
        ax.plot([p[0] for p in pts], [p[1] for p in pts], style, marker="o", label=TOPK_LABELS[method])
        ax_ratio.plot([p[0] for p in pts], [p[2] for p in pts], style, marker="o", label=TOPK_LABELS[method])
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("n (dictionary size)")
    ax.set_ylabel("forward + backward, ms (median)")
    ax.set_title(f"{sweep_rows} rows, k = {K} ({rows[0]['device']})", fontsize=10)
    ax.legend(fontsize=7)
    ax_ratio.axhline(GOALS["soft_topk"], color="tab:red", linestyle="--", linewidth=1, label="goal 2x")
    ax_ratio.set_xscale("log", base=2)
    ax_ratio.set_yscale("log")
    ax_ratio.set_xlabel("n (dictionary size)")
    ax_ratio.set_ylabel("time / torch.topk")
    ax_ratio.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_dir / f"{PREFIX}_soft_topk.png", dpi=110)
    plt.close(fig)
