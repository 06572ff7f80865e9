"""How fast headless Chromium draws a `sae-lens show` page of 20,000 tokens (issue 25 asks for under 2 s).

The page is built from synthetic per-token data (k_hat, features and activations drawn at random, shaped like a
SoftSAE with k_max 96 on a 2,304-feature dictionary) through the same page writer the command uses, two SAE rows
as in a TopK-against-SoftSAE comparison. Each round opens the page in a fresh tab and reads the time from
navigation start to the first paint after the text is drawn (the page's own `renderMs` mark), beside the
wall-clock time the driver waited. Results go to eval/results/show/bench_show.json.

    .venv/bin/python eval/bench_show.py            # 20,000 tokens, 5 rounds
    .venv/bin/python eval/bench_show.py --tokens 50000 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from softsae_plugin.show.browser import chromium, missing, wait_rendered
from softsae_plugin.show.page import PageData, Row, write_page

RESULTS = Path(__file__).parent / "results" / "show" / "bench_show.json"
WORDS = "the of and a in to was is for on as with by he that at from his it an were are which this be".split()


def synthetic_page(n_tokens: int, *, seed: int = 0, d_sae: int = 2304, k_max: int = 96) -> PageData:
    """A page of `n_tokens` random words in paragraphs of 200, with a SoftSAE row (k_hat in [1, k_max], that many
    random features) and a TopK row (k = 32 features everywhere), each feature with five top tokens."""
    gen = torch.Generator().manual_seed(seed)
    tokens = [" " + WORDS[i] for i in torch.randint(len(WORDS), (n_tokens,), generator=gen).tolist()]
    k_hat = 1 + (k_max - 1) * torch.rand(n_tokens, generator=gen) ** 2
    rows = []
    for name, counts, values in (
        ("softsae k=32 k_max=96 (synthetic)", k_hat.round().long().tolist(), k_hat.tolist()),
        ("topk k=32 (synthetic)", [32] * n_tokens, [32.0] * n_tokens),
    ):
        # Drawn with replacement, so a token may list a feature twice: harmless for timing the page.
        all_features = torch.randint(d_sae, (n_tokens, k_max), generator=gen).tolist()
        all_acts = torch.rand(n_tokens, k_max, generator=gen).mul(5).sort(dim=1, descending=True).values.tolist()
        features = [f[:count] for f, count in zip(all_features, counts, strict=True)]
        acts = [a[:count] for a, count in zip(all_acts, counts, strict=True)]
        top = {
            f: [(int(i), 5.0 - 0.1 * r) for r, i in enumerate(torch.randint(n_tokens, (5,), generator=gen))]
            for f in range(d_sae)
        }
        rows.append(Row(name, "k_hat" if "softsae" in name else "L0", values, counts, features, acts, top, k_max))
    return PageData(f"{n_tokens:,} synthetic tokens", tokens, rows, doc_starts=list(range(0, n_tokens, 200)))


def measure(page: Path, rounds: int) -> dict[str, Any]:
    """Open `page` `rounds` times in one headless Chromium; the page's render mark and the driver's wall time."""
    marks, walls = [], []
    with chromium() as driver:
        version = driver.capabilities.get("browserVersion")
        for _ in range(rounds):
            driver.get("about:blank")
            start = time.perf_counter()
            driver.get(page.resolve().as_uri())
            marks.append(wait_rendered(driver))
            walls.append(1000 * (time.perf_counter() - start))
            shown = driver.execute_script("return document.querySelectorAll('#text .t').length")
            if shown != int(page.stem.split("-")[-1]):
                raise RuntimeError(f"the page drew {shown} tokens, expected {page.stem.split('-')[-1]}")
    return {"render_ms": marks, "wall_ms": [round(wall, 1) for wall in walls], "chromium": version}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if (reason := missing()) is not None:
        raise SystemExit(f"bench_show: {reason}")
    with tempfile.TemporaryDirectory() as tmp:
        page = write_page(synthetic_page(args.tokens), Path(tmp) / f"page-{args.tokens}.html")
        size = page.stat().st_size
        times = measure(page, args.rounds)
    browser_version = times.pop("chromium")
    result = {
        "tokens": args.tokens,
        "sae_rows": 2,
        "page_bytes": size,
        "rounds": args.rounds,
        "render_ms_median": statistics.median(times["render_ms"]),
        "wall_ms_median": statistics.median(times["wall_ms"]),
        **times,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores (shared), "
        f"load average {os.getloadavg()[0]:.2f}",
        "browser": f"Debian chromium {browser_version}, headless, driven by selenium",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"{args.tokens:,} tokens ({size / 1e6:.1f} MB): drawn {result['render_ms_median']:.0f} ms after navigation "
        f"start (median of {args.rounds}; driver wall time {result['wall_ms_median']:.0f} ms) -> {args.out}"
    )


if __name__ == "__main__":
    main()
