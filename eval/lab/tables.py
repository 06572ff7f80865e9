"""Numbers and rows as the reports and result files write them: fixed-point cells, links, Markdown tables, CSV
files and the JSON of a report's numbers."""

from __future__ import annotations

import csv
import math
import numbers
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np


def fixed(x: Any, digits: int = 3, missing: str = "n/a") -> str:
    """`x` with `digits` decimals, or `missing` where it is not a finite number."""
    return f"{x:.{digits}f}" if isinstance(x, numbers.Real) and math.isfinite(x) else missing


def link(path: Path, report: Path) -> str:
    """`path` as a Markdown link target in the file `report`: relative to its folder, with forward slashes."""
    return Path(os.path.relpath(Path(path).resolve(), report.parent.resolve())).as_posix()


def md_cell(text: str) -> str:
    """`text` as one Markdown table cell: pipes escaped, on one line."""
    return text.replace("|", "\\|").replace("\n", " ")


def md_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    """A Markdown table, followed by an empty line: floats to 3 significant digits (whole numbers from 100)."""

    def cell(value: Any) -> str:
        if isinstance(value, float):
            return "nan" if math.isnan(value) else f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
        return str(value)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return [*lines, ""]


def write_csv(
    path: Path, rows: list[dict[str, Any]], fields: Sequence[str], cell: Callable[[Any], Any] = lambda v: v
) -> Path:
    """Write `rows` (dicts, a missing key an empty cell) to `path` with the columns `fields`, each value through
    `cell`; return `path`."""
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        for row in rows:
            writer.writerow({key: cell(value) for key, value in row.items()})
    return path


def results_json(results: dict[str, Any]) -> dict[str, Any]:
    """The numbers of a report (no models, no per-input arrays) as JSON-friendly data."""

    def clean(value: Any) -> Any:
        if isinstance(value, dict):
            return {
                (" ".join(map(str, key)) if isinstance(key, tuple) else str(key)): clean(v)
                for key, v in value.items()
                if key not in ("sae", "k_hat", "true")
            }
        if isinstance(value, (list, tuple)):
            return [clean(v) for v in value]
        if isinstance(value, (np.floating, np.integer)):
            return value.item()
        return value

    return clean(results)
