"""The end-of-training summary every `sae-lens train` run writes: FVE, L0, k_hat, dead latents."""

from __future__ import annotations

import csv
import json
import logging
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from sae_lens.saes.sae import SAE
from sae_lens.training.sae_trainer import SAETrainer

SUMMARY_FILENAME = "training_summary.json"
K_HAT_HISTOGRAM_FILENAME = "k_hat_histogram.png"
# A sweep's table (.md and .csv) and plot, beside its SAEs' folders.
SWEEP_TABLE = "sweep_summary"
SWEEP_PLOT = "sweep_fve_vs_l0.png"
# Above this share of inputs predicting k_hat within 1 of k_max, the cap (not the input) decides their sparsity.
SATURATION_WARNING = 0.05

logger = logging.getLogger(__name__)


def training_statistics(trainer: SAETrainer[Any, Any]) -> dict[str, Any]:
    """What SAE-Lens' trainer measured on the training batches themselves, at the end of training.

    `train_mean_l0` is the mean number of firing latents over the last feature-sampling window (the trainer's own
    count of the codes its SAE produced, `train_l0_inputs` inputs); `dead_fraction` is SAE-Lens' dead-latent state:
    the share of latents that have not fired for more than `dead_feature_window` steps.
    """
    stats: dict[str, Any] = {"dead_fraction": float(trainer.dead_neurons.double().mean())}
    if trainer.n_frac_active_samples > 0:
        stats["train_mean_l0"] = float(trainer.feature_sparsity.sum())
        stats["train_l0_inputs"] = int(trainer.n_frac_active_samples)
    return stats


@torch.no_grad()
def summarise(
    sae: SAE[Any],
    batches: Iterable[torch.Tensor],
    trainer: SAETrainer[Any, Any] | None = None,
    *,
    eval_data: str = "held-out inputs",
) -> tuple[dict[str, Any], torch.Tensor | None]:
    """Measure a trained SAE on raw (unscaled) activation batches it was not trained on.

    FVE = 1 - sum_d Var(x_d - x_hat_d) / sum_d Var(x_d) over all rows; L0 is the mean number of non-zero
    codes. For a SoftSAE the k_hat distribution is reported too (mean, quartiles, share of inputs within 1
    of k_max or of 1), with a warning when more than 5% of inputs sit at the cap. With the `trainer` that
    trained it, the L0 on training batches and the dead fraction are added (`training_statistics`). `eval_data`
    says what the batches are, in the summary.
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
        "eval_data": eval_data,
        "n_eval_inputs": int(x.shape[0]),
        "fve": float(fve),
        "mean_l0": float(l0.mean()),
    }
    if trainer is not None:
        summary.update(training_statistics(trainer))
    _against_target(summary)
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
        if summary["k_hat"]["share_near_k_max"] > SATURATION_WARNING:
            summary["warnings"] = [
                f"{100 * summary['k_hat']['share_near_k_max']:.1f}% of inputs predict k_hat within 1 of "
                f"k_max={cfg.k_max} (more than {100 * SATURATION_WARNING:g}%): the cap, not the input, sets their "
                "sparsity; train again with a larger k_max (e.g. --k_max " + f"{2 * cfg.k_max})"
            ]
            logger.warning(summary["warnings"][0])
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
        + (f" ({100 * (summary['l0_over_target'] - 1):+.1f}% vs target)" if "l0_over_target" in summary else "")
        + f" on {summary['n_eval_inputs']} inputs of {summary.get('eval_data', 'held-out inputs')}",
    ]
    if "train_mean_l0" in summary:
        lines.append(
            f"mean L0 on the last {summary['train_l0_inputs']} training inputs {summary['train_mean_l0']:.2f}"
            + (f" ({100 * (summary['train_l0_over_target'] - 1):+.1f}%)" if "train_l0_over_target" in summary else "")
        )
    if "k_hat" in summary:
        kh = summary["k_hat"]
        lines.append(
            f"k_hat mean {kh['mean']:.2f}  quartiles {kh['q1']:.2f} / {kh['median']:.2f} / {kh['q3']:.2f}"
            f"  IQR/k {kh['iqr_over_k']:.2f}  near k_max {100 * kh['share_near_k_max']:.1f}%"
            f"  near 1 {100 * kh['share_near_1']:.1f}%"
        )
    if "dead_fraction" in summary:
        lines.append(f"dead latents {100 * summary['dead_fraction']:.2f}% (no firing in the dead-feature window)")
    lines += [f"WARNING: {warning}" for warning in summary.get("warnings", [])]
    print("\n".join(lines))


def _against_target(summary: dict[str, Any]) -> None:
    if summary["k"]:
        summary["l0_over_target"] = summary["mean_l0"] / float(summary["k"])
        if "train_mean_l0" in summary:
            summary["train_l0_over_target"] = summary["train_mean_l0"] / float(summary["k"])


def summarise_saved(
    folder: str | Path, batches: Iterable[torch.Tensor], trainer: SAETrainer[Any, Any], *, eval_data: str
) -> tuple[dict[str, Any], torch.Tensor | None]:
    """`summarise` the inference SAE saved in `folder` by `trainer`: the model users load, which for BatchTopK is
    SAE-Lens' JumpReLU with its learned threshold, not the batch top-k it trained with. The summary keeps the
    trained architecture and target k (`saved_as` names the saved architecture where it differs)."""
    trained = trainer.sae.cfg
    with warnings.catch_warnings():  # its advice on loading the language model concerns users, not this summary
        warnings.filterwarnings("ignore", message=r"\s*This SAE has non-empty model_from_pretrained_kwargs")
        saved = SAE.load_from_disk(str(folder), device=str(trainer.sae.device))
    summary, k_hat = summarise(saved, batches, trainer, eval_data=eval_data)
    if saved.cfg.architecture() != trained.architecture():
        summary.update(architecture=trained.architecture(), saved_as=saved.cfg.architecture())
        summary["k"] = getattr(trained, "k", None)
        _against_target(summary)
    return summary, k_hat


def write_sweep_table(
    output_path: str | Path, names: Sequence[str], diverged: Mapping[str, Mapping[str, Any]] | None = None
) -> Path:
    """The sweep's table (Markdown and CSV) and its FVE-vs-L0 plot, from each SAE's training summary, with a row for
    each SAE that diverged (its status: the step and the cause; no folder); returns the Markdown path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(output_path)
    columns = ("SAE", "architecture", "k", "mean_l0", "train_mean_l0", "fve", "dead_fraction", "status")
    rows = [{"SAE": n, **json.loads((out / n / SUMMARY_FILENAME).read_text()), "status": "trained"} for n in names]
    failed = [
        {**d, "SAE": name, "status": f"diverged at step {d['step']}: {d['cause']}; not saved"}
        for name, d in (diverged or {}).items()
    ]
    with (out / f"{SWEEP_TABLE}.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows + failed)
    lines = [
        f"# Sweep: {len(rows) + len(failed)} SAEs from one pass" + (f", {len(failed)} diverged" if failed else ""),
        "",
        f"FVE and mean L0 on {rows[0].get('eval_data', 'held-out data')}; the training L0 on the last training "
        "batches.",
        "",
        "| " + " | ".join(columns) + " |",
        "|" + "---|" * len(columns),
    ]
    for row in rows + failed:
        cells = ["" if row.get(c) is None else row[c] for c in columns]
        lines.append("| " + " | ".join(f"{c:.4g}" if isinstance(c, float) else str(c) for c in cells) + " |")
    (out / f"{SWEEP_TABLE}.md").write_text("\n".join(lines) + "\n")
    fig, ax = plt.subplots(figsize=(6, 4))
    for arch in sorted({str(row["architecture"]) for row in rows}):
        mine = sorted((r for r in rows if r["architecture"] == arch), key=lambda r: r["mean_l0"])
        ax.plot([r["mean_l0"] for r in mine], [r["fve"] for r in mine], marker="o", label=arch)
    ax.set_xlabel("mean L0 (held out)")
    ax.set_ylabel("FVE (held out)")
    ax.set_title("Sweep: FVE against L0")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / SWEEP_PLOT, dpi=120)
    plt.close(fig)
    return out / f"{SWEEP_TABLE}.md"
