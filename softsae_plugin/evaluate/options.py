"""`sae-lens eval`'s command line and the SAEBench config of each eval it builds from it (`--set`,
`--eval-config`, SAEBench's defaults for models outside its tables).
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import yaml

import softsae_plugin  # noqa: F401  (registers softsae, so SoftSAE checkpoints load)
from softsae_plugin.evaluate.evals import (
    ABSORPTION_ID,
    CORE_ID,
    DEFAULT_TEXT,
    EVALS,
    SAELENS_ID,
    SCR_ID,
    SECTION_EVAL_IDS,
    SPARSE_PROBING_ID,
    TPP_ID,
    EvalError,
)
from softsae_plugin.offline.smollm2 import is_local_model
from softsae_plugin.offline.text import LOCAL_TEXT_ID


@dataclasses.dataclass
class CoreSettings:
    """The settings of SAEBench's core eval (its `multiple_evals` arguments), with the values SAEBench publishes in
    its run-all scripts (200 reconstruction and 2,000 sparsity-variance batches of 16 prompts, special tokens left
    out of the reconstruction) and the feature-wise statistics on, which its output schema requires.

    SAEBench's core eval does not take a seed: it shuffles its text with the fixed seed 42, so every `--seeds`
    repeat measures the same tokens (`random_seed` only names the seed folder's config here).
    """

    model_name: str = ""
    random_seed: int = 42
    llm_dtype: str = "float32"
    n_eval_reconstruction_batches: int = 200
    n_eval_sparsity_variance_batches: int = 2000
    eval_batch_size_prompts: int = 16
    compute_featurewise_density_statistics: bool = True
    compute_featurewise_weight_based_metrics: bool = True
    exclude_special_tokens_from_reconstruction: bool = True
    dataset: str = DEFAULT_TEXT
    context_size: int = 128


@dataclasses.dataclass
class SaeLensSettings:
    """The settings of SAE-Lens' own run_evals (its EvalConfig, every metric on) and the text it reads, held to the
    batches SAEBench publishes for its core eval."""

    model_name: str = ""
    random_seed: int = 42
    llm_dtype: str = "float32"
    batch_size_prompts: int = 16
    n_eval_reconstruction_batches: int = 200
    n_eval_sparsity_variance_batches: int = 2000
    dataset: str = DEFAULT_TEXT
    context_size: int = 128


# `--quick`: core and saelens at about 1/40 of SAEBench's published batches (10 reconstruction batches, 1
# sparsity-variance batch of 8 prompts, special tokens kept), for a CPU; every result says so.
QUICK_SETTINGS = {
    "core": {"n_eval_reconstruction_batches": 10, "n_eval_sparsity_variance_batches": 1,
             "eval_batch_size_prompts": 8, "exclude_special_tokens_from_reconstruction": False},
    "saelens": {"n_eval_reconstruction_batches": 10, "n_eval_sparsity_variance_batches": 1, "batch_size_prompts": 8},
}  # fmt: skip


# Config fields this command sets itself; the rest of SAEBench's config can be overridden with --set.
OWN_FIELDS = ("model_name", "perform_scr")


# SAEBench's scr/tpp config has no batch-size default for models outside its own table.
FALLBACK_LLM_BATCH_SIZE = 32


def parser() -> argparse.ArgumentParser:
    evals_help = "\n".join(f"  {name:10s} {text}" for name, text in EVALS.items())
    parser = argparse.ArgumentParser(
        prog="sae-lens eval",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run SAEBench's own evaluation code, unchanged, on SAE-Lens SAEs (SoftSAE included), and "
        "write SAEBench's JSON results, a summary table (Markdown and CSV) and a plot per metric against L0.",
        epilog=f"evals:\n{evals_help}\n\n"
        "SAEBench config fields can be set per eval: --set absorption.k_sparse_probe_num_epochs=10, "
        "--set scr.train_set_size=200, or a YAML file with sections absorption/scr/tpp (--eval-config).",
    )
    parser.add_argument(
        "--evals",
        default=",".join(EVALS),
        help=f"comma-separated evals to run (default: all of {', '.join(EVALS)})",
    )
    parser.add_argument(
        "--sae",
        action="append",
        required=True,
        metavar="PATH_OR_RELEASE:SAE_ID",
        help="an SAE checkpoint folder (cfg.json + weights), or an SAE-Lens pretrained release and SAE id; "
        "repeat for more SAEs",
    )
    parser.add_argument(
        "--model",
        help="the model the SAEs read (default: the model_name in the checkpoints' cfg.json); a local id such "
        "as smollm2-135m-instruct-q4_1 is built offline",
    )
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    parser.add_argument(
        "--datasets-dir",
        type=Path,
        help="serve SCR/TPP datasets from local copies saved with datasets.save_to_disk, in folders named like "
        "their Hub ids (DIR/LabHC/bias_in_bios, DIR/canrager/amazon_reviews_mcauley_1and5)",
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="EVAL.FIELD=VALUE",
        help="override one SAEBench config field (VALUE is read as YAML, except for text fields)",
    )
    parser.add_argument(
        "--eval-config",
        type=Path,
        action="append",
        default=[],
        help="a YAML file of SAEBench config fields per eval (repeatable; later files and --set win)",
    )
    parser.add_argument(
        "--absorption-vocab-size",
        type=int,
        metavar="N",
        help="train SAEBench's first-letter probe on about N alphabetic tokens of the model's vocabulary (at "
        "least 20 per first letter, drawn with absorption.random_seed) instead of all of them; faster, but not "
        "comparable with full-vocabulary SAEBench numbers",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="core and saelens at about 1/40 of SAEBench's published batches (10 reconstruction / 1 "
        "sparsity-variance batch of 8 prompts, special tokens kept; SAEBench: 200 / 2000 of 16, special tokens "
        "left out), for a CPU; the results are labelled (--set core.FIELD=VALUE still wins)",
    )
    parser.add_argument(
        "--seeds",
        type=int,
        default=1,
        metavar="N",
        help="repeat every eval with N seeds (SAEBench's random_seed, +1, ...) and report each metric's mean and "
        "standard deviation (default 1)",
    )
    parser.add_argument(
        "--force-rerun",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="SAEBench's force_rerun, and a fresh artifact folder (default: on)",
    )
    parser.add_argument(
        "--checkpoint-eval",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also copy each checkpoint's results into <checkpoint>/eval/ (default: on)",
    )
    return parser


def parse_evals(text: str) -> list[str]:
    evals = [e.strip() for e in text.split(",") if e.strip()]
    unknown = [e for e in evals if e not in EVALS]
    if unknown or not evals:
        raise EvalError(f"--evals: unknown eval(s) {unknown}; expected a comma-separated subset of {list(EVALS)}")
    return evals


def override_sections(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    sections: dict[str, dict[str, Any]] = {name: {} for name in SECTION_EVAL_IDS}
    raw: list[tuple[str, str, Any]] = []
    for path in args.eval_config:
        data = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
            raise EvalError(f"--eval-config {path}: expected sections of fields, one per eval: {', '.join(sections)}")
        raw += [(section, key, value) for section, fields in data.items() for key, value in fields.items()]
    for item in args.overrides:
        key, sep, value = item.partition("=")
        section, dot, field = key.partition(".")
        if not sep or not dot:
            raise EvalError(f"--set {item!r}: expected EVAL.FIELD=VALUE, e.g. scr.train_set_size=200")
        raw.append((section, field, value))
    for section, field, value in raw:
        if section not in sections:
            hint = " (splitting is computed by the absorption eval)" if section == "splitting" else ""
            raise EvalError(f"config section {section!r} is unknown{hint}; expected one of {list(sections)}")
        sections[section][field] = value
    return sections


def _eval_config(cls: type, section: str, overrides: dict[str, Any], **own: Any) -> Any:
    """Build SAEBench's pydantic config `cls`: our fields, SAEBench's defaults, then the user's overrides."""
    names = [f.name for f in dataclasses.fields(cls)]
    for key in overrides:
        if key in OWN_FIELDS:
            raise EvalError(f"{section}.{key} is set by sae-lens eval itself (use --model)")
        if key not in names:
            near = difflib.get_close_matches(key, names, n=1)
            hint = f"; did you mean {near[0]!r}?" if near else ""
            raise EvalError(f"{section}.{key} is not a field of SAEBench's {cls.__name__}{hint}")
    # --set values arrive as text: read them as YAML unless the field is a string (a template like "{word}:").
    types = {f.name: f.type for f in dataclasses.fields(cls)}
    parsed = {k: yaml.safe_load(v) if isinstance(v, str) and types[k] is not str else v for k, v in overrides.items()}
    return cls(**{**own, **parsed})


def _default_llm_settings(model_name: str, default_batch_size: int | None) -> dict[str, Any]:
    # SAEBench's own CLIs take batch size and dtype from these tables; other models get float32.
    from sae_bench.sae_bench_utils.activation_collection import LLM_NAME_TO_BATCH_SIZE, LLM_NAME_TO_DTYPE

    batch_size = LLM_NAME_TO_BATCH_SIZE.get(model_name, default_batch_size or FALLBACK_LLM_BATCH_SIZE)
    return {"llm_batch_size": batch_size, "llm_dtype": LLM_NAME_TO_DTYPE.get(model_name, "float32")}


def eval_configs(
    evals: Sequence[str],
    model_name: str,
    overrides: dict[str, dict[str, Any]],
    seed_offset: int = 0,
    *,
    quick: bool = False,
) -> dict[str, Any]:
    """Each eval's config (SAEBench's, or this command's settings for core and saelens), keyed by eval type id,
    its random_seed moved on by `seed_offset`; with `quick`, core and saelens start from QUICK_SETTINGS (the
    user's overrides still win)."""
    from sae_bench.evals.absorption.eval_config import AbsorptionEvalConfig
    from sae_bench.evals.scr_and_tpp.eval_config import ScrAndTppEvalConfig
    from sae_bench.evals.sparse_probing.eval_config import SparseProbingEvalConfig

    configs: dict[str, Any] = {}
    if "absorption" in evals or "splitting" in evals:
        configs[ABSORPTION_ID] = _eval_config(
            AbsorptionEvalConfig,
            "absorption",
            overrides["absorption"],
            model_name=model_name,
            **_default_llm_settings(model_name, AbsorptionEvalConfig().llm_batch_size),
        )
    for eval_name, eval_id in (("scr", SCR_ID), ("tpp", TPP_ID)):
        if eval_name in evals:
            configs[eval_id] = _eval_config(
                ScrAndTppEvalConfig,
                eval_name,
                overrides[eval_name],
                model_name=model_name,
                perform_scr=eval_name == "scr",
                **_default_llm_settings(model_name, None),
            )
    if "sparse_probing" in evals:
        configs[SPARSE_PROBING_ID] = _eval_config(
            SparseProbingEvalConfig,
            "sparse_probing",
            overrides["sparse_probing"],
            model_name=model_name,
            **_default_llm_settings(model_name, None),
        )
    # Offline, the local model reads the local text; with the Hub, SAEBench's own default text.
    text = {"dataset": LOCAL_TEXT_ID} if is_local_model(model_name) else {}
    for eval_name, eval_id, cls in (("core", CORE_ID, CoreSettings), ("saelens", SAELENS_ID, SaeLensSettings)):
        if eval_name in evals:
            llm_dtype = _default_llm_settings(model_name, None)["llm_dtype"]
            reduced = QUICK_SETTINGS[eval_name] if quick else {}
            configs[eval_id] = _eval_config(cls, eval_name, {**reduced, **overrides[eval_name]},
                                            model_name=model_name, llm_dtype=llm_dtype, **text)  # fmt: skip
    for config in configs.values():
        config.random_seed += seed_offset
    return configs
