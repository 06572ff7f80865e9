"""The end-of-training summary every `sae-lens train` run writes: FVE, L0, k_hat, dead latents."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from sae_lens.saes.sae import SAE

SUMMARY_FILENAME = "training_summary.json"
K_HAT_HISTOGRAM_FILENAME = "k_hat_histogram.png"


@torch.no_grad()
def summarise(
    sae: SAE[Any], batches: Iterable[torch.Tensor], log_feature_sparsity: torch.Tensor | None = None
) -> tuple[dict[str, Any], torch.Tensor | None]:
    """Measure a trained SAE on raw (unscaled) activation batches it was not trained on.

    FVE = 1 - sum_d Var(x_d - x_hat_d) / sum_d Var(x_d) over all rows; L0 is the mean number of non-zero
    codes. For a SoftSAE the k_hat distribution is reported too (mean, quartiles, share of inputs within 1
    of k_max or of 1). The dead fraction comes from SAE-Lens' own feature-sparsity log of the last window.
    Returns the summary and the per-input k_hat (None for other architectures).
    """
    sae.eval()
    xs, x_hats, l0s, k_hats = [], [], [], []
    for batch in batches:
        x = batch.to(sae.device, sae.dtype).reshape(-1, sae.cfg.d_in)
        codes = sae.encode(x)
        xs.append(x.double().cpu())
        x_hats.append(sae.decode(codes).double().cpu())
        l0s.append((codes != 0).sum(-1).double().cpu())
        if hasattr(sae, "predict_k"):
            k_hats.append(sae.predict_k(x).double().cpu())
    x, x_hat, l0 = torch.cat(xs), torch.cat(x_hats), torch.cat(l0s)
    fve = 1 - (x - x_hat).var(0).sum() / x.var(0).sum()
    cfg = sae.cfg
    summary: dict[str, Any] = {
        "architecture": cfg.architecture(),
        "model_name": cfg.metadata.model_name,
        "hook_name": cfg.metadata.hook_name,
        "d_in": cfg.d_in,
        "d_sae": cfg.d_sae,
        "k": getattr(cfg, "k", None),
        "k_max": getattr(cfg, "k_max", None),
        "n_eval_inputs": int(x.shape[0]),
        "fve": float(fve),
        "mean_l0": float(l0.mean()),
    }
    if summary["k"]:
        summary["l0_over_target"] = summary["mean_l0"] / float(summary["k"])
    if k_hats:
        k_hat = torch.cat(k_hats)
        q1, median, q3 = torch.quantile(k_hat, torch.tensor([0.25, 0.5, 0.75], dtype=k_hat.dtype)).tolist()
        summary["k_hat"] = {
            "mean": float(k_hat.mean()),
            "std": float(k_hat.std()),
            "q1": q1,
            "median": median,
            "q3": q3,
            "iqr_over_k": (q3 - q1) / float(cfg.k),
            "share_near_k_max": float((k_hat >= cfg.k_max - 1).double().mean()),
            "share_near_1": float((k_hat <= 2).double().mean()),
        }
    if log_feature_sparsity is not None:
        # SAE-Lens logs log10(firing rate + 1e-10): a latent that never fired sits at -10.
        summary["dead_fraction"] = float((log_feature_sparsity <= -9.99).double().mean())
    return summary, (torch.cat(k_hats) if k_hats else None)


def write_summary(summary: dict[str, Any], k_hat: torch.Tensor | None, out_dir: str | Path) -> Path:
    """Write the summary as JSON, and the k_hat histogram as a PNG when there is one; return the JSON path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / SUMMARY_FILENAME
    path.write_text(json.dumps(summary, indent=2) + "\n")
    if k_hat is not None:
        _plot_k_hat(k_hat, summary, out_dir / K_HAT_HISTOGRAM_FILENAME)
    return path


def _plot_k_hat(k_hat: torch.Tensor, summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.hist(k_hat.numpy(), bins=60, color="tab:blue", alpha=0.8)
    ax.axvline(summary["k"], color="black", linestyle="--", label=f"target k = {summary['k']:g}")
    ax.axvline(summary["mean_l0"], color="tab:red", label=f"mean L0 = {summary['mean_l0']:.1f}")
    ax.axvline(summary["k_max"], color="gray", linestyle=":", label=f"k_max = {summary['k_max']}")
    ax.set_xlabel("predicted k_hat per input")
    ax.set_ylabel("inputs")
    ax.set_title(f"SoftSAE k_hat on held-out inputs (FVE {summary['fve']:.3f})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def print_summary(summary: dict[str, Any]) -> None:
    """Print the summary as a short human-readable block."""
    lines = [
        f"architecture {summary['architecture']}  d_sae {summary['d_sae']}  k {summary['k']}",
        f"FVE {summary['fve']:.4f}   mean L0 {summary['mean_l0']:.2f}"
        + (f" ({100 * (summary['l0_over_target'] - 1):+.1f}% vs target)" if "l0_over_target" in summary else ""),
    ]
    if "k_hat" in summary:
        kh = summary["k_hat"]
        lines.append(
            f"k_hat mean {kh['mean']:.2f}  quartiles {kh['q1']:.2f} / {kh['median']:.2f} / {kh['q3']:.2f}"
            f"  IQR/k {kh['iqr_over_k']:.2f}  near k_max {100 * kh['share_near_k_max']:.1f}%"
            f"  near 1 {100 * kh['share_near_1']:.1f}%"
        )
    if "dead_fraction" in summary:
        lines.append(f"dead latents {100 * summary['dead_fraction']:.2f}%")
    print("\n".join(lines))
