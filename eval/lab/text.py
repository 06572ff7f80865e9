"""English text from installed packages (gensim's Wikipedia sample and Lee news corpus): sentences, articles and
token rows, with the held-out split every experiment keeps apart."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np


def split_sentences(text: str, *, min_words: int = 5, max_words: int = 60) -> list[str]:
    """Split prose into sentences at . ! ? followed by a space, keeping those of min_words..max_words words."""
    # A sentence ends at . ! ? (or one followed by a closing quote or bracket) before a capital, quote or bracket.
    sentences = (s.strip() for s in re.split(r"(?:(?<=[.!?])|(?<=[.!?][\"')]))\s+(?=[A-Z\"(])", text))
    return [s for s in sentences if min_words <= len(s.split()) <= max_words]


def lee_lines() -> list[str]:
    """The lines of gensim's Lee background corpus, one news article each (some repeat an earlier one)."""
    from gensim.test.utils import datapath

    return Path(datapath("lee_background.cor")).read_text(encoding="utf-8", errors="replace").splitlines()


def lee_articles(split: str) -> list[str]:
    """The 293 distinct news articles of gensim's Lee background corpus (7 of its 300 lines repeat an earlier one),
    every 10th held out as the Wikipedia text is."""
    from softsae_plugin.offline.text import HELDOUT_EVERY

    lines = list(dict.fromkeys(line.strip() for line in lee_lines() if line.strip()))
    # dict.fromkeys drops the repeats: a repeated article on both sides would leak the held-out text.
    return [text for i, text in enumerate(lines) if (i % HELDOUT_EVERY == HELDOUT_EVERY - 1) == (split == "heldout")]


def english_sentences(n_texts: int | None, seed: int) -> list[str]:
    """English sentences: gensim's Wikipedia dump (via softsae_plugin.text) and the Lee news corpus, shuffled."""
    from softsae_plugin.offline.text import english_text

    sentences: list[str] = []
    for paragraph in english_text(min_chars=1)["text"]:
        sentences += split_sentences(paragraph)
    for article in lee_lines():
        sentences += split_sentences(article)
    unique = sorted(set(sentences))  # sorted: set order is not deterministic across processes
    order = np.random.default_rng(seed).permutation(len(unique))
    chosen = [unique[i] for i in order]
    return chosen if n_texts is None else chosen[:n_texts]


def mixed_token_rows(tokenizer: Any, split: str, context_size: int, rows_per_buffer: int) -> Any:
    """Token rows of `split`: Wikipedia paragraphs and Lee articles, interleaved (so any prefix mixes both), cut to
    a whole number of `rows_per_buffer` (an activation cache's buffers then divide the rows)."""
    from softsae_plugin.offline.text import english_text, tokenize_rows

    wiki, lee = english_text(split=split)["text"], lee_articles(split)
    step = max(1, len(wiki) // max(1, len(lee)))
    texts = [
        t for i, w in enumerate(wiki) for t in ([w, lee[i // step]] if i % step == 0 and i // step < len(lee) else [w])
    ]
    rows = tokenize_rows(texts, tokenizer, context_size)
    return rows.select(range(len(rows) - len(rows) % rows_per_buffer))
