"""The absorption eval's seams: its artifacts in the output folder, its vocabulary in sorted order (optionally a
seeded subset), the model stopped after the SAE's block, and its first-letter probes trained once per model.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any
from unittest import mock

import softsae_plugin  # noqa: F401  (registers softsae, so SoftSAE checkpoints load)
from softsae_plugin.evaluate.evals import reseed
from softsae_plugin.evaluate.provenance import probe_record_path
from softsae_plugin.evaluate.saes import SAESpec, hook_layer
from softsae_plugin.evaluate.serving import working_directory


def absorption_results_dir(workdir: Path) -> Path:
    """SAEBench's absorption artifact folder (inside its package by default), moved under `workdir`."""
    return workdir / "artifacts" / "absorption"


@contextmanager
def absorption_artifacts_in(workdir: Path) -> Iterator[None]:
    """While the block runs, SAEBench's absorption eval writes its artifacts under `workdir`.

    Its probes and per-SAE experiment folders default to a folder inside the installed sae_bench package (bound
    as default arguments when SAEBench is imported), and its k-sparse-probing JSON goes to `artifacts/` under
    the working directory. The two experiment functions its `run_eval` calls get those folders as arguments
    (the same layout, rooted at `workdir/artifacts/absorption`), and the working directory is `workdir`.
    """
    import sae_bench.evals.absorption.main as absorption_main
    from sae_bench.evals.absorption.feature_absorption import FEATURE_ABSORPTION_EXPERIMENT_NAME
    from sae_bench.evals.absorption.k_sparse_probing import SPARSE_PROBING_EXPERIMENT_NAME

    results = absorption_results_dir(workdir)
    probes, sparse_probing = results / "probes", results / SPARSE_PROBING_EXPERIMENT_NAME
    k_sparse = partial(
        absorption_main.run_k_sparse_probing_experiment, experiment_dir=sparse_probing, probes_dir=probes
    )
    absorption = partial(
        absorption_main.run_feature_absortion_experiment,
        experiment_dir=results / FEATURE_ABSORPTION_EXPERIMENT_NAME,
        sparse_probing_experiment_dir=sparse_probing,
        probes_dir=probes,
    )
    with (
        working_directory(workdir),
        mock.patch.multiple(
            absorption_main, run_k_sparse_probing_experiment=k_sparse, run_feature_absortion_experiment=absorption
        ),
    ):
        yield


def absorption_skip_reason(workdir: Path, spec: SAESpec, config: Any) -> str:
    # SAEBench writes the k-sparse-probing table before deciding, and prints its reason without raising.
    name = spec.selection()[0] + "_" + ("custom_sae" if spec.sae is not None else str(spec.sae_id))
    table = absorption_results_dir(workdir) / f"{name}_k_sparse_probing.json".replace("/", "_")
    if not table.exists():
        return "SAEBench stopped before its k-sparse probing finished"
    f1 = [row["f1_probe"] for row in json.loads(table.read_text())]
    passed = sum(value > config.min_GT_probe_f1 for value in f1)
    return (
        f"SAEBench skipped it: only {passed} of {len(f1)} first-letter probes on the model reach "
        f"F1 > {config.min_GT_probe_f1} (it needs {config.min_feats_for_eval}, absorption.min_feats_for_eval)"
    )


def probe_vocabulary(vocab: Sequence[str], size: int, seed: int, min_per_letter: int = 20) -> list[str]:
    """A reproducible subset of about `size` of SAEBench's first-letter vocabulary `vocab`.

    Each first letter keeps its share of `size` but at least `min_per_letter` tokens (or all it has), so that
    SAEBench's random 80/20 train/test split still has every letter on both sides (its metrics need both).
    """
    by_letter: dict[str, list[str]] = {}
    for token in sorted(vocab):
        by_letter.setdefault(token.strip()[0].lower(), []).append(token)
    rng = random.Random(seed)
    subset = []
    for _letter, tokens in sorted(by_letter.items()):
        quota = max(min_per_letter, round(size * len(tokens) / len(vocab)))
        subset += rng.sample(tokens, min(quota, len(tokens)))
    return subset


@contextmanager
def absorption_vocabulary(probe_size: int | None, seed: int) -> Iterator[None]:
    """While the block runs, SAEBench's absorption eval reads the model's alphabetic tokens in sorted order
    (and, with `probe_size`, trains its first-letter probe on `probe_vocabulary` of them).

    SAEBench lists them in the order of the tokenizer's vocabulary dict, which a fast tokenizer builds from a
    hash map seeded afresh in every process; its seeded random draws from that list (the probe's train/test
    split, the in-context examples of every absorption prompt) then differ from run to run. Sorting makes a
    seeded run repeatable. The probe-training module and the absorption module each import the function.
    """
    import sae_bench.evals.absorption.common as common
    import sae_bench.evals.absorption.feature_absorption as feature_absorption

    def in_order(tokenizer: Any) -> list[str]:
        return sorted(full(tokenizer))

    def for_probe(tokenizer: Any) -> list[str]:
        return in_order(tokenizer) if probe_size is None else probe_vocabulary(full(tokenizer), probe_size, seed)

    full = feature_absorption.get_alpha_tokens
    with mock.patch.object(feature_absorption, "get_alpha_tokens", in_order):
        with mock.patch.object(common, "get_alpha_tokens", for_probe):
            yield


@contextmanager
def stop_after_hook_layer(model: Any, saes: Sequence[SAESpec]) -> Iterator[None]:
    """While the block runs, `model.run_with_cache` stops after the block of the deepest SAE's hook.

    SAEBench's absorption eval (probe and absorption alike) reads the model only through
    `run_with_cache(prompts, names_filter=[hook])` at the SAE's own `blocks.L.hook_resid_post`: the later blocks
    and the unembedding change nothing it reads, and take most of its time (SmolLM2-135M at layer 6: 23 of 30
    blocks and a 49,152-token unembedding).
    """
    layers = [hook_layer(spec.sae) for spec in saes if spec.sae is not None]
    if layers:
        model.run_with_cache = partial(type(model).run_with_cache, model, stop_at_layer=max(layers) + 1)
    try:
        yield
    finally:
        vars(model).pop("run_with_cache", None)


def train_absorption_probes(
    model: Any, saes: Sequence[SAESpec], config: Any, workdir: Path, device: str
) -> dict[int, dict[str, Any] | None]:
    """Train SAEBench's first-letter probe for each hook layer with SAEBench's own function, unless it is
    cached already, before its `run_eval` (which then loads it from the cache, as for every SAE after the first);
    return, per layer, the record of the vocabulary the probe was trained on (None for a cached probe without one).

    Training it first keeps the probe's random draws out of the seeded `run_eval`, so an SAE's absorption
    result does not depend on whether the probe was already cached. A probe trained here gets its record
    (`probe_record_path`) beside it, so a later run that reuses it knows what it was trained on. Run it inside
    `absorption_vocabulary`, whose vocabularies the record counts.
    """
    import sae_bench.evals.absorption.common as common
    import sae_bench.evals.absorption.feature_absorption as feature_absorption

    layers = sorted({hook_layer(spec.sae) for spec in saes if spec.sae is not None})
    probes_dir = absorption_results_dir(workdir) / "probes"
    records: dict[int, dict[str, Any] | None] = {}
    reseed(config.random_seed)
    for layer in layers:
        record_path = probe_record_path(probes_dir, model.cfg.model_name, layer)
        if not (record_path.parent / "probe.pth").exists():
            record_path.parent.mkdir(parents=True, exist_ok=True)
            record_path.write_text(json.dumps({
                "alphabetic_tokens": len(feature_absorption.get_alpha_tokens(model.tokenizer)),
                "probe_tokens": len(common.get_alpha_tokens(model.tokenizer)),
                "random_seed": config.random_seed,
            }) + "\n")  # fmt: skip
        common.load_or_train_probe(
            model,
            base_template=config.prompt_template,
            pos_idx=config.prompt_token_pos,
            layer=layer,
            probes_dir=probes_dir,
            device=device,
        )
        records[layer] = json.loads(record_path.read_text()) if record_path.exists() else None
    return records
