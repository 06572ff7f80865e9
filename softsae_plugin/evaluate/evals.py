"""The evaluations `sae-lens eval` runs: their SAEBench ids, the metrics each reports, the summary table's
columns, and the labels a result can carry.
"""

from __future__ import annotations

import random

import numpy as np
import torch

import softsae_plugin  # noqa: F401  (registers softsae, so SoftSAE checkpoints load)

EVALS = {
    "absorption": "SAEBench's first-letter feature absorption (mean_absorption_fraction_score)",
    "splitting": "SAEBench's feature splitting (mean_num_split_features), from the same first-letter k-sparse "
    "probing run as absorption: asking for both runs it once",
    "scr": "SAEBench's spurious correlation removal (scr_metric_threshold_2); needs bias_in_bios and amazon "
    "reviews (the Hub, or --datasets-dir)",
    "tpp": "SAEBench's targeted probe perturbation (tpp_threshold_10_total_metric); same datasets as scr",
    "core": "SAEBench's core eval: reconstruction (explained_variance) and the model's loss with the SAE spliced in "
    "(ce_loss_score), on core.dataset (SAEBench's openwebtext; local:english-wikipedia offline)",
    "sparse_probing": "SAEBench's sparse probing (sae_top_1_test_accuracy); its datasets from the Hub or "
    "--datasets-dir (set sparse_probing.dataset_names to those you have)",
    "saelens": "SAE-Lens' own run_evals (its explained_variance and ce_loss_score), on saelens.dataset",
}


# SAEBench's eval type ids, which name its output folders and JSON files (saelens_core: this command's own, named
# so that SAEBench's graphing loaders, which pick a parser by a word in the file's path, read it as core-like).
ABSORPTION_ID, SCR_ID, TPP_ID = "absorption_first_letter", "scr", "tpp"


CORE_ID, SPARSE_PROBING_ID, SAELENS_ID = "core", "sparse_probing", "saelens_core"


EVAL_IDS = (ABSORPTION_ID, SCR_ID, TPP_ID, CORE_ID, SPARSE_PROBING_ID, SAELENS_ID)


# The --set / --eval-config section of each eval's settings, and the eval type id whose config it sets.
SECTION_EVAL_IDS = {"absorption": ABSORPTION_ID, "scr": SCR_ID, "tpp": TPP_ID, "core": CORE_ID,
                    "sparse_probing": SPARSE_PROBING_ID, "saelens": SAELENS_ID}  # fmt: skip


# Each table column's source in the result JSON: eval type id, metric category, metric name.
METRIC_SOURCES = {
    "mean_absorption_fraction_score": (ABSORPTION_ID, "mean", "mean_absorption_fraction_score"),
    "mean_num_split_features": (ABSORPTION_ID, "mean", "mean_num_split_features"),
    "scr_metric_threshold_2": (SCR_ID, "scr_metrics", "scr_metric_threshold_2"),
    "tpp_threshold_10_total_metric": (TPP_ID, "tpp_metrics", "tpp_threshold_10_total_metric"),
    "explained_variance": (CORE_ID, "reconstruction_quality", "explained_variance"),
    "ce_loss_score": (CORE_ID, "model_performance_preservation", "ce_loss_score"),
    "sae_top_1_test_accuracy": (SPARSE_PROBING_ID, "sae", "sae_top_1_test_accuracy"),
    "saelens_explained_variance": (SAELENS_ID, "reconstruction_quality", "explained_variance"),
    "saelens_ce_loss_score": (SAELENS_ID, "model_performance_preservation", "ce_loss_score"),
}


EVAL_METRICS = {
    "absorption": ("mean_absorption_fraction_score",),
    "splitting": ("mean_num_split_features",),
    "scr": ("scr_metric_threshold_2",),
    "tpp": ("tpp_threshold_10_total_metric",),
    "core": ("explained_variance", "ce_loss_score"),
    "sparse_probing": ("sae_top_1_test_accuracy",),
    "saelens": ("saelens_explained_variance", "saelens_ce_loss_score"),
}


TABLE_COLUMNS = (
    "SAE",
    "architecture",
    "k",
    "L0",
    "FVE",
    *(name for metric in METRIC_SOURCES for name in (metric, f"{metric}_std")),
    "n_seeds",
    "decoder",
    "labels",
)


# SAEBench's default text for the core eval; offline, the local held-out text serves it (and SAE-Lens' evals).
DEFAULT_TEXT = "Skylion007/openwebtext"


# The description eval/make_pipeline_check_datasets.py stores with its stand-in datasets starts with this.
PIPELINE_CHECK_MARK = "PIPELINE CHECK"


PIPELINE_CHECK_LABEL = "pipeline check, not a benchmark"


# SAEBench's own tolerance for unit-norm decoder rows in float32 (sae_bench_utils.general_utils.check_decoder_norms).
UNIT_NORM_ATOL = 1e-5


UNIT_ROWS = "unit-norm rows"


# The key `sae-lens eval` adds to SAEBench's result JSON for the labels of its settings.
NOTES_KEY = "sae_lens_eval_notes"


class EvalError(RuntimeError):
    """An evaluation that did not produce its result (skipped, refused or non-finite)."""


def reseed(seed: int) -> None:
    # SAEBench's absorption eval does not seed its probe training; seeding here makes reruns repeatable.
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
