"""Real English text that installs from PyPI: gensim's shortened Wikipedia dump.

The Hugging Face Hub is not reachable offline, so tests and the offline quickstart take their text from the
test data that ships inside gensim (105 English Wikipedia articles), cleaned to plain prose paragraphs.
"""

from __future__ import annotations

import bz2
import re
from collections.abc import Iterator
from typing import Literal

import torch
from datasets import Dataset
from gensim.corpora.wikicorpus import extract_pages, filter_wiki
from gensim.test.utils import datapath
from sae_lens.tokenization_and_batching import concat_and_batch_sequences
from transformers import PreTrainedTokenizerBase

WIKI_DUMP = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
# The dataset_path under which `sae-lens train` uses this text instead of a Hub dataset.
LOCAL_TEXT_ID = "local:english-wikipedia"
# Every HELDOUT_EVERY-th paragraph is held out: never trained on, spread over every article of the dump, so that
# a summary measured on it sees the same kind of text as training (k_hat, and so L0, depends on the text).
HELDOUT_EVERY = 10
Split = Literal["all", "train", "heldout"]

# filter_wiki leaves bold/italic quotes, and the templates it drops (pronunciations, foreign spellings) leave
# brackets holding only separators and spaces before the punctuation that followed them: "Asphalt (,,
# occasionally ), also" and "from the Greek , i.e.".
_EMPHASIS = re.compile(r"'{2,}")
_BRACKET_OPEN_SEPARATORS = re.compile(r"\(\s*(?:[,;]\s*)+")
_BRACKET_CLOSE_SEPARATORS = re.compile(r"(?:\s*[,;])+\s*\)")
_EMPTY_BRACKETS = re.compile(r"\s*\(\s*\)")
_SPACE_BEFORE_PUNCT = re.compile(r"\s+([,.;:!?)])")
_SPACES = re.compile(r"\s+")


def _clean(line: str) -> str:
    line = _EMPHASIS.sub("", line)
    line = _BRACKET_OPEN_SEPARATORS.sub("(", line)
    line = _BRACKET_CLOSE_SEPARATORS.sub(")", line)
    line = _EMPTY_BRACKETS.sub("", line)
    line = _SPACE_BEFORE_PUNCT.sub(r"\1", line)
    return _SPACES.sub(" ", line).strip()


def _is_prose(line: str, min_chars: int) -> bool:
    # Headings, lists, tables and redirects start with markup; gallery captions keep a "|"; infobox and
    # table leftovers are short or do not end a sentence.
    return (
        len(line) >= max(min_chars, 1)
        and (line[0].isalnum() or line[0] in '"(')
        and "|" not in line
        and line[-1] in '.!?")'
    )


def _paragraphs(min_chars: int) -> Iterator[str]:
    with bz2.open(datapath(WIKI_DUMP), "rb") as dump:
        # Namespace 0 holds the articles; the dump also has a few talk and project pages.
        for _title, markup, _page_id in extract_pages(dump, filter_namespaces=("0",)):
            for line in filter_wiki(markup).splitlines():
                paragraph = _clean(line)
                if _is_prose(paragraph, min_chars):
                    yield paragraph


def english_text(*, max_docs: int | None = None, min_chars: int = 200, split: Split = "all") -> Dataset:
    """Return prose paragraphs of English Wikipedia as an in-memory dataset with one column, "text".

    Each row is one paragraph of at least `min_chars` characters, in dump order (deterministic), taken from
    the shortened Wikipedia dump in gensim's test data with headings, lists, tables and captions removed;
    `split="heldout"` keeps every HELDOUT_EVERY-th paragraph and `split="train"` the others; `max_docs` keeps only
    the first rows. SAE-Lens' ActivationsStore accepts the result as `override_dataset`: it tokenizes the "text"
    column on the fly with the model's tokenizer.
    """
    texts = []
    for index, paragraph in enumerate(_paragraphs(min_chars)):
        if max_docs is not None and len(texts) >= max_docs:
            break
        heldout = index % HELDOUT_EVERY == HELDOUT_EVERY - 1
        if split == "all" or heldout == (split == "heldout"):
            texts.append(paragraph)
    return Dataset.from_dict({"text": texts})


def tokenized_english_text(
    tokenizer: PreTrainedTokenizerBase,
    context_size: int,
    *,
    prepend_bos: bool = True,
    max_docs: int | None = None,
    min_chars: int = 200,
    split: Split = "all",
) -> Dataset:
    """Return `english_text` (of `split`) tokenized into rows of exactly `context_size` token ids ("input_ids"),
    as `tokenize_rows` does. Handing this to SAE-Lens as `override_dataset` skips re-tokenizing every epoch, which
    matters because the corpus is small."""
    texts = english_text(max_docs=max_docs, min_chars=min_chars, split=split)["text"]
    return tokenize_rows(texts, tokenizer, context_size, prepend_bos=prepend_bos)


def tokenize_rows(
    texts: list[str], tokenizer: PreTrainedTokenizerBase, context_size: int, *, prepend_bos: bool = True
) -> Dataset:
    """Return `texts` tokenized into rows of exactly `context_size` token ids (one column, "input_ids").

    Texts are concatenated with the tokenizer's BOS token between them and, when `prepend_bos`, at the start of
    every row, exactly as SAE-Lens' ActivationsStore does on the fly with its default
    `sequence_separator_token="bos"`; the incomplete last row is dropped.
    """
    token_rows = (torch.tensor(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"])
    bos = tokenizer.bos_token_id
    rows = concat_and_batch_sequences(
        tokens_iterator=token_rows,
        context_size=context_size,
        begin_batch_token_id=bos if prepend_bos else None,
        sequence_separator_token_id=bos,
    )
    dataset = Dataset.from_dict({"input_ids": [row.tolist() for row in rows]})
    dataset.set_format(type="torch", columns=["input_ids"])
    return dataset
