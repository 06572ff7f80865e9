"""The page of `sae-lens show`, written from plain per-token data: one self-contained HTML file.

The page holds its data as one JSON block and its style and script inline (page.css and page.js, package data
beside this module), so it opens from disk with no network. The script draws the text on load; everything
Python can precompute (colour bins, histogram, ranked tokens, each feature's top tokens) is computed here.
"""

from __future__ import annotations

import html
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path
from typing import Any, Literal

import numpy as np

# The page and its screenshot beside an SAE, as `make quickstart` writes them and `sae-lens push` uploads them.
PAGE_FILENAME = "show.html"
SCREENSHOT_FILENAME = "show.png"
# Colour bins of the shading, light to dark (a sequential blue scale): few enough that each has a number on the
# legend, enough that neighbouring k_hat values differ visibly.
PALETTE = (
    "#f7fbff",
    "#e3eef9",
    "#cfe1f2",
    "#b5d4e9",
    "#93c3df",
    "#6daed5",
    "#4b97c9",
    "#2f7ebc",
    "#1864aa",
    "#0a4a90",
    "#08306b",
    "#041c42",
)
# Tokens listed at each end of the ranking, and tokens of context shown either side of a ranked token.
RANKED = 12
CONTEXT = 6
HISTOGRAM_BINS = 24
Mode = Literal["tokens", "inputs"]


@dataclass
class Row:
    """One SAE's reading of the text: the shaded measure per token and the features each token keeps.

    `values` is the measure the text is shaded by (k_hat for SoftSAE, L0 otherwise), `l0` the number of non-zero
    codes, `features[i]`/`acts[i]` token i's kept features and their activations, largest first (at most the
    page's cap; `l0[i]` says how many there are in all), and `top[f]` the (token index, activation) pairs of
    feature f's largest activations in the whole text, largest first. `k_max` (SoftSAE's ceiling on k_hat)
    sets the top of the colour scale when given.
    """

    name: str
    measure: str
    values: list[float]
    l0: list[int]
    features: list[list[int]]
    acts: list[list[float]]
    top: dict[int, list[tuple[int, float]]] = field(default_factory=dict)
    k_max: float | None = None


@dataclass
class PageData:
    """Everything a page shows: the tokens (or input texts), where each document starts, and one Row per SAE.

    In "tokens" mode the text is drawn as running text, one paragraph per document (`doc_starts` holds each
    one's first token index); in "inputs" mode each entry of `tokens` is a whole input (a row of an activation
    file), drawn as its own line in the order `order` gives (by default: as given).
    """

    title: str
    tokens: list[str]
    rows: list[Row]
    doc_starts: list[int] = field(default_factory=lambda: [0])
    mode: Mode = "tokens"
    order: list[int] | None = None
    notes: list[str] = field(default_factory=list)


def relative_luminance(colour: str) -> float:
    """WCAG 2 relative luminance of a '#rrggbb' colour."""
    channels = [int(colour[i : i + 2], 16) / 255 for i in (1, 3, 5)]
    linear = [c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4 for c in channels]
    return 0.2126 * linear[0] + 0.7152 * linear[1] + 0.0722 * linear[2]


def contrast_ratio(first: str, second: str) -> float:
    """WCAG 2 contrast ratio of two '#rrggbb' colours (1 to 21; 4.5 is the minimum for body text)."""
    light, dark = sorted((relative_luminance(first), relative_luminance(second)), reverse=True)
    return (light + 0.05) / (dark + 0.05)


def text_colour(background: str) -> str:
    """Black or white, whichever contrasts more with `background`."""
    return "#000000" if contrast_ratio(background, "#000000") >= contrast_ratio(background, "#ffffff") else "#ffffff"


def scale_top(rows: Sequence[Row], k_max: float | None = None) -> float:
    """The top of the shared colour scale: `k_max` when given (SoftSAE's ceiling), else the largest value shown.

    One scale for every row, so that a TopK row and a SoftSAE row shaded alike mean the same number of features.
    """
    largest = max((max(row.values, default=0.0) for row in rows), default=0.0)
    return float(max(k_max or 0.0, largest, 1.0))


def bin_edges(top: float) -> list[float]:
    """The lower edge of each colour bin on a scale from 0 to `top` (the last bin reaches `top`)."""
    return [top * i / len(PALETTE) for i in range(len(PALETTE))]


def _bin(value: float, top: float) -> int:
    return min(len(PALETTE) - 1, max(0, int(value / top * len(PALETTE))))


def histogram_svg(values: Sequence[float], top: float, label: str, unit: str = "tokens") -> str:
    """An inline SVG histogram of `values` on [0, top] (one per `unit`), with numbered axes (no script needed)."""
    width, height, left, bottom = 360, 150, 40, 24
    counts = [0] * HISTOGRAM_BINS
    for value in values:
        counts[min(HISTOGRAM_BINS - 1, max(0, int(value / top * HISTOGRAM_BINS)))] += 1
    peak = max(counts) or 1
    bar = (width - left - 8) / HISTOGRAM_BINS
    parts = [
        f'<svg class="hist" viewBox="0 0 {width} {height}" role="img" '
        f'aria-label="histogram of {html.escape(label)} over {len(values)} {unit}">'
    ]
    for i, count in enumerate(counts):
        bar_height = (height - bottom - 10) * count / peak
        x, y = left + i * bar, height - bottom - bar_height
        colour = PALETTE[min(len(PALETTE) - 1, i * len(PALETTE) // HISTOGRAM_BINS)]
        lo, hi = top * i / HISTOGRAM_BINS, top * (i + 1) / HISTOGRAM_BINS
        parts.append(
            f'<rect x="{x:.1f}" y="{y:.1f}" width="{bar - 1:.1f}" height="{bar_height:.1f}" fill="{colour}" '
            f'stroke="#445"><title>{lo:.1f}-{hi:.1f}: {count} {unit}</title></rect>'
        )
    axis_y = height - bottom
    parts.append(f'<line x1="{left}" y1="{axis_y}" x2="{width - 8}" y2="{axis_y}" stroke="#333"/>')
    for tick in range(5):
        x = left + tick * (width - left - 8) / 4
        parts.append(f'<text x="{x:.1f}" y="{axis_y + 15}" text-anchor="middle">{top * tick / 4:.3g}</text>')
    parts.append(f'<text x="{left - 4}" y="14" text-anchor="end">{peak}</text>')
    parts.append(f'<text x="{left - 4}" y="{axis_y}" text-anchor="end">0</text>')
    parts.append("</svg>")
    return "".join(parts)


def ranked(values: Sequence[float]) -> dict[str, list[int]]:
    """Token indices with the lowest and the highest values (RANKED of each; ties by position)."""
    order = sorted(range(len(values)), key=lambda i: (values[i], i))
    return {"low": order[:RANKED], "high": order[::-1][:RANKED]}


def _rounded(values: Sequence[float]) -> list[float]:
    """`values` to four significant digits (non-finite ones as 0): what the page prints, and a third of a large
    page's size. Vectorised: at 20,000 tokens a page holds over a million activations."""
    x = np.nan_to_num(np.asarray(values, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    magnitude = np.floor(np.log10(np.abs(x), out=np.zeros_like(x), where=x != 0)).astype(np.int64)
    # Dividing by an exact power of ten gives the double nearest the 4-digit decimal, which JSON writes as such.
    shift = 3 - magnitude
    up, down = 10.0 ** np.clip(shift, 0, None), 10.0 ** np.clip(-shift, 0, None)
    return (np.round(x * up / down) * down / up).tolist()


def _check(data: PageData) -> None:
    n = len(data.tokens)
    if not data.rows:
        raise ValueError("show: a page needs at least one SAE row")
    for row in data.rows:
        for name in ("values", "l0", "features", "acts"):
            if len(getattr(row, name)) != n:
                raise ValueError(f"show: row {row.name!r} has {len(getattr(row, name))} {name} for {n} tokens")
    if data.order is not None and sorted(data.order) != list(range(n)):
        raise ValueError("show: order must list every token index once")


def _doc_of(data: PageData) -> list[int]:
    if data.mode == "inputs":  # every input stands alone
        return list(range(len(data.tokens)))
    doc_of, doc = [], -1
    starts = set(data.doc_starts)
    for i in range(len(data.tokens)):
        doc += i in starts
        doc_of.append(max(doc, 0))
    return doc_of


def page_json(data: PageData, top: float) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The page's two data blocks: what drawing the text needs (tokens, documents, per row the shaded values and
    their bins, L0 and the ranked tokens), and per row the features behind the panel (flat feature and
    activation arrays with each token's offset into them, and each feature's top tokens). The second, most of a
    large page's bytes, is parsed only after the text is drawn."""
    doc_of = _doc_of(data)
    view_rows, detail_rows = [], []
    for row in data.rows:
        offsets = np.cumsum([0, *(len(features) for features in row.features)]).tolist()
        flat_features = [int(f) for features in row.features for f in features]
        flat_acts = _rounded([a for acts in row.acts for a in acts])
        view_rows.append(
            {
                "name": row.name,
                "measure": row.measure,
                "values": _rounded(row.values),
                "bins": [_bin(v, top) for v in row.values],
                "l0": [int(v) for v in row.l0],
                "ranked": ranked(row.values),
            }
        )
        detail_rows.append(
            {
                "offsets": offsets,
                "features": flat_features,
                "acts": flat_acts,
                "top": {
                    str(f): [[int(i), a] for (i, _), a in zip(pairs, _rounded([a for _, a in pairs]), strict=True)]
                    for f, pairs in row.top.items()
                },
            }
        )
    view = {
        "mode": data.mode,
        "tokens": data.tokens,
        "docs": doc_of,
        "order": data.order if data.order is not None else list(range(len(data.tokens))),
        "context": 0 if data.mode == "inputs" else CONTEXT,
        "rows": view_rows,
    }
    return view, detail_rows


def _script_json(value: Any) -> str:
    # A JSON string may hold "</script>"; escaping the slash keeps the data block closed only where it ends.
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).replace("</", "<\\/")


def _legend(top: float) -> str:
    cells = []
    for i, lower in enumerate(bin_edges(top)):
        upper = top * (i + 1) / len(PALETTE)
        cells.append(f'<span class="swatch b{i}" title="{lower:.1f} to {upper:.1f}">{lower:.3g}</span>')
    return f'<div class="legend" aria-label="colour scale">{"".join(cells)}<span class="end">{top:.3g}</span></div>'


def _palette_css() -> str:
    return "\n".join(f".b{i}{{background:{colour};color:{text_colour(colour)}}}" for i, colour in enumerate(PALETTE))


def render(data: PageData) -> str:
    """The page for `data` as one HTML string (inline style, script and data; nothing fetched)."""
    _check(data)
    top = scale_top(data.rows, max((row.k_max or 0.0 for row in data.rows), default=0.0))
    view, details = page_json(data, top)
    here = files("softsae_plugin.show")
    css = here.joinpath("page.css").read_text() + "\n" + _palette_css()
    script = here.joinpath("page.js").read_text()
    measures = sorted({row.measure for row in data.rows})
    unit = "inputs" if data.mode == "inputs" else "tokens"
    one = "an input" if data.mode == "inputs" else "a token"
    histograms = "".join(
        f"<figure><figcaption>{html.escape(row.name)}: {html.escape(row.measure)} per "
        f"{'input' if data.mode == 'inputs' else 'token'}</figcaption>"
        f"{histogram_svg(row.values, top, row.measure, unit)}</figure>"
        for row in data.rows
    )
    rows_key = "".join(
        f'<li><span class="rowmark">{i + 1}</span> {html.escape(row.name)} (shaded by {html.escape(row.measure)})</li>'
        for i, row in enumerate(data.rows)
    )
    notes = "".join(f"<p class='note'>{html.escape(note)}</p>" for note in data.notes)
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{html.escape(data.title)}</title>
<style>
{css}
</style>
</head>
<body>
<header>
<h1>{html.escape(data.title)}</h1>
<p class="key">Each {unit[:-1]} is shaded by {" / ".join(map(html.escape, measures))}: the number of features the SAE
keeps for it. Hover {one}, or focus the text and move with the arrow keys, to see its features.
{len(data.tokens):,} {unit}.</p>
<ol class="rows">{rows_key}</ol>
{_legend(top)}
{notes}
</header>
<main>
<section id="text" class="text mode-{data.mode}" tabindex="0" role="listbox"
 aria-label="{unit}, shaded by the number of features; arrow keys move, Home and End jump"></section>
<aside id="panel" aria-live="polite"><p class="hint">Hover or focus {one} to see its features.</p></aside>
</main>
<section class="summary">
<h2>Lowest and highest {" / ".join(map(html.escape, measures))}</h2>
<div id="ranked"></div>
<h2>Histogram</h2>
<div class="hists">{histograms}</div>
</section>
<script type="application/json" id="data">{_script_json(view)}</script>
<script type="application/json" id="details">{_script_json(details)}</script>
<script>
{script}
</script>
</body>
</html>
"""


def write_page(data: PageData, out: str | Path) -> Path:
    """Write the page for `data` to `out` (parent folders created) and return its path."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render(data), encoding="utf-8")
    return out
