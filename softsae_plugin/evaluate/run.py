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
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from functools import partial
from pathlib import Path
from typing import Any
from unittest import mock

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
    SAELENS_ID,
    SCR_ID,
    SPARSE_PROBING_ID,
    TPP_ID,
    EvalError,
    reseed,
)
from softsae_plugin.evaluate.options import CoreSettings, SaeLensSettings, eval_configs
from softsae_plugin.evaluate.provenance import PROVENANCE_KEY, package_provenance, saebench_version, settings_changed
from softsae_plugin.evaluate.saes import SAESpec, hook_layer, seeded_results_filepath
from softsae_plugin.evaluate.serving import serve_datasets, serve_model, serve_text

# Kept in each seed's SAEBench artifact folder: the datasets each eval read into it (`dataset_record`).
DATASETS_LEDGER = "sae_lens_eval_datasets.json"


def _no_reason(spec: SAESpec) -> str:
    return "SAEBench skipped it without saying why"


def check_results(
    eval_id: str,
    saes: Sequence[SAESpec],
    eval_dir: Path,
    started: float,
    force_rerun: bool,
    explain: Callable[[SAESpec], str],
    seed_offset: int = 0,
) -> None:
    """Fail unless SAEBench wrote a result with finite metrics for every SAE (in this run, under force-rerun)."""
    for spec in saes:
        path = spec.result_path(eval_dir, seed_offset)
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
    quick: bool = False,
) -> None:
    """Run the evals on `saes`, check every result and record in it what produced it (`provenance`).

    SAEBench's `run_eval` runs once per SAE, each time from the same random state (the eval's `random_seed` plus
    `seed_offset`), so an SAE's numbers do not depend on the other SAEs of the command or their order. `models`
    holds the model per dtype (see `build_model`), built once for every seed. Results go to `out/<eval type id>/`,
    named with the seed (`SAESpec.result_path`), and SAEBench's artifacts to `out/saebench/<model>/` (emptied first
    under `force_rerun`, so no probe or cached activation from an earlier run is reused). A result SAEBench keeps
    from an earlier run (without `force_rerun`) keeps the provenance it was written with.
    """
    from sae_bench.evals.absorption import main as absorption_main
    from sae_bench.evals.core import main as core_main
    from sae_bench.evals.scr_and_tpp import main as scr_tpp_main
    from sae_bench.evals.sparse_probing import main as sparse_probing_main

    workdir = out / "saebench" / re.sub(r"[^A-Za-z0-9._-]", "_", model_name)
    if force_rerun and workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    # The datasets each eval read into this artifact folder, kept with the artifacts (its cached activations):
    # a result computed from cached activations names the data they came from.
    ledger_path = workdir / DATASETS_LEDGER
    ledger = json.loads(ledger_path.read_text()) if ledger_path.exists() else {}
    modules = {ABSORPTION_ID: absorption_main, SCR_ID: scr_tpp_main, TPP_ID: scr_tpp_main, CORE_ID: core_main,
               SPARSE_PROBING_ID: sparse_probing_main}  # fmt: skip
    for eval_id, config in eval_configs(evals, model_name, overrides, seed_offset, quick=quick).items():
        eval_dir = out / eval_id
        print(f"== {eval_id} on {len(saes)} SAE(s), model {model_name}, seed {config.random_seed}", flush=True)
        started = time.time()
        explain: Callable[[SAESpec], str] = _no_reason
        read: dict[str, dict[str, Any]] = ledger.setdefault(eval_id, {})
        probes: dict[int, dict[str, Any] | None] = {}
        with ExitStack() as stack:
            stack.enter_context(saebench_outputs(list(modules.values()), seed_offset))
            if eval_id in modules:
                stack.enter_context(serve_model(modules[eval_id], model_name, models))
            if eval_id == ABSORPTION_ID:
                stack.enter_context(absorption_vocabulary(absorption_vocab_size, config.random_seed))
                stack.enter_context(stop_after_hook_layer(models[config.llm_dtype], saes))
                probes = train_absorption_probes(models[config.llm_dtype], saes, config, workdir, device)
                stack.enter_context(absorption_artifacts_in(workdir))
                eval_dir.mkdir(parents=True, exist_ok=True)  # SAEBench's absorption CLI makes it, run_eval does not
                run = partial(absorption_main.run_eval, output_path=str(eval_dir))
                explain = partial(absorption_skip_reason, workdir, config=config)
            elif eval_id in (SCR_ID, TPP_ID, SPARSE_PROBING_ID):
                stack.enter_context(serve_datasets(datasets_dir, read))
                # SAEBench's scr/tpp add their own subfolder to output_path; sparse probing writes into it.
                output = out if eval_id != SPARSE_PROBING_ID else eval_dir
                run = partial(modules[eval_id].run_eval, output_path=str(output), artifacts_path=str(workdir))
                if eval_id == SPARSE_PROBING_ID:
                    train_llm_probes(config, saes, models[config.llm_dtype], device, workdir)
            elif eval_id == CORE_ID:
                stack.enter_context(serve_text(config.dataset, read))
                run = partial(_run_core, output_folder=str(eval_dir))
            else:
                stack.enter_context(serve_text(config.dataset, read))
                model = models[config.llm_dtype]
                run = partial(run_saelens_evals, model=model, eval_dir=eval_dir, seed_offset=seed_offset)
            for spec in saes:
                if eval_id in (CORE_ID, SAELENS_ID):
                    read.clear()  # each SAE reads its text afresh
                before = time.time()
                reseed(config.random_seed)
                run(config=config, selected_saes=[spec.selection()], device=device, force_rerun=force_rerun)
                path = spec.result_path(eval_dir, seed_offset)
                if path.exists() and path.stat().st_mtime >= before:  # produced now, not kept from earlier
                    own = _own_record(eval_id, spec, config, probes, quick)
                    add_provenance(path, spec, model_name, seed_offset, list(read.values()), own)
        ledger_path.write_text(json.dumps(ledger, indent=2) + "\n")
        check_results(eval_id, saes, eval_dir, started, force_rerun, explain, seed_offset)


def _own_record(
    eval_id: str, spec: SAESpec, config: Any, probes: dict[int, dict[str, Any] | None], quick: bool
) -> dict[str, Any]:
    # What only one eval knows of its data and settings: absorption's probe vocabulary, core's and saelens' text
    # and whether --quick chose their batches.
    if eval_id == ABSORPTION_ID:
        return {"probe_vocabulary": probes.get(hook_layer(spec.sae)) if spec.sae is not None else None}
    if eval_id == CORE_ID:
        return {"text": config.dataset, "quick": quick, "seed_used": False}  # SAEBench's core shuffles with seed 42
    if eval_id == SAELENS_ID:
        return {"text": config.dataset, "quick": quick}
    return {}


def add_provenance(
    path: Path,
    spec: SAESpec,
    model_name: str,
    seed_offset: int,
    datasets_read: list[dict[str, Any]],
    record: dict[str, Any],
) -> None:
    """Write into the result at `path`, just produced, what produced it (PROVENANCE_KEY): the datasets read, the
    settings that differ from SAEBench's published defaults (from the config the result itself stores), the seed,
    the decoder note, SAEBench's version, this package's version and commit, and `record` (the eval's own: the
    probe vocabulary; the text and --quick). The labels are computed from it later (`label_results`), for kept
    results too."""
    result = json.loads(path.read_text())
    result[PROVENANCE_KEY] = {
        "datasets": datasets_read,
        **record,
        "settings_changed": settings_changed(result["eval_type_id"], result["eval_config"], model_name),
        "random_seed": result["eval_config"].get("random_seed"),
        "seed_offset": seed_offset,
        "decoder": spec.decoder,
        "sae_bench_version": saebench_version(),
        **package_provenance(),
    }
    path.write_text(json.dumps(result, indent=2) + "\n")


@contextmanager
def saebench_outputs(modules: Sequence[Any], seed_offset: int) -> Iterator[None]:
    """While the block runs, SAEBench names its result files with the seed (`seeded_results_filepath`) and records
    its own version (`saebench_version`) in `sae_bench_commit_hash`.

    SAEBench's `get_sae_bench_version` runs `git rev-parse HEAD` in the working directory, which records the
    commit of whatever repository the command runs in, not SAEBench's. Its eval modules look the two functions up
    by name (`general_utils.get_results_filepath`, and `get_sae_bench_version` imported into each module).
    """
    import sae_bench.sae_bench_utils.general_utils as general_utils

    def results_filepath(output_path: str, sae_release: str, sae_id: str) -> str:
        return seeded_results_filepath(output_path, sae_release, sae_id, seed_offset)

    version = saebench_version()
    with ExitStack() as stack:
        stack.enter_context(mock.patch.object(general_utils, "get_results_filepath", results_filepath))
        for module in modules:
            stack.enter_context(mock.patch.object(module, "get_sae_bench_version", lambda: version))
        yield


def train_llm_probes(config: Any, saes: Sequence[SAESpec], model: Any, device: str, artifacts_path: Path) -> None:
    """Cache SAEBench's sparse-probing activations and model (LLM) probes for each dataset and hook, from the seed,
    before its per-SAE `run_eval`s (which then load them, as SAEBench does for every SAE after the first).

    SAEBench builds the cache inside the first SAE's evaluation: that SAE's probes would start from the random
    state the model's probes leave, the others' from the seed, so an SAE's numbers would depend on its place in
    the list. Here SAEBench's own `run_eval_single_sae` runs once per dataset and hook on the first SAE at that
    hook, each from the seed, and its result is discarded: only the cache it writes is kept.
    """
    import sae_bench.evals.sparse_probing.main as sparse_probing_main
    from sae_bench.sae_bench_utils.general_utils import load_and_format_sae, str_to_dtype

    hooks: dict[str, Any] = {}
    for spec in saes:
        _, sae, _ = load_and_format_sae(*spec.selection(), device)
        hooks.setdefault(sae.cfg.hook_name, sae.to(device=device, dtype=str_to_dtype(config.llm_dtype)))
    for hook, sae in hooks.items():
        # The folder SAEBench's run_eval reads them from.
        folder = artifacts_path / sparse_probing_main.EVAL_TYPE_ID_SPARSE_PROBING / config.model_name / hook
        for name in config.dataset_names:
            if (folder / f"{name}_activations.pt".replace("/", "_")).exists():
                continue
            one = dataclasses.replace(config, dataset_names=[name])
            reseed(config.random_seed)
            sparse_probing_main.run_eval_single_sae(one, sae, model, device, str(folder), save_activations=True)


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
    config: SaeLensSettings,
    selected_saes: list[Any],
    device: str,
    force_rerun: bool,
    model: Any,
    eval_dir: Path,
    seed_offset: int = 0,
) -> None:
    """SAE-Lens' own `run_evals` on each SAE object (every metric of its EvalConfig on), its result written like
    SAEBench's: `eval_dir/<name>_custom_sae_seed-N_eval_results.json` with `eval_result_metrics` by category,
    SAEBench's top-level keys and the SAE's config, so that SAEBench's graphing loaders read it."""
    from sae_bench.sae_bench_utils import get_eval_uuid, get_sae_lens_version
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
        path = Path(seeded_results_filepath(str(eval_dir), name, "custom_sae", seed_offset))
        if path.exists() and not force_rerun:
            continue
        store = ActivationsStore.from_sae(model, sae, context_size=config.context_size, dataset=config.dataset)
        # Shuffled as SAEBench's core eval shuffles its text (with its fixed seed 42, this eval's default seed).
        store.shuffle_input_dataset(seed=config.random_seed)
        # The saved SAE takes raw activations: no scaling (SAE-Lens folded it into the weights).
        metrics, _ = run_evals(sae, store, model, ActivationScaler(), settings)
        result = {
            "eval_type_id": SAELENS_ID,
            "eval_config": dataclasses.asdict(config),
            "eval_id": get_eval_uuid(),
            "datetime_epoch_millis": int(time.time() * 1000),
            "eval_result_metrics": metrics,
            "sae_bench_commit_hash": saebench_version(),
            "sae_lens_id": "custom_sae",
            "sae_lens_release_id": name,
            "sae_lens_version": get_sae_lens_version(),
            "sae_cfg_dict": sae.cfg.to_dict(),
        }
        path.write_text(json.dumps(result, indent=2, default=str) + "\n")
