"""The figures more than one command draws: matplotlib without a display, the FVE-L0 frontier, k_hat histograms."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .saes import ARCHITECTURES, LABELS


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend (files only: the commands run without a display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_frontier(main: dict[tuple[str, int], dict[str, Any]], title: str, path: Path) -> None:
    """FVE against L0 for each architecture's k sweep."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for arch in ARCHITECTURES:
        points = sorted((r["summary"]["mean_l0"], r["summary"]["fve"]) for (a, _), r in main.items() if a == arch)
        ax.plot(*zip(*points, strict=True), marker="o", label=LABELS[arch])
    ax.set_xscale("log", base=2)
    ax.set_xlabel("mean L0 on held-out inputs")
    ax.set_ylabel("FVE on held-out inputs")
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_k_hat(runs: list[dict[str, Any]], title: str, path: Path) -> None:
    """One k_hat histogram per SoftSAE run, with the target k, the measured mean L0 and k_max."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(runs), figsize=(3.6 * len(runs), 3), squeeze=False)
    for ax, run in zip(axes[0], runs, strict=True):
        s = run["summary"]
        ax.hist(run["k_hat"], bins=40, color="tab:blue", alpha=0.8)
        ax.axvline(s["k"], color="black", linestyle="--", label="target k")
        ax.axvline(s["mean_l0"], color="tab:red", label="mean L0")
        ax.axvline(s["k_max"], color="gray", linestyle=":", label="k_max")
        ax.set_title(f"k = {s['k']:g}", fontsize=9)
        ax.set_xlabel("k_hat")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
