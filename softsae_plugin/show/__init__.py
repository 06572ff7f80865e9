"""`sae-lens show`: one self-contained HTML page of text shaded by the number of features each token uses.

SoftSAE rows are shaded by k_hat, every other architecture's by L0; hovering or focusing a token lists its
features with their activations and each feature's top tokens in the same text. `collect` reads the SAEs,
`page` writes the page from plain data, `browser` drives Debian's headless Chromium for screenshots and tests.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from softsae_plugin.show.page import PageData, Row, render, write_page

__all__ = ["PageData", "Row", "main", "render", "write_page"]

EPILOG = """\
text (language-model SAEs; the model and hook come from the SAE's cfg.json, SmolLM2 offline):
  --text FILE      paragraphs separated by blank lines, one paragraph of the page each
  --prompt TEXT    a paragraph given on the command line (may be repeated)
  --heldout N      the first N held-out paragraphs of the offline English Wikipedia text (never trained on)
activation-file SAEs:
  --activations FILE --text LINES   one activation row per line of LINES (its text); the page lists the inputs
                                    in order of k_hat (or L0)

examples:
  sae-lens show runs/quickstart --heldout 4 --out runs/quickstart/show.html --screenshot runs/quickstart/show.png
  sae-lens show runs/softsae-k32 --sae runs/topk-k32 --prompt "The cat sat on the mat." --out compare.html
  sae-lens show runs/clip-softsae --activations emb.npy --text captions.txt --out inputs.html
"""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of `sae-lens show`, whose --help documents the command."""
    parser = argparse.ArgumentParser(
        prog="sae-lens show",
        description="Write one HTML page (no network needed to open it) of text shaded by k_hat (SoftSAE) or L0 "
        "(any architecture), one row per SAE; hover or focus a token for its features.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("run_dir", nargs="?", type=Path, metavar="RUN_DIR", help="an SAE folder (cfg.json, weights)")
    parser.add_argument(
        "--sae", action="append", type=Path, default=[], metavar="RUN_DIR", help="another SAE, shown as another row"
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--text", type=Path, metavar="FILE", help="paragraphs (or, with --activations, one per row)")
    source.add_argument("--prompt", action="append", metavar="TEXT", help="a paragraph of text (may be repeated)")
    source.add_argument("--heldout", type=int, metavar="N", help="N held-out paragraphs of the offline English text")
    parser.add_argument("--activations", type=Path, metavar="FILE", help="(n, d_in) activations (.npy, .safetensors)")
    parser.add_argument("--out", type=Path, required=True, metavar="FILE.html", help="where to write the page")
    parser.add_argument("--screenshot", type=Path, metavar="FILE.png", help="also save the page in headless Chromium")
    parser.add_argument("--max-features", type=int, default=64, metavar="N", help="features listed per token (64)")
    parser.add_argument("--title", help="the page's title")
    parser.add_argument("--device", default="cpu", help="where the model and SAEs run (cpu)")
    return parser


def _paragraphs(path: Path) -> list[str]:
    if not path.is_file():
        raise FileNotFoundError(f"--text: no file at {path}")
    blocks = path.read_text(encoding="utf-8").replace("\r\n", "\n").split("\n\n")
    return [" ".join(block.split("\n")).strip() for block in blocks if block.strip()]


def _lines(path: Path) -> list[str]:
    if not path.is_file():
        raise FileNotFoundError(f"--text: no file at {path}")
    return path.read_text(encoding="utf-8").replace("\r\n", "\n").removesuffix("\n").split("\n")


def main(argv: Sequence[str]) -> None:
    """Run `sae-lens show` with the arguments after `show`: write the page, then the screenshot when asked.

    A bad option value (no SAE, a folder without an SAE, a missing file, a count that does not match) raises a
    ValueError or FileNotFoundError naming the option, the value and what was expected; the `sae-lens` command
    prints it on one line.
    """
    from softsae_plugin.show.collect import collect_activations, collect_text

    parser = build_parser()
    args = parser.parse_args(list(argv))
    folders = ([args.run_dir] if args.run_dir is not None else []) + args.sae
    if not folders:
        parser.error("give an SAE folder: sae-lens show RUN_DIR ... (and --sae RUN_DIR for a second row)")
    if args.max_features < 1:
        raise ValueError(f"--max-features {args.max_features}: expected a positive number of features")
    if args.out.suffix.lower() not in (".html", ".htm"):
        raise ValueError(f"--out {args.out}: expected a file name ending in .html")
    if args.activations is not None:
        from softsae_plugin.training.activations import load_activations

        if args.text is None:
            raise ValueError("--activations needs --text FILE with one text per activation row")
        data = collect_activations(
            folders,
            load_activations(args.activations),
            _lines(args.text),
            device=args.device,
            max_features=args.max_features,
            title=args.title,
        )
    else:
        if args.heldout is not None:
            if args.heldout < 1:
                raise ValueError(f"--heldout {args.heldout}: expected a positive number of paragraphs")
            from softsae_plugin.offline.text import english_text

            texts = english_text(split="heldout", max_docs=args.heldout)["text"]
        else:
            texts = _paragraphs(args.text) if args.text is not None else args.prompt
        data = collect_text(folders, texts, device=args.device, max_features=args.max_features, title=args.title)
    page = write_page(data, args.out)
    print(f"wrote {page} ({len(data.tokens):,} {'inputs' if data.mode == 'inputs' else 'tokens'}, "
          f"{page.stat().st_size / 1e6:.1f} MB)")  # fmt: skip
    if args.screenshot is not None:
        from softsae_plugin.show.browser import screenshot

        print(f"wrote {screenshot(page, args.screenshot)}")
