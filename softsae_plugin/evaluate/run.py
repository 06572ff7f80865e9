"""Running SAEBench's evals per SAE and seed (each SAE from the same random state), checking that each produced a
finite result, and SAE-Lens' own run_evals beside them.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import shutil
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from functools import partial
from pathlib import Path
from typing import Any

import softsae_plugin  # noqa: F401  (registers softsae, so SoftSAE checkpoints load)
from softsae_plugin.evaluate.absorption import (
    absorption_artifacts_in,
    absorption_skip_reason,
    absorption_vocabulary,
    stop_after_hook_layer,
    train_absorption_probes,
)
from softsae_plugin.evaluate.evals import (
    ABSORPTION_ID,
    CORE_ID,
    DEFAULT_TEXT,
    EVAL_IDS,
    PIPELINE_CHECK_LABEL,
    PIPELINE_CHECK_MARK,
    SAELENS_ID,
    SCR_ID,
    SECTION_EVAL_IDS,
    SPARSE_PROBING_ID,
    TPP_ID,
    EvalError,
    reseed,
)
from softsae_plugin.evaluate.options import CoreSettings, SaeLensSettings, eval_configs
from softsae_plugin.evaluate.saes import SAESpec
from softsae_plugin.evaluate.serving import serve_datasets, serve_model, serve_text
from softsae_plugin.offline.text import LOCAL_TEXT_ID


def _no_reason(spec: SAESpec) -> str:
    return "SAEBench skipped it without saying why"


def check_results(
    eval_id: str,
    saes: Sequence[SAESpec],
    eval_dir: Path,
    started: float,
    force_rerun: bool,
    explain: Callable[[SAESpec], str],
) -> None:
    """Fail unless SAEBench wrote a result with finite metrics for every SAE (in this run, under force-rerun)."""
    for spec in saes:
        path = spec.result_path(eval_dir)
        if not path.exists():
            raise EvalError(f"{eval_id}: no result for {spec.name} ({path}); {explain(spec)}")
        if path.stat().st_mtime < started:
            if force_rerun:
                raise EvalError(f"{eval_id}: SAEBench kept an old result for {spec.name} ({path})")
            print(f"{eval_id}: reusing the existing result for {spec.name} ({path})")
        metrics = json.loads(path.read_text())["eval_result_metrics"]
        bad = {
            f"{category}.{key}": value
            for category, values in metrics.items()
            for key, value in values.items()
            if isinstance(value, float) and not math.isfinite(value)
        }
        if bad:
            raise EvalError(f"{eval_id}: SAEBench returned non-finite metrics for {spec.name}: {bad}")


def eval_labels(
    evals: Sequence[str],
    served: dict[str, str],
    absorption_vocab_size: int | None,
    overrides: dict[str, dict[str, Any]],
    configs: dict[str, Any],
) -> dict[str, list[str]]:
    """Per eval type id, the labels its numbers carry: where its settings depart from SAEBench's own."""
    labels: dict[str, list[str]] = {eval_id: [] for eval_id in EVAL_IDS}
    if absorption_vocab_size is not None:
        labels[ABSORPTION_ID].append(
            f"reduced vocabulary: first-letter probe on about {absorption_vocab_size} of the model's alphabetic "
            "tokens, not comparable with full-vocabulary SAEBench numbers"
        )
    if served:
        stand_in = any(note.startswith(PIPELINE_CHECK_MARK) for note in served.values())
        for eval_id in (SCR_ID, TPP_ID, SPARSE_PROBING_ID):
            labels[eval_id].append(
                f"{PIPELINE_CHECK_LABEL}: stand-in datasets from --datasets-dir"
                if stand_in
                else f"datasets from local copies (--datasets-dir): {', '.join(sorted(served))}"
            )
    for eval_id in (CORE_ID, SAELENS_ID):
        if eval_id in configs and configs[eval_id].dataset == LOCAL_TEXT_ID:
            labels[eval_id].append(
                f"measured on {LOCAL_TEXT_ID} (held-out paragraphs of gensim's Wikipedia sample), not {DEFAULT_TEXT}"
            )
    for section, eval_id in SECTION_EVAL_IDS.items():
        if eval_id not in configs:
            continue
        # The values as the eval's config holds them (parsed), not as typed on the command line.
        keys = [key for key in overrides[section] if key not in ("random_seed", "dataset")]
        changed = {key: getattr(configs[eval_id], key) for key in keys}
        if changed:
            labels[eval_id].append(f"settings changed from the eval's defaults: {changed}")
    return labels


def run_evals(
    saes: Sequence[SAESpec],
    evals: Sequence[str],
    model_name: str,
    out: Path,
    *,
    device: str,
    overrides: dict[str, dict[str, Any]],
    models: dict[str, Any],
    seed_offset: int = 0,
    datasets_dir: Path | None = None,
    force_rerun: bool = True,
    absorption_vocab_size: int | None = None,
) -> dict[str, str]:
    """Run the evals on `saes` and check every result; return the datasets served from local copies.

    SAEBench's `run_eval` runs once per SAE, each time from the same random state (the eval's `random_seed` plus
    `seed_offset`), so an SAE's numbers do not depend on the other SAEs of the command or their order. `models`
    holds the model per dtype (see `build_model`), built once for every seed. Results go to `out/<eval type id>/`
    and SAEBench's artifacts to `out/saebench/<model>/` (emptied first under `force_rerun`, so no probe or cached
    activation from an earlier run is reused).
    """
    from sae_bench.evals.absorption import main as absorption_main
    from sae_bench.evals.core import main as core_main
    from sae_bench.evals.scr_and_tpp import main as scr_tpp_main
    from sae_bench.evals.sparse_probing import main as sparse_probing_main

    workdir = out / "saebench" / re.sub(r"[^A-Za-z0-9._-]", "_", model_name)
    if force_rerun and workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    served: dict[str, str] = {}
    modules = {ABSORPTION_ID: absorption_main, SCR_ID: scr_tpp_main, TPP_ID: scr_tpp_main, CORE_ID: core_main,
               SPARSE_PROBING_ID: sparse_probing_main}  # fmt: skip
    for eval_id, config in eval_configs(evals, model_name, overrides, seed_offset).items():
        eval_dir = out / eval_id
        print(f"== {eval_id} on {len(saes)} SAE(s), model {model_name}, seed {config.random_seed}", flush=True)
        started = time.time()
        explain: Callable[[SAESpec], str] = _no_reason
        with ExitStack() as stack:
            if eval_id in modules:
                stack.enter_context(serve_model(modules[eval_id], model_name, models))
            if eval_id == ABSORPTION_ID:
                stack.enter_context(absorption_vocabulary(absorption_vocab_size, config.random_seed))
                stack.enter_context(stop_after_hook_layer(models[config.llm_dtype], saes))
                train_absorption_probes(models[config.llm_dtype], saes, config, workdir, device)
                stack.enter_context(absorption_artifacts_in(workdir))
                eval_dir.mkdir(parents=True, exist_ok=True)  # SAEBench's absorption CLI makes it, run_eval does not
                run = partial(absorption_main.run_eval, output_path=str(eval_dir))
                explain = partial(absorption_skip_reason, workdir, config=config)
            elif eval_id in (SCR_ID, TPP_ID, SPARSE_PROBING_ID):
                if datasets_dir is not None:
                    stack.enter_context(serve_datasets(datasets_dir, served))
                # SAEBench's scr/tpp add their own subfolder to output_path; sparse probing writes into it.
                output = out if eval_id != SPARSE_PROBING_ID else eval_dir
                run = partial(modules[eval_id].run_eval, output_path=str(output), artifacts_path=str(workdir))
            elif eval_id == CORE_ID:
                stack.enter_context(serve_text(config.dataset))
                run = partial(_run_core, output_folder=str(eval_dir))
            else:
                run = partial(run_saelens_evals, model=models[config.llm_dtype], eval_dir=eval_dir)
            for spec in saes:
                reseed(config.random_seed)
                run(config=config, selected_saes=[spec.selection()], device=device, force_rerun=force_rerun)
        check_results(eval_id, saes, eval_dir, started, force_rerun, explain)
    return served


def _run_core(
    config: CoreSettings, selected_saes: list[Any], device: str, force_rerun: bool, output_folder: str
) -> None:
    # SAEBench's core eval takes its settings as arguments, not as a config object.
    from sae_bench.evals.core.main import multiple_evals

    settings = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    for own in ("model_name", "random_seed", "llm_dtype"):
        settings.pop(own)
    multiple_evals(selected_saes=selected_saes, output_folder=output_folder, dtype=config.llm_dtype, device=device,
                   force_rerun=force_rerun, **settings)  # fmt: skip


def run_saelens_evals(
    config: SaeLensSettings, selected_saes: list[Any], device: str, force_rerun: bool, model: Any, eval_dir: Path
) -> None:
    """SAE-Lens' own `run_evals` on each SAE object (every metric of its EvalConfig on), its result written like
    SAEBench's: `eval_dir/<name>_custom_sae_eval_results.json` with `eval_result_metrics` by category."""
    from sae_bench.sae_bench_utils.general_utils import get_results_filepath
    from sae_lens.evals import EvalConfig, run_evals
    from sae_lens.training.activation_scaler import ActivationScaler
    from sae_lens.training.activations_store import ActivationsStore

    eval_dir.mkdir(parents=True, exist_ok=True)
    settings = EvalConfig(
        batch_size_prompts=config.batch_size_prompts,
        n_eval_reconstruction_batches=config.n_eval_reconstruction_batches,
        n_eval_sparsity_variance_batches=config.n_eval_sparsity_variance_batches,
        compute_kl=True,
        compute_ce_loss=True,
        compute_l2_norms=True,
        compute_sparsity_metrics=True,
        compute_variance_metrics=True,
    )
    for name, sae in selected_saes:
        path = Path(get_results_filepath(str(eval_dir), name, "custom_sae"))
        if path.exists() and not force_rerun:
            continue
        with serve_text(config.dataset):
            store = ActivationsStore.from_sae(model, sae, context_size=config.context_size, dataset=config.dataset)
        # Shuffled as SAEBench's core eval shuffles its text (with its fixed seed 42, this eval's default seed).
        store.shuffle_input_dataset(seed=config.random_seed)
        # The saved SAE takes raw activations: no scaling (SAE-Lens folded it into the weights).
        metrics, _ = run_evals(sae, store, model, ActivationScaler(), settings)
        result = {
            "eval_type_id": SAELENS_ID,
            "eval_config": dataclasses.asdict(config),
            "eval_result_metrics": metrics,
            "sae_cfg_dict": sae.cfg.to_dict(),
        }
        path.write_text(json.dumps(result, indent=2, default=str) + "\n")
