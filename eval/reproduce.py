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
Resumable: each section is a stage (`lab.stages.stage`) whose numbers are saved to WORK/<section>.json with the
settings it read, so a rerun at the same scale and seed reads every finished section back and rewrites the same report.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from lab.activations import cache_activations, cached_activations, embed_texts, spread_sample, synthetic_activations
from lab.measures import (
    dictionary_recovery,
    heldout_summary,
    lm_adaptivity,
    loss_recovered,
    sentence_adaptivity,
    spearman,
)
from lab.saes import ARCHITECTURES, sae_config
from lab.stages import stage
from lab.tables import results_json
from lab.text import english_sentences
from lab.training import learning_rate_then_k_sweep, train_and_load
from reproduce_report import write_report
from tqdm.auto import tqdm

from softsae_plugin.training.runs import with_run_length
from softsae_plugin.training.summary import summarise


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
# a. The embedding setting


def train_embedding_run(
    arch: str, k: int, lr: float, data: dict[str, Any], scale: Scale, work: Path, **overrides: Any
) -> dict[str, Any]:
    """One embedding-setting run through `train_on_activations`, measured on the held-out embeddings."""
    d_in = data["train"].shape[1]
    cfg = sae_config(arch, d_in, scale.emb_d_sae_factor * d_in, k, **overrides)
    tag = "-".join([arch, f"k{k}", f"lr{lr:g}", *(f"{key}{value}" for key, value in overrides.items())])
    inference, seconds = train_and_load(
        data["train"],
        cfg,
        work / "emb_runs" / tag,
        steps=scale.emb_steps,
        batch=scale.emb_batch,
        lr=lr,
        seed=scale.seed,
        window=max(scale.emb_steps // 4, 10),
        norm_batches=min(20, scale.emb_steps),
    )
    summary, k_hat = heldout_summary(inference, data["heldout"], data["train"][: len(data["heldout"])])
    return {
        "arch": arch,
        "k": k,
        "lr": lr,
        "seconds": seconds,
        "overrides": overrides,
        "summary": summary,
        "k_hat": k_hat,
    }


def embedding_data(scale: Scale, work: Path) -> dict[str, Any]:
    """The embedding setting's data: MiniLM embeddings of the sentences (embedded once into work/), the last tenth
    held out ("heldout", with their "texts"), the rest "train"; "seconds": the embedding's wall time."""
    texts = english_sentences(scale.n_texts, scale.seed)
    start = time.perf_counter()
    embeddings = embed_texts(texts, work / "minilm_embeddings.safetensors")
    seconds = time.perf_counter() - start
    n_heldout = max(len(texts) // 10, scale.emb_batch)
    return {
        "train": embeddings[:-n_heldout],
        "heldout": embeddings[-n_heldout:],
        "texts": texts[-n_heldout:],
        "seconds": seconds,
    }


def run_embedding_setting(scale: Scale, work: Path, bar: tqdm) -> dict[str, Any]:
    """Section a (and the embedding parts of c, d, e): the LR sweep, the k sweep and the ablations."""
    data = embedding_data(scale, work)
    texts, n_heldout, embed_seconds = data["texts"], len(data["heldout"]), data["seconds"]
    sweep_k = scale.emb_ks[len(scale.emb_ks) // 2]
    runs, best_lr, main = learning_rate_then_k_sweep(
        lambda arch, k, lr: train_embedding_run(arch, k, lr, data, scale, work),
        scale.lrs,
        sweep_k,
        scale.emb_ks,
        bar,
        "emb",
    )
    ablations = {"default": main[("softsae", sweep_k)]}
    for name, overrides in ablation_settings(sweep_k).items():
        bar.set_postfix_str(f"emb ablation {name}")
        ablations[name] = train_embedding_run("softsae", sweep_k, best_lr["softsae"], data, scale, work, **overrides)
        bar.update()
    adaptivity = sentence_adaptivity(main[("softsae", sweep_k)]["k_hat"], data["texts"])
    return {
        "n_texts": len(texts),
        "n_train": len(texts) - n_heldout,
        "n_heldout": n_heldout,
        "d_in": 384,
        "embed_seconds": embed_seconds,
        "sweep_k": sweep_k,
        "sweep": runs,
        "best_lr": best_lr,
        "main": list(main.values()),  # records (JSON has no tuple keys); `run` keys them by (arch, k) again
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


# ---------------------------------------------------------------------------------------------------------------
# b. The language-model setting


def train_lm_run(
    arch: str, k: int, lr: float, model: Any, rows: Any, cache: Path, scale: Scale, work: Path
) -> dict[str, Any]:
    """One language-model run: SAE-Lens' runner reading the cached activations; returns the inference SAE."""
    from sae_lens import LanguageModelSAETrainingRunner
    from sae_lens.config import LanguageModelSAERunnerConfig, LoggingConfig
    from sae_lens.saes.sae import SAE

    from softsae_plugin.offline.smollm2 import SMOLLM2_ID
    from softsae_plugin.offline.text import LOCAL_TEXT_ID

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


def run_lm_setting(scale: Scale, work: Path, bar: tqdm) -> dict[str, Any]:
    """Section b (and the LM parts of c, d): cache once, LR sweep, k sweep, held-out FVE/L0 and loss recovered."""
    from sae_lens.util import get_special_token_ids

    from softsae_plugin.offline.smollm2 import load_smollm2
    from softsae_plugin.offline.text import tokenized_english_text

    model = load_smollm2()
    hook_name = f"blocks.{scale.lm_layer}.hook_resid_post"
    # Held out: paragraphs spread over every article (softsae_plugin.text's split), never in the training rows.
    splits = {s: tokenized_english_text(model.tokenizer, scale.context_size, split=s) for s in ("train", "heldout")}
    for split, wanted in (("train", scale.lm_train_rows), ("heldout", scale.lm_heldout_rows)):
        if len(splits[split]) < wanted:
            raise ValueError(f"{wanted} rows of the {split} split wanted; the text has only {len(splits[split])}")
    train_rows = splits["train"].select(range(scale.lm_train_rows))
    heldout_rows = splits["heldout"].shuffle(seed=scale.seed).select(range(scale.lm_heldout_rows))
    start = time.perf_counter()
    bar.set_postfix_str("caching LM activations")
    for rows, folder in ((train_rows, "lm_cache_train"), (heldout_rows, "lm_cache_heldout")):
        cache_activations(model, rows, work / folder, hook_name, context_size=scale.context_size, seed=scale.seed)
    cache_seconds = time.perf_counter() - start
    special = get_special_token_ids(model.tokenizer)
    heldout = cached_activations(work / "lm_cache_heldout" / "cache", hook_name, special)
    acts, keep = heldout["acts"], heldout["keep"]
    heldout_tokens = heldout_rows.with_format("torch")["input_ids"]
    train_ids = train_rows.with_format("torch")["input_ids"].reshape(-1)
    args = (model, train_rows, work / "lm_cache_train" / "cache", scale, work)

    train_acts = spread_sample(work / "lm_cache_train" / "cache", hook_name, int(keep.sum()), special)

    def measured(run: dict[str, Any]) -> dict[str, Any]:
        run["summary"], run["k_hat"] = heldout_summary(run["sae"], acts[keep], train_acts)
        return run

    sweep_k = scale.lm_ks[len(scale.lm_ks) // 2]
    runs, best_lr, main = learning_rate_then_k_sweep(
        lambda arch, k, lr: measured(train_lm_run(arch, k, lr, *args)), scale.lrs, sweep_k, scale.lm_ks, bar, "LM"
    )
    # The loss recovered needs three passes of the whole model per batch: only for the runs in the tables.
    for (arch, k), run in main.items():
        bar.set_postfix_str(f"LM loss recovered {arch} k={k}")
        run["recovered"] = loss_recovered(
            run["sae"], model, heldout_tokens, special, n_batches=scale.lm_eval_batches, prompts=scale.lm_eval_prompts
        )
    adaptivity = lm_adaptivity(main[("softsae", sweep_k)]["sae"], heldout, train_ids, model)
    for run in runs + list(main.values()):
        run.pop("sae", None)  # the report reads only what was measured on it; the model stays in work/lm_runs
    return {
        "hook_name": hook_name,
        "cache_seconds": cache_seconds,
        "n_train_tokens": len(train_rows) * scale.context_size,
        "n_heldout_tokens": int(keep.sum()),
        "sweep_k": sweep_k,
        "sweep": runs,
        "best_lr": best_lr,
        "main": list(main.values()),
        "adaptivity": adaptivity,
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
    variants of `SYNTHETIC_VARIANTS` on the normalised set; "variants" maps each variant's name to its numbers."""
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
        inference, seconds = train_and_load(
            x[:-n_heldout],
            cfg,
            work / "synthetic" / re.sub(r"[^a-z0-9]+", "-", name),
            steps=steps,
            batch=scale.synth_batch,
            lr=lr,
            seed=scale.seed,
            window=max(steps // 5, 10),
            norm_batches=10,
        )
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
    return {"variants": results}  # beside the keys `stage` adds (its inputs, "seconds")


# ---------------------------------------------------------------------------------------------------------------
# The command

# Result key -> (stage name, section, the `Scale` fields it reads: its own prefix and the shared settings).
SECTIONS = {
    "synth": ("synthetic", run_synthetic, ("synth_", "seed")),
    "emb": ("embedding", run_embedding_setting, ("emb_", "n_texts", "lrs", "seed")),
    "lm": ("language_model", run_lm_setting, ("lm_", "lrs", "context_size", "seed")),
}


def section_inputs(scale: Scale, prefix: str, *shared: str) -> dict[str, Any]:
    """The settings of `scale` a section reads (fields starting with `prefix`, and `shared`), recorded with its
    stage so that a changed scale or seed reruns that section and only that one."""
    return {
        f.name: getattr(scale, f.name)
        for f in dataclasses.fields(scale)
        if f.name.startswith(prefix) or f.name in shared
    }


def run(scale_name: str, out: Path, report: Path, work: Path, *, seed: int | None = None) -> dict[str, Any]:
    """Run every section at `scale_name`, write the plots to `out` and the report to `report`; return the numbers."""
    if scale_name not in SCALES:
        raise ValueError(f"--scale={scale_name!r} is not a known scale; expected one of {sorted(SCALES)}")
    scale = SCALES[scale_name] if seed is None else dataclasses.replace(SCALES[scale_name], seed=seed)
    torch.manual_seed(scale.seed)
    work.mkdir(parents=True, exist_ok=True)
    n_emb = len(ARCHITECTURES) * (len(scale.lrs) + len(scale.emb_ks) - 1) + len(ablation_settings(1))
    n_lm = len(ARCHITECTURES) * (len(scale.lrs) + len(scale.lm_ks) - 1)
    results: dict[str, Any] = {}
    # Each section is a stage: work/<stage>.json keeps its numbers with the settings they came from.
    with tqdm(total=n_emb + n_lm + len(SYNTHETIC_VARIANTS) + len(SECTIONS), desc="reproduce", unit="run") as bar:
        for key, (name, section, fields) in SECTIONS.items():
            inputs = {"scale": section_inputs(scale, *fields)}
            results[key] = stage(work, name, bar, lambda section=section: section(scale, work, bar), inputs)
            del results[key]["scale"]
    # The sections' own wall times as they were measured, so that a rerun reading them back writes the same report.
    results["seconds"] = sum(results[key].pop("seconds") for key in SECTIONS)
    results["synth"] = results["synth"]["variants"]
    for key in ("emb", "lm"):
        results[key]["main"] = {(r["arch"], r["k"]): r for r in results[key]["main"]}
    write_report(results, scale_name, scale, out, report)
    (out / "results.json").write_text(json.dumps(results_json(results), indent=1, default=str) + "\n")
    return results


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: --scale tiny|full, --out (plots), --report (Markdown), --work (stages, caches and SAEs)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scale", default="full", choices=sorted(SCALES))
    parser.add_argument("--out", type=Path, default=Path("eval/report"), help="folder for the PNG plots")
    parser.add_argument("--report", type=Path, default=None, help="Markdown report (default: OUT/../REPORT.md)")
    parser.add_argument(
        "--work",
        type=Path,
        default=None,
        help="stage results, embeddings, caches and SAEs (default: runs/reproduce-SCALE)",
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
