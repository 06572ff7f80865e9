"""What a run leaves for people and tools: the labels in each result JSON, the summary table (mean and spread over
seeds), plots, and copies of the results into each checkpoint folder (read by `sae-lens push`'s model card).
"""

from __future__ import annotations

import csv
import json
import math
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import softsae_plugin  # noqa: F401  (registers softsae, so SoftSAE checkpoints load)
from softsae_plugin.evaluate.evals import (
    CORE_ID,
    EVAL_IDS,
    EVAL_METRICS,
    METRIC_SOURCES,
    NOTES_KEY,
    PIPELINE_CHECK_LABEL,
    TABLE_COLUMNS,
    UNIT_ROWS,
)
from softsae_plugin.evaluate.provenance import PROVENANCE_KEY
from softsae_plugin.evaluate.provenance import labels as provenance_labels
from softsae_plugin.evaluate.saes import SAESpec

# Said of core's numbers over several seeds in place of a spread.
CORE_SEED_NOTE = (
    "core ignores the seed (SAEBench shuffles its text with the fixed seed 42): every seed measures the same "
    "tokens, so no spread over seeds is reported"
)

# The PNG text key under which each plot carries its labels in full.
PLOT_LABELS_KEY = "sae_lens_eval_labels"


def result_notes(result: dict[str, Any], spec: SAESpec) -> list[str]:
    """A result's labels (`provenance.labels`, from its own record) and its decoder note (as recorded when it was
    produced; the current one for a result without a record)."""
    record = result.get(PROVENANCE_KEY) or {}
    return [*provenance_labels(result), f"decoder: {record.get('decoder', spec.decoder)}"]


def label_results(saes: Sequence[SAESpec], run: Path, seed_offset: int) -> None:
    """Write each result's notes (`result_notes`) into SAEBench's result JSON files of one seed's folder `run`,
    whether the result was produced in this command or kept from an earlier one."""
    for spec in saes:
        for eval_id in EVAL_IDS:
            path = spec.result_path(run / eval_id, seed_offset)
            if path.exists():
                result = json.loads(path.read_text())
                result[NOTES_KEY] = result_notes(result, spec)
                path.write_text(json.dumps(result, indent=2) + "\n")


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _mean_std(values: Sequence[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else None
    return mean, std


def summary_rows(saes: Sequence[SAESpec], evals: Sequence[str], runs: Sequence[Path]) -> list[dict[str, Any]]:
    """One row per SAE: its architecture, k, L0 and FVE (from training_summary.json) and each SAEBench metric's
    mean and standard deviation over the seeds' output folders `runs` (seed-0, seed-1, ...), with the values, the
    labels its result files carry (NOTES_KEY, from their provenance) and the decoder note.

    Core's spread is left out (None): SAEBench's core eval shuffles its text with a fixed seed, so every seed
    measures the same tokens and the spread is 0 by construction, not a measured one.
    """
    wanted = {metric for name in evals for metric in EVAL_METRICS[name]}
    rows = []
    for spec in saes:
        results = [
            {
                eval_id: json.loads(path.read_text())
                for eval_id in EVAL_IDS
                if (path := spec.result_path(run / eval_id, offset)).exists()
            }
            for offset, run in enumerate(runs)
        ]
        sae_cfg = next(iter(results[0].values()))["sae_cfg_dict"] if results[0] else {}
        summary = spec.training_summary
        row: dict[str, Any] = {
            "SAE": spec.name,
            "architecture": summary.get("architecture") or sae_cfg.get("architecture"),
            "k": _number(summary.get("k", sae_cfg.get("k"))),
            "L0": _number(summary.get("mean_l0")),
            "FVE": _number(summary.get("fve")),
            "n_seeds": len(runs),
            "decoder": spec.decoder,
            "metrics": {},
        }
        for metric, (eval_id, category, name) in METRIC_SOURCES.items():
            if metric not in wanted:
                continue
            values = [_number(r[eval_id]["eval_result_metrics"][category][name]) for r in results if eval_id in r]
            mean, std = _mean_std([v for v in values if v is not None])
            notes = [note for r in results if eval_id in r for note in r[eval_id].get(NOTES_KEY, [])]
            found = list(dict.fromkeys(n for n in notes if not n.startswith("decoder: ")))
            if eval_id == CORE_ID and len(values) > 1:
                std = None
                found.append(CORE_SEED_NOTE)
            row["metrics"][metric] = {"eval_type_id": eval_id, "mean": mean, "std": std, "values": values,
                                      "labels": found}  # fmt: skip
        rows.append(row)
    return rows


def _format(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:g}" if value == int(value) else f"{value:.4f}"
    return str(value)


def _cell(metric: dict[str, Any] | None) -> str:
    if metric is None or metric["mean"] is None:
        return ""
    return _format(metric["mean"]) + (f" ± {metric['std']:.4f}" if metric["std"] is not None else "")


def _short_label(labels: Sequence[str]) -> str:
    # The seed note describes core itself, not a departure from SAEBench's settings.
    departures = [label for label in labels if label != CORE_SEED_NOTE]
    return (
        " (pipeline check)"
        if any(label.startswith(PIPELINE_CHECK_LABEL) for label in departures)
        else (" (reduced settings)" if departures else "")
    )


def datasets_read(saes: Sequence[SAESpec], runs: Sequence[Path]) -> dict[str, dict[str, Any]]:
    """Every dataset the results in the seeds' folders `runs` record as read (their provenance), by name."""
    found: dict[str, dict[str, Any]] = {}
    for offset, run in enumerate(runs):
        for spec in saes:
            for eval_id in EVAL_IDS:
                if (path := spec.result_path(run / eval_id, offset)).exists():
                    record = json.loads(path.read_text()).get(PROVENANCE_KEY) or {}
                    found.update({d["name"]: d for d in record.get("datasets", [])})
    return found


def write_summary(
    rows: Sequence[dict[str, Any]],
    out: Path,
    *,
    model_name: str,
    saes: Sequence[SAESpec],
    datasets: dict[str, dict[str, Any]],
    notes: Sequence[str] = (),
) -> tuple[Path, Path]:
    """Write `summary.csv` and `summary.md` (with the model, hooks, the datasets the results record as read, the
    seeds, each metric's labels, each SAE's decoder note and any other `notes`); return both paths."""
    csv_path, md_path = out / "summary.csv", out / "summary.md"
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=TABLE_COLUMNS)
        writer.writeheader()
        for row in rows:
            metrics = row["metrics"]
            cells = {key: _format(row.get(key)) for key in TABLE_COLUMNS[:5]}
            for metric in METRIC_SOURCES:
                cells[metric] = _format(metrics[metric]["mean"]) if metric in metrics else ""
                cells[f"{metric}_std"] = _format(metrics[metric]["std"]) if metric in metrics else ""
            labels = sorted({label for m in metrics.values() for label in m["labels"]})
            cells.update(n_seeds=str(row["n_seeds"]), decoder=row["decoder"], labels="; ".join(labels))
            writer.writerow(cells)
    hooks = sorted({str(s.sae.cfg.metadata.hook_name) for s in saes if s.sae is not None})
    seeds = rows[0]["n_seeds"] if rows else 1
    lines = [
        f"# SAEBench results: {model_name}" + (f", {', '.join(hooks)}" if hooks else ""),
        "",
        "L0 and FVE come from each checkpoint's training_summary.json; every other column is an eval's own "
        "metric (SAEBench's; saelens_*: SAE-Lens' run_evals), from the JSON files beside this table"
        + (
            f": the mean ± standard deviation over {seeds} seeds, each SAE evaluated alone from each seed."
            if seeds > 1
            else ", each SAE evaluated alone from the same seed."
        ),
    ]
    lines += [
        f"\nDataset {name} ({d['source']}, fingerprint {d['fingerprint']}): {d['description'] or 'no description'}"
        for name, d in sorted(datasets.items())
    ]
    metric_labels: dict[str, list[str]] = {}
    for row in rows:
        for metric, values in row["metrics"].items():
            metric_labels[metric] = list(dict.fromkeys([*metric_labels.get(metric, []), *values["labels"]]))
    for metric, labels in sorted(metric_labels.items()):
        lines += [f"\n{metric}: {label}" for label in labels]
    lines += [f"\nDecoder of {row['SAE']}: {row['decoder']}" for row in rows if row["decoder"] != UNIT_ROWS]
    lines += [f"\n{note}" for note in notes]
    shown = [m for m in METRIC_SOURCES if m in metric_labels]
    header = [*TABLE_COLUMNS[:5], *(f"{m}{_short_label(metric_labels[m])}" for m in shown)]
    lines += ["", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [_format(row.get(key)) for key in TABLE_COLUMNS[:5]]
        cells += [_cell(row["metrics"].get(m)) for m in shown]
        warning = " (decoder not unit norm!)" if row["decoder"].startswith("WARNING") else ""
        lines.append("| " + " | ".join(cells).replace(row["SAE"], row["SAE"] + warning, 1) + " |")
    md_path.write_text("\n".join(lines) + "\n")
    return csv_path, md_path


def plot_metrics(rows: Sequence[dict[str, Any]], out: Path) -> list[Path]:
    """One PNG per metric against L0, a line per architecture with the seeds' standard deviation as error bars;
    rows without L0 or the metric are left out, and the title carries the metric's labels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for metric in METRIC_SOURCES:
        points = [r for r in rows if r["L0"] is not None and (r["metrics"].get(metric) or {}).get("mean") is not None]
        if not points:
            continue
        fig, ax = plt.subplots(figsize=(6, 4))
        for arch in sorted({str(r["architecture"]) for r in points}):
            mine = sorted((r for r in points if str(r["architecture"]) == arch), key=lambda r: r["L0"])
            ax.errorbar(
                [r["L0"] for r in mine],
                [r["metrics"][metric]["mean"] for r in mine],
                yerr=[r["metrics"][metric]["std"] or 0 for r in mine],
                marker="o",
                capsize=3,
                label=arch,
            )
        labels = sorted({label for r in points for label in r["metrics"][metric]["labels"]})
        ax.set_xlabel("L0 (mean active latents)")
        ax.set_ylabel(metric)
        seeds = points[0]["n_seeds"]
        ax.set_title(
            f"SAEBench {metric}"
            + (f", mean ± sd of {seeds} seeds" if seeds > 1 else "")
            + ("\n" + PIPELINE_CHECK_LABEL.upper() if _short_label(labels) == " (pipeline check)" else "")
            + ("\nreduced settings: see summary.md" if _short_label(labels) == " (reduced settings)" else ""),
            fontsize=9,
        )
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out / f"{metric}_vs_L0.png"
        # The labels in full, in the PNG's own text metadata: they travel with the image.
        fig.savefig(path, dpi=120, metadata={PLOT_LABELS_KEY: "\n".join(labels) or "none"})
        plt.close(fig)
        paths.append(path)
    return paths


def copy_to_checkpoints(
    saes: Sequence[SAESpec], rows: Sequence[dict[str, Any]], runs: Sequence[Path], model_name: str
) -> None:
    """Copy each checkpoint's SAEBench results (one folder per seed) and its summary row (means, spreads, labels,
    decoder note: what the model card shows) into `<checkpoint>/eval/`."""
    for spec, row in zip(saes, rows, strict=True):
        if spec.checkpoint is None:
            continue
        target = spec.checkpoint / "eval"
        shutil.rmtree(target, ignore_errors=True)
        for offset, run in enumerate(runs):
            for eval_id in EVAL_IDS:
                if (path := spec.result_path(run / eval_id, offset)).exists():
                    (target / run.name).mkdir(parents=True, exist_ok=True)
                    shutil.copy2(path, target / run.name / f"{eval_id}_eval_results.json")
        (target / "summary.json").write_text(json.dumps({"model_name": model_name, **row}, indent=2) + "\n")
