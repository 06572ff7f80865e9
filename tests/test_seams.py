"""The private or fragile seams of SAE-Lens and SAEBench this package relies on, each checked by name.

If an upgrade of SAE-Lens or SAEBench moves one of them, the test says which seam changed and what uses it, instead
of the package silently changing behaviour (a patch that no longer lands, a keyword that no longer exists).
"""

import inspect
from collections.abc import Callable

import pytest


def _module(name: str):
    import importlib

    return importlib.import_module(name)


def _params(function: Callable) -> list[str]:
    return list(inspect.signature(function).parameters)


def _has(module: str, name: str) -> bool:
    return hasattr(_module(module), name)


def _registries_are_module_dicts() -> bool:
    # softsae_plugin_autoload replaces these globals with lazy dicts; SAE-Lens' lookups must read the globals.
    registry = _module("sae_lens.registry")
    source = inspect.getsource(registry)
    return (
        isinstance(registry.SAE_CLASS_REGISTRY, dict)
        and isinstance(registry.SAE_TRAINING_CLASS_REGISTRY, dict)
        and "SAE_CLASS_REGISTRY[" in source
        and "SAE_TRAINING_CLASS_REGISTRY[" in source
    )


def _trainer_state() -> bool:
    from sae_lens.training.sae_trainer import SAETrainer

    source = inspect.getsource(SAETrainer)
    # continue_from_checkpoint, guard_trainer, training_statistics and the quiet progress bar read or replace these.
    return all(
        name in source
        for name in (
            "self.n_training_steps",
            "self.checkpoint_thresholds",
            "self.data_provider",
            "self.n_frac_active_samples",
            "def dead_neurons",
            "def feature_sparsity",
            "self.lr_scheduler",
            "tqdm(",
        )
    ) and _has("sae_lens.training.sae_trainer", "tqdm")


def _absorption_vocabulary_call_sites() -> bool:
    # absorption_vocabulary patches get_alpha_tokens where SAEBench's two modules look it up.
    feature_absorption = _module("sae_bench.evals.absorption.feature_absorption")
    common = _module("sae_bench.evals.absorption.common")
    return (
        "get_alpha_tokens(" in inspect.getsource(feature_absorption)
        and "get_alpha_tokens(" in inspect.getsource(common)
        and callable(feature_absorption.get_alpha_tokens)
        and callable(common.get_alpha_tokens)
    )


def _store_state_seams() -> bool:
    # training/store_state.py: the store's pass over the text, its lazily built stream and mixing_buffer's locals.
    from sae_lens.multi_sae_training_runner import MultiSAETrainingRunner
    from sae_lens.training.activations_store import ActivationsStore
    from sae_lens.training.mixing_buffer import mixing_buffer

    store_source = inspect.getsource(ActivationsStore)
    buffer_code = mixing_buffer.__wrapped__.__code__
    methods = ("_iterate_tokenized_sequences", "_iterate_filtered_activations",
               "_iterate_filtered_multi_hook_activations", "get_multi_hook_data_loader", "state_dict")  # fmt: skip
    return (
        all(hasattr(ActivationsStore, name) for name in methods)
        and "self.iterable_sequences = self._iterate_tokenized_sequences()" in store_source
        and "self._dataloader = self.get_data_loader()" in store_source
        and {"storage_buffer", "serving_buffer", "batch_idx", "num_serving_batches"} <= set(buffer_code.co_varnames)
        and "torch.randperm(storage_buffer.shape[0])" in inspect.getsource(mixing_buffer.__wrapped__)
        and _params(MultiSAETrainingRunner._save_runner_checkpoint_files) == ["self", "checkpoint_path"]
    )


def _core_settings() -> list[str]:
    import dataclasses

    from softsae_plugin.evaluate.options import CoreSettings

    return [f.name for f in dataclasses.fields(CoreSettings)]


def _split_by_sae_seams() -> bool:
    import re

    from sae_lens.training.multi_sae_trainer import MultiSAETrainer
    from sae_lens.training.sae_trainer import SAETrainer

    from softsae_plugin.training.by_sae import TRAINER_COUNTERS

    saved = set(re.findall(r'"(\w+)":', inspect.getsource(SAETrainer.save_trainer_state)))
    sent = {"optimizer", "lr_scheduler", "coefficient_schedulers", *TRAINER_COUNTERS}
    return (
        saved - {"n_training_samples", "n_training_steps"} == sent  # the clock is every rank's own
        and _params(MultiSAETrainer._log_train_step) == ["self", "step_outputs"]
        and _params(MultiSAETrainer._update_pbar)[:3] == ["self", "step_outputs", "pbar"]
    )


SEAMS: dict[str, tuple[str, Callable[[], bool]]] = {
    "sae_lens.load_model.load_model(model_class_name, model_name, device, model_from_pretrained_kwargs, ...)": (
        "sae-lens show builds a model that is not local with it, from the SAE's metadata",
        lambda: (
            _params(_module("sae_lens.load_model").load_model)[:4]
            == ["model_class_name", "model_name", "device", "model_from_pretrained_kwargs"]
        ),
    ),
    "sae_lens.llm_sae_training_runner._parse_cfg_args(args)": (
        "sae-lens train parses the runner CLI with it",
        lambda: _params(_module("sae_lens.llm_sae_training_runner")._parse_cfg_args) == ["args"],
    ),
    "sae_lens.saes.topk_sae.calculate_topk_aux_acts(k_aux, hidden_pre, dead_neuron_mask)": (
        "softsae's AuxK loss calls it with these keywords",
        lambda: (
            _params(_module("sae_lens.saes.topk_sae").calculate_topk_aux_acts)
            == ["k_aux", "hidden_pre", "dead_neuron_mask"]
        ),
    ),
    "SAETrainer.save_checkpoint(checkpoint_name, base_path, wandb_aliases)": (
        "guard_trainer wraps it to write whole, finite checkpoints",
        lambda: (
            _params(_module("sae_lens.training.sae_trainer").SAETrainer.save_checkpoint)
            == ["self", "checkpoint_name", "base_path", "wandb_aliases"]
        ),
    ),
    "SAETrainer.save_trainer_state's keys; MultiSAETrainer._log_train_step(step_outputs) / _update_pbar": (
        "a sweep split by SAE sends rank 0 what a checkpoint saves, and shows and logs a rank's own SAEs only",
        _split_by_sae_seams,
    ),
    "SAETrainer's counters, dead-latent state and tqdm bar": (
        "resume, the training summary and train_on_activations(progress=False) read or replace them",
        _trainer_state,
    ),
    "LanguageModelSAETrainingRunner.run_trainer_with_interruption_handling(trainer) / save_final_sae": (
        "sae-lens train's runner subclass overrides both",
        lambda: (
            _params(_module("sae_lens.llm_sae_training_runner").LanguageModelSAETrainingRunner.save_final_sae)
            == ["self", "sae", "output_path", "log_feature_sparsity"]
            and _params(
                _module(
                    "sae_lens.llm_sae_training_runner"
                ).LanguageModelSAETrainingRunner.run_trainer_with_interruption_handling
            )
            == ["self", "trainer"]
        ),
    ),
    "ActivationsStore.load_from_checkpoint": (
        "--exact_resume turns SAE-Lens' skip-ahead off through it",
        lambda: (
            _has("sae_lens.training.activations_store", "ActivationsStore")
            and hasattr(_module("sae_lens.training.activations_store").ActivationsStore, "load_from_checkpoint")
        ),
    ),
    "ActivationsStore's pass over the text and stream, mixing_buffer's buffer, the multi runner's checkpoint files": (
        "StoreState saves and restores each rank's exact data position (resume without replay)",
        _store_state_seams,
    ),
    "sae_lens.registry.SAE_CLASS_REGISTRY / SAE_TRAINING_CLASS_REGISTRY": (
        "softsae_plugin_autoload replaces these module globals with lazy registries",
        _registries_are_module_dicts,
    ),
    "HookedTransformer in SAEBench's absorption, scr_and_tpp, core and sparse_probing main modules": (
        "serve_model patches that name while an eval runs",
        lambda: all(
            _has(f"sae_bench.evals.{name}.main", "HookedTransformer")
            for name in ("absorption", "scr_and_tpp", "core", "sparse_probing")
        ),
    ),
    "load_dataset in sae_lens.training.activations_store": (
        "serve_text patches that name so that the core and saelens evals read the local text offline",
        lambda: _has("sae_lens.training.activations_store", "load_dataset"),
    ),
    "multiple_evals(selected_saes, output_folder, ...) of SAEBench's core eval": (
        "the core eval is called with CoreSettings' fields as keywords",
        lambda: (
            (
                {"selected_saes", "output_folder", "dtype", "device", "force_rerun"}
                | {f for f in _core_settings() if f not in ("model_name", "random_seed", "llm_dtype")}
            )
            <= set(_params(_module("sae_bench.evals.core.main").multiple_evals))
        ),
    ),
    "load_dataset in SAEBench's scr_and_tpp.dataset_creation and sae_bench_utils.dataset_utils": (
        "serve_datasets wraps that name (records each dataset read; with --datasets-dir, loads local copies)",
        lambda: (
            _has("sae_bench.evals.scr_and_tpp.dataset_creation", "load_dataset")
            and _has("sae_bench.sae_bench_utils.dataset_utils", "load_dataset")
        ),
    ),
    "get_alpha_tokens in SAEBench's absorption feature_absorption and common modules": (
        "absorption_vocabulary serves the sorted (or reduced) vocabulary there",
        _absorption_vocabulary_call_sites,
    ),
    "run_k_sparse_probing_experiment / run_feature_absortion_experiment in SAEBench's absorption main": (
        "absorption_artifacts_in passes them the artifact folders",
        lambda: (
            {"experiment_dir", "probes_dir"}
            <= set(_params(_module("sae_bench.evals.absorption.main").run_k_sparse_probing_experiment))
            and {"experiment_dir", "sparse_probing_experiment_dir", "probes_dir"}
            <= set(_params(_module("sae_bench.evals.absorption.main").run_feature_absortion_experiment))
        ),
    ),
    "run_eval(config, selected_saes, device, output_path, force_rerun[, artifacts_path]) of SAEBench's evals": (
        "sae-lens eval calls them once per SAE with these keywords",
        lambda: (
            _params(_module("sae_bench.evals.absorption.main").run_eval)[:5]
            == ["config", "selected_saes", "device", "output_path", "force_rerun"]
            and "artifacts_path" in _params(_module("sae_bench.evals.scr_and_tpp.main").run_eval)
            and "artifacts_path" in _params(_module("sae_bench.evals.sparse_probing.main").run_eval)
        ),
    ),
    "get_results_filepath (via general_utils) and get_sae_bench_version in SAEBench's eval main modules": (
        "saebench_outputs puts the seed in the result file names and SAEBench's version in sae_bench_commit_hash",
        lambda: (
            _has("sae_bench.sae_bench_utils.general_utils", "get_results_filepath")
            and all(
                "general_utils.get_results_filepath(" in inspect.getsource(_module(f"sae_bench.evals.{name}.main"))
                and _has(f"sae_bench.evals.{name}.main", "get_sae_bench_version")
                for name in ("absorption", "scr_and_tpp", "core", "sparse_probing")
            )
        ),
    ),
    "run_eval_single_sae(config, sae, model, device, artifacts_folder, save_activations) of SAEBench's probing": (
        "train_llm_probes caches the model's probes with it before the per-SAE run_evals",
        lambda: (
            _params(_module("sae_bench.evals.sparse_probing.main").run_eval_single_sae)
            == ["config", "sae", "model", "device", "artifacts_folder", "save_activations"]
            and _has("sae_bench.evals.sparse_probing.main", "EVAL_TYPE_ID_SPARSE_PROBING")
        ),
    ),
    "load_or_train_probe in SAEBench's absorption common module": (
        "sae-lens eval trains the first-letter probe with it before run_eval",
        lambda: (
            {"model", "base_template", "pos_idx", "layer", "probes_dir", "device"}
            <= set(_params(_module("sae_bench.evals.absorption.common").load_or_train_probe))
        ),
    ),
}


@pytest.mark.parametrize("seam", list(SEAMS))
def test_seam_is_where_the_package_expects_it(seam):
    used_by, check = SEAMS[seam]
    try:
        ok = check()
    except (AttributeError, ImportError, TypeError, ValueError) as err:
        ok, why = False, f" ({type(err).__name__}: {err})"
    else:
        why = ""
    assert ok, f"SAE-Lens/SAEBench seam changed: {seam}{why}; {used_by}. Adapt softsae_plugin to the new version."
