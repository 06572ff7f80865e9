"""`sae-lens eval`: SAEBench's own absorption, feature-splitting, SCR and TPP evaluations on any SAEs.

SAEBench's `run_eval` functions run unchanged on SAE-Lens SAE objects (SoftSAE included: SAEBench reads the
hook name and layer from `cfg.metadata` itself, and moves the SAE to the model's device and dtype). This
module only supplies what those functions cannot reach offline, and moves what they write:

- the model: built once (a local id such as SmolLM2-135M offline, any other name exactly as SAEBench loads
  it) and handed to every eval where SAEBench calls `HookedTransformer.from_pretrained_no_processing`;
- with `--datasets-dir`, local copies of the SCR/TPP datasets (`datasets.save_to_disk`) where SAEBench calls
  `load_dataset`;
- SAEBench's artifacts (first-letter probes, cached activations, per-SAE intermediate tables), which it
  writes inside its installed package or the working directory, go to `<out>/saebench/<model>/`, so two
  models never share a cached probe;
- the absorption eval's vocabulary, in sorted order rather than the tokenizer's per-process hash order (so a
  seeded run repeats), and with `--absorption-vocab-size` the subset its first-letter probe is trained on.

Each replacement is one name looked up inside one SAEBench module, patched only while that step runs; no
SAEBench file and no metric code changes. Around SAEBench's calls this module also gives every SAE unit-norm
decoder rows (folding them as SAEBench does for its own releases, or warning loudly where that is impossible),
evaluates each SAE from the same random state whatever else shares the command (SAEBench's `run_eval` once per
SAE, reseeded), repeats everything with `--seeds N` and reports the mean and spread, and labels every number
whose settings depart from SAEBench's (stand-in datasets, a reduced vocabulary) wherever it travels: the
result JSON, the table, the plots and the model card.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import difflib
import json
import math
import os
import random
import re
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from functools import partial
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from unittest import mock

import numpy as np
import torch
import yaml
from sae_lens import SAE

import softsae_plugin  # noqa: F401  (registers softsae, so SoftSAE checkpoints load)
from softsae_plugin.reliability import check_sae_folder
from softsae_plugin.smollm2 import is_local_model, load_local_model
from softsae_plugin.summary import SUMMARY_FILENAME
from softsae_plugin.text import LOCAL_TEXT_ID, english_text

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
# SAEBench's eval type ids, which name its output folders and JSON files (saelens: this command's own).
ABSORPTION_ID, SCR_ID, TPP_ID = "absorption_first_letter", "scr", "tpp"
CORE_ID, SPARSE_PROBING_ID, SAELENS_ID = "core", "sparse_probing", "saelens"
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


@dataclasses.dataclass
class CoreSettings:
    """The settings of SAEBench's core eval (its `multiple_evals` arguments, with its command line's defaults; the
    feature-wise statistics on, since SAEBench's output schema requires the metrics they feed)."""

    model_name: str = ""
    random_seed: int = 42
    llm_dtype: str = "float32"
    n_eval_reconstruction_batches: int = 10
    n_eval_sparsity_variance_batches: int = 1
    eval_batch_size_prompts: int = 8
    compute_featurewise_density_statistics: bool = True
    compute_featurewise_weight_based_metrics: bool = True
    exclude_special_tokens_from_reconstruction: bool = False
    dataset: str = DEFAULT_TEXT
    context_size: int = 128


@dataclasses.dataclass
class SaeLensSettings:
    """The settings of SAE-Lens' own run_evals (its EvalConfig, every metric on) and the text it reads."""

    model_name: str = ""
    random_seed: int = 42
    llm_dtype: str = "float32"
    batch_size_prompts: int = 8
    n_eval_reconstruction_batches: int = 10
    n_eval_sparsity_variance_batches: int = 1
    dataset: str = DEFAULT_TEXT
    context_size: int = 128


# Config fields this command sets itself; the rest of SAEBench's config can be overridden with --set.
OWN_FIELDS = ("model_name", "perform_scr")
# SAEBench's scr/tpp config has no batch-size default for models outside its own table.
FALLBACK_LLM_BATCH_SIZE = 32
LOCAL_DATASET_NOTE = "served from local copies in --datasets-dir"
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


@dataclasses.dataclass
class SAESpec:
    """One SAE to evaluate: a checkpoint folder, or an SAE-Lens release and SAE id (`RELEASE:SAE_ID`)."""

    name: str
    checkpoint: Path | None = None
    release: str | None = None
    sae_id: str | None = None
    sae: SAE[Any] | None = None
    training_summary: dict[str, Any] = dataclasses.field(default_factory=dict)
    decoder: str = ""  # what SAEBench is given: unit rows, rows folded to unit norm, or a warning (prepare_decoder)

    def selection(self) -> tuple[str, SAE[Any] | str]:
        """The (name, SAE object) or (release, SAE id) pair SAEBench's `run_eval` takes."""
        if self.sae is not None:
            return self.name, self.sae
        assert self.release is not None and self.sae_id is not None
        return self.release, self.sae_id

    def result_path(self, eval_dir: Path) -> Path:
        """Where SAEBench writes this SAE's result in `eval_dir` (SAEBench names custom SAEs 'custom_sae')."""
        from sae_bench.sae_bench_utils.general_utils import get_results_filepath

        release, sae_id = (self.name, "custom_sae") if self.sae is not None else self.selection()
        return Path(get_results_filepath(str(eval_dir), release, str(sae_id)))


def _parser() -> argparse.ArgumentParser:
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


def _parse_evals(text: str) -> list[str]:
    evals = [e.strip() for e in text.split(",") if e.strip()]
    unknown = [e for e in evals if e not in EVALS]
    if unknown or not evals:
        raise EvalError(f"--evals: unknown eval(s) {unknown}; expected a comma-separated subset of {list(EVALS)}")
    return evals


def _override_sections(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
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


def _sae_names(paths: Sequence[Path]) -> list[str]:
    # Names must be unique (they name SAEBench's result files): the path below the folders they share.
    if len(paths) <= 1:
        return [path.name for path in paths]
    common = Path(os.path.commonpath([str(p) for p in paths]))
    return [str(p.relative_to(common)).replace(os.sep, "-") or p.name for p in paths]


def load_saes(specs: Sequence[str], device: str) -> list[SAESpec]:
    """Resolve `--sae` values: existing folders load as SAE objects, `RELEASE:SAE_ID` stays a Hub reference.

    Hub references are passed to SAEBench as (release, SAE id) so that SAEBench loads them its own way; a
    checkpoint's `training_summary.json` (written by `sae-lens train`) supplies its L0 and FVE.
    """
    local = [Path(s).resolve() for s in specs if Path(s).is_dir()]
    names = iter(_sae_names(local))
    out = []
    for spec in specs:
        if Path(spec).is_dir():
            path = Path(spec).resolve()
            summary_path = path / SUMMARY_FILENAME
            summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
            try:
                check_sae_folder(path, "--sae")
            except ValueError as err:
                raise EvalError(str(err)) from None
            sae = SAE.load_from_disk(str(path), device=device)
            out.append(SAESpec(name=next(names), checkpoint=path, sae=sae, training_summary=summary))
        elif ":" in spec and not Path(spec.split(":", 1)[0]).exists():
            release, sae_id = spec.split(":", 1)
            out.append(SAESpec(name=f"{release}_{sae_id}".replace("/", "_"), release=release, sae_id=sae_id))
        elif Path(spec).exists():
            raise EvalError(f"--sae {spec}: is a file; expected an SAE folder (cfg.json, sae_weights.safetensors)")
        else:
            raise EvalError(f"--sae {spec}: no such folder; expected an SAE folder or an SAE-Lens RELEASE:SAE_ID")
    for spec_ in out:
        prepare_decoder(spec_)
    return out


def prepare_decoder(spec: SAESpec) -> None:
    """Give SAEBench unit-norm decoder rows, which its absorption, SCR and TPP metrics assume, and record what was
    done in `spec.decoder`.

    Rows already of unit norm pass. Otherwise the SAE's own `fold_W_dec_norm` (SAE-Lens') moves the norms into the
    encoder, as SAEBench does for its releases; an architecture that refuses (SAE-Lens' TopK) is folded anyway
    when every row has the same norm, since scaling every code alike changes no selection. An SAE that cannot be
    folded is evaluated as it is, with a loud warning that travels with its numbers. Release SAEs are folded by
    SAEBench's own loader.
    """
    from softsae_plugin.softsae import shared_row_norm

    if spec.sae is None:
        spec.decoder = "folded by SAEBench's loader (release)"
        return
    W_dec = spec.sae.W_dec
    norms = W_dec.detach().float().norm(dim=-1)
    if bool(torch.allclose(norms, torch.ones_like(norms), atol=UNIT_NORM_ATOL)):
        spec.decoder = UNIT_ROWS
        return
    shared = shared_row_norm(W_dec)
    found = f"rows of norm {shared:.4g}" if shared is not None else f"row norms {norms.min():.4g} to {norms.max():.4g}"
    try:
        spec.sae.fold_W_dec_norm()
    except NotImplementedError:
        if shared is None:
            spec.decoder = (
                f"WARNING: decoder {found}, which {spec.sae.cfg.architecture()} cannot fold: SAEBench's absorption, "
                "SCR and TPP are measured off-scale for this SAE"
            )
            print(f"sae-lens eval: {spec.name}: {spec.decoder}", file=sys.stderr)
            return
        SAE.fold_W_dec_norm(spec.sae)  # the base class's fold, which the architecture's override refuses
    spec.decoder = f"folded to unit-norm rows before SAEBench ({found})"


def _resolve_model(saes: Sequence[SAESpec], model: str | None) -> str:
    names = {s.name: s.sae.cfg.metadata.model_name for s in saes if s.sae is not None}
    if model is None:
        found = set(names.values())
        if len(found) != 1 or None in found:
            raise EvalError(f"pass --model: the checkpoints name the models {names}")
        return found.pop()
    wrong = {name: m for name, m in names.items() if m not in (None, model)}
    if wrong:
        raise EvalError(f"--model {model!r}, but these SAEs were trained on other models: {wrong}")
    return model


def _hook_layer(sae: SAE[Any]) -> int:
    match = re.fullmatch(r"blocks\.(\d+)\.hook_resid_post", str(sae.cfg.metadata.hook_name))
    if match is None:
        raise EvalError(
            f"absorption reads SAEBench's first-letter probe at blocks.L.hook_resid_post; this SAE reads "
            f"{sae.cfg.metadata.hook_name!r}"
        )
    return int(match.group(1))


def _seed(seed: int) -> None:
    # SAEBench's absorption eval does not seed its probe training; seeding here makes reruns repeatable.
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@contextmanager
def _working_directory(path: Path) -> Iterator[None]:
    previous = Path.cwd()
    path.mkdir(parents=True, exist_ok=True)
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(previous)


@contextmanager
def serve_model(eval_module: Any, model_name: str, models: dict[str, Any]) -> Iterator[None]:
    """While the block runs, `eval_module`'s `HookedTransformer.from_pretrained_no_processing(model_name, ...)`
    returns the model already built for it (`models`, keyed by dtype name; see `build_model`).

    Only the name `HookedTransformer` inside that one SAEBench module is replaced, by an object with just
    that loader: any other use of the name there fails loudly instead of silently using a stand-in.
    """

    def from_pretrained_no_processing(name: str, *args: Any, **kwargs: Any) -> Any:
        dtype = str(kwargs.get("dtype", torch.float32)).removeprefix("torch.")
        if name != model_name or dtype not in models:
            raise EvalError(f"SAEBench asked for {name} in {dtype}; built: {model_name} in {sorted(models)}")
        return models[dtype]

    stand_in = SimpleNamespace(from_pretrained_no_processing=from_pretrained_no_processing)
    with mock.patch.object(eval_module, "HookedTransformer", stand_in):
        yield


@contextmanager
def serve_datasets(datasets_dir: Path, served: dict[str, str]) -> Iterator[None]:
    """While the block runs, SAEBench's SCR/TPP `load_dataset(name)` loads `datasets_dir / name` from disk.

    The two SAEBench modules that call `load_dataset` for SCR and TPP get a loader that reads only local
    copies (a missing copy is an error naming the folder it expected, never a silent Hub download). The
    description stored with each copy is recorded in `served`, so the summary can say what was used.
    """
    import datasets
    import sae_bench.evals.scr_and_tpp.dataset_creation as scr_data
    import sae_bench.sae_bench_utils.dataset_utils as tpp_data

    def load_dataset(path: str, *args: Any, split: str | None = None, **kwargs: Any) -> Any:
        if args or kwargs:
            raise EvalError(f"a local copy of {path} cannot serve load_dataset arguments {args} {kwargs}")
        folder = datasets_dir / path
        if not folder.is_dir():
            raise EvalError(f"--datasets-dir has no copy of {path}: expected {folder} (datasets.save_to_disk)")
        data = datasets.load_from_disk(str(folder))
        first = data if isinstance(data, datasets.Dataset) else next(iter(data.values()))
        served[path] = first.info.description or LOCAL_DATASET_NOTE
        return data[split] if split is not None else data

    with (
        mock.patch.object(scr_data, "load_dataset", load_dataset),
        mock.patch.object(tpp_data, "load_dataset", load_dataset),
    ):
        yield


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
        _working_directory(workdir),
        mock.patch.multiple(
            absorption_main, run_k_sparse_probing_experiment=k_sparse, run_feature_absortion_experiment=absorption
        ),
    ):
        yield


def _absorption_skip_reason(workdir: Path, spec: SAESpec, config: Any) -> str:
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


def build_model(model_name: str, saes: Sequence[SAESpec], dtype: str, device: str, *, logits: bool = False) -> Any:
    """The model the evals get, built once for all of them (and before seeding, so that every eval starts from the
    same RNG state whichever evals run together).

    A local id (e.g. smollm2-135m-instruct-q4_1) is built offline, with only the blocks up to the deepest hook
    unless `logits` are needed (the core and saelens evals splice the SAE in and compare the model's losses). Any
    other name is loaded exactly as SAEBench loads it, with TransformerLens' `from_pretrained_no_processing`.
    """
    if not is_local_model(model_name):
        from transformer_lens import HookedTransformer

        return HookedTransformer.from_pretrained_no_processing(model_name, device=device, dtype=getattr(torch, dtype))
    hooks = [str(s.sae.cfg.metadata.hook_name) if s.sae is not None else "" for s in saes]
    layers = [int(m.group(1)) for hook in hooks if (m := re.match(r"blocks\.(\d+)\.", hook))]
    first_n_layers = max(layers) + 1 if len(layers) == len(saes) and not logits else None
    return load_local_model(model_name, first_n_layers=first_n_layers, device=device, dtype=getattr(torch, dtype))


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
    layers = [_hook_layer(spec.sae) for spec in saes if spec.sae is not None]
    if layers:
        model.run_with_cache = partial(type(model).run_with_cache, model, stop_at_layer=max(layers) + 1)
    try:
        yield
    finally:
        vars(model).pop("run_with_cache", None)


def train_absorption_probes(model: Any, saes: Sequence[SAESpec], config: Any, workdir: Path, device: str) -> None:
    """Train SAEBench's first-letter probe for each hook layer with SAEBench's own function, unless it is
    cached already, before its `run_eval` (which then loads it from the cache, as for every SAE after the first).

    Training it first keeps the probe's random draws out of the seeded `run_eval`, so an SAE's absorption
    result does not depend on whether the probe was already cached. Run it inside `absorption_vocabulary`.
    """
    from sae_bench.evals.absorption.common import load_or_train_probe

    layers = sorted({_hook_layer(spec.sae) for spec in saes if spec.sae is not None})
    _seed(config.random_seed)
    for layer in layers:
        load_or_train_probe(
            model,
            base_template=config.prompt_template,
            pos_idx=config.prompt_token_pos,
            layer=layer,
            probes_dir=absorption_results_dir(workdir) / "probes",
            device=device,
        )


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
                explain = partial(_absorption_skip_reason, workdir, config=config)
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
                _seed(config.random_seed)
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


@contextmanager
def serve_text(dataset: str) -> Iterator[None]:
    """While the block runs, SAE-Lens' activation store reads the local held-out text (softsae_plugin.text's held-out
    paragraphs) where it asks `load_dataset` for LOCAL_TEXT_ID; any other name goes to `datasets` as usual."""
    import sae_lens.training.activations_store as store_module

    load_dataset = store_module.load_dataset

    def load(path: str, *args: Any, **kwargs: Any) -> Any:
        return english_text(split="heldout") if path == LOCAL_TEXT_ID else load_dataset(path, *args, **kwargs)

    with mock.patch.object(store_module, "load_dataset", load):
        yield


def eval_configs(
    evals: Sequence[str], model_name: str, overrides: dict[str, dict[str, Any]], seed_offset: int = 0
) -> dict[str, Any]:
    """Each eval's config (SAEBench's, or this command's settings for core and saelens), keyed by eval type id,
    its random_seed moved on by `seed_offset`."""
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
            configs[eval_id] = _eval_config(cls, eval_name, overrides[eval_name], model_name=model_name,
                                            llm_dtype=llm_dtype, **text)  # fmt: skip
    for config in configs.values():
        config.random_seed += seed_offset
    return configs


def label_results(saes: Sequence[SAESpec], out: Path, labels: dict[str, list[str]]) -> None:
    """Add each eval's labels (`eval_labels`) and each SAE's decoder note to SAEBench's result JSON files."""
    for spec in saes:
        for eval_id, notes in labels.items():
            path = spec.result_path(out / eval_id)
            if path.exists():
                result = json.loads(path.read_text())
                result[NOTES_KEY] = [*notes, f"decoder: {spec.decoder}"]
                path.write_text(json.dumps(result, indent=2) + "\n")


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _mean_std(values: Sequence[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else None
    return mean, std


def summary_rows(
    saes: Sequence[SAESpec], evals: Sequence[str], runs: Sequence[Path], labels: dict[str, list[str]]
) -> list[dict[str, Any]]:
    """One row per SAE: its architecture, k, L0 and FVE (from training_summary.json) and each SAEBench metric's
    mean and standard deviation over the seeds' output folders `runs`, with the values, the labels and the
    decoder note."""
    wanted = {metric for name in evals for metric in EVAL_METRICS[name]}
    rows = []
    for spec in saes:
        results = [
            {
                eval_id: json.loads(path.read_text())
                for eval_id in EVAL_IDS
                if (path := spec.result_path(run / eval_id)).exists()
            }
            for run in runs
        ]
        sae_cfg = next(iter(results[0].values()))["sae_cfg_dict"] if results[0] else {}
        summary = spec.training_summary
        row: dict[str, Any] = {
            "SAE": spec.name,
            "architecture": summary.get("architecture") or sae_cfg.get("architecture"),
            "k": _number(summary.get("k", sae_cfg.get("k"))),
            "L0": _number(summary.get("mean_l0")),
            "FVE": _number(summary.get("fve")),
            "n_seeds": len(runs),
            "decoder": spec.decoder,
            "metrics": {},
        }
        for metric, (eval_id, category, name) in METRIC_SOURCES.items():
            if metric not in wanted:
                continue
            values = [_number(r[eval_id]["eval_result_metrics"][category][name]) for r in results if eval_id in r]
            mean, std = _mean_std([v for v in values if v is not None])
            row["metrics"][metric] = {
                "eval_type_id": eval_id,
                "mean": mean,
                "std": std,
                "values": values,
                "labels": labels[eval_id],
            }
        rows.append(row)
    return rows


def _format(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:g}" if value == int(value) else f"{value:.4f}"
    return str(value)


def _cell(metric: dict[str, Any] | None) -> str:
    if metric is None or metric["mean"] is None:
        return ""
    return _format(metric["mean"]) + (f" ± {metric['std']:.4f}" if metric["std"] is not None else "")


def _short_label(labels: Sequence[str]) -> str:
    return (
        " (pipeline check)"
        if any(label.startswith(PIPELINE_CHECK_LABEL) for label in labels)
        else (" (reduced settings)" if labels else "")
    )


def write_summary(
    rows: Sequence[dict[str, Any]],
    out: Path,
    *,
    model_name: str,
    saes: Sequence[SAESpec],
    served: dict[str, str],
    notes: Sequence[str] = (),
) -> tuple[Path, Path]:
    """Write `summary.csv` and `summary.md` (with the model, hooks, dataset provenance, the seeds, each metric's
    labels, each SAE's decoder note and any other `notes`); return both paths."""
    csv_path, md_path = out / "summary.csv", out / "summary.md"
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=TABLE_COLUMNS)
        writer.writeheader()
        for row in rows:
            metrics = row["metrics"]
            cells = {key: _format(row.get(key)) for key in TABLE_COLUMNS[:5]}
            for metric in METRIC_SOURCES:
                cells[metric] = _format(metrics[metric]["mean"]) if metric in metrics else ""
                cells[f"{metric}_std"] = _format(metrics[metric]["std"]) if metric in metrics else ""
            labels = sorted({label for m in metrics.values() for label in m["labels"]})
            cells.update(n_seeds=str(row["n_seeds"]), decoder=row["decoder"], labels="; ".join(labels))
            writer.writerow(cells)
    hooks = sorted({str(s.sae.cfg.metadata.hook_name) for s in saes if s.sae is not None})
    seeds = rows[0]["n_seeds"] if rows else 1
    lines = [
        f"# SAEBench results: {model_name}" + (f", {', '.join(hooks)}" if hooks else ""),
        "",
        "L0 and FVE come from each checkpoint's training_summary.json; every other column is an eval's own "
        "metric (SAEBench's; saelens_*: SAE-Lens' run_evals), from the JSON files beside this table"
        + (
            f": the mean ± standard deviation over {seeds} seeds, each SAE evaluated alone from each seed."
            if seeds > 1
            else ", each SAE evaluated alone from the same seed."
        ),
    ]
    lines += [f"\nSCR/TPP dataset {name}: {note}" for name, note in sorted(served.items())]
    metric_labels = {m: r["metrics"][m]["labels"] for r in rows for m in r["metrics"]}
    for metric, labels in sorted(metric_labels.items()):
        lines += [f"\n{metric}: {label}" for label in labels]
    lines += [f"\nDecoder of {row['SAE']}: {row['decoder']}" for row in rows if row["decoder"] != UNIT_ROWS]
    lines += [f"\n{note}" for note in notes]
    shown = [m for m in METRIC_SOURCES if m in metric_labels]
    header = [*TABLE_COLUMNS[:5], *(f"{m}{_short_label(metric_labels[m])}" for m in shown)]
    lines += ["", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [_format(row.get(key)) for key in TABLE_COLUMNS[:5]]
        cells += [_cell(row["metrics"].get(m)) for m in shown]
        warning = " (decoder not unit norm!)" if row["decoder"].startswith("WARNING") else ""
        lines.append("| " + " | ".join(cells).replace(row["SAE"], row["SAE"] + warning, 1) + " |")
    md_path.write_text("\n".join(lines) + "\n")
    return csv_path, md_path


def plot_metrics(rows: Sequence[dict[str, Any]], out: Path) -> list[Path]:
    """One PNG per metric against L0, a line per architecture with the seeds' standard deviation as error bars;
    rows without L0 or the metric are left out, and the title carries the metric's labels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for metric in METRIC_SOURCES:
        points = [r for r in rows if r["L0"] is not None and (r["metrics"].get(metric) or {}).get("mean") is not None]
        if not points:
            continue
        fig, ax = plt.subplots(figsize=(6, 4))
        for arch in sorted({str(r["architecture"]) for r in points}):
            mine = sorted((r for r in points if str(r["architecture"]) == arch), key=lambda r: r["L0"])
            ax.errorbar(
                [r["L0"] for r in mine],
                [r["metrics"][metric]["mean"] for r in mine],
                yerr=[r["metrics"][metric]["std"] or 0 for r in mine],
                marker="o",
                capsize=3,
                label=arch,
            )
        labels = points[0]["metrics"][metric]["labels"]
        ax.set_xlabel("L0 (mean active latents)")
        ax.set_ylabel(metric)
        seeds = points[0]["n_seeds"]
        ax.set_title(
            f"SAEBench {metric}"
            + (f", mean ± sd of {seeds} seeds" if seeds > 1 else "")
            + ("\n" + PIPELINE_CHECK_LABEL.upper() if _short_label(labels) == " (pipeline check)" else "")
            + ("\nreduced settings: see summary.md" if _short_label(labels) == " (reduced settings)" else ""),
            fontsize=9,
        )
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out / f"{metric}_vs_L0.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)
    return paths


def copy_to_checkpoints(
    saes: Sequence[SAESpec], rows: Sequence[dict[str, Any]], runs: Sequence[Path], model_name: str
) -> None:
    """Copy each checkpoint's SAEBench results (one folder per seed) and its summary row (means, spreads, labels,
    decoder note: what the model card shows) into `<checkpoint>/eval/`."""
    for spec, row in zip(saes, rows, strict=True):
        if spec.checkpoint is None:
            continue
        target = spec.checkpoint / "eval"
        shutil.rmtree(target, ignore_errors=True)
        for run in runs:
            for eval_id in EVAL_IDS:
                if (path := spec.result_path(run / eval_id)).exists():
                    (target / run.name).mkdir(parents=True, exist_ok=True)
                    shutil.copy2(path, target / run.name / f"{eval_id}_eval_results.json")
        (target / "summary.json").write_text(json.dumps({"model_name": model_name, **row}, indent=2) + "\n")


def main(argv: Sequence[str]) -> None:
    """Entry point of `sae-lens eval` (see `sae-lens eval --help`)."""
    args = _parser().parse_args(argv)
    try:
        if args.seeds < 1:
            raise EvalError(f"--seeds {args.seeds}: expected a positive number of seeds")
        evals = _parse_evals(args.evals)
        overrides = _override_sections(args)
        saes = load_saes(args.sae, args.device)
        model_name = _resolve_model(saes, args.model)
        out = args.out.resolve()
        out.mkdir(parents=True, exist_ok=True)
        configs = eval_configs(evals, model_name, overrides)
        logits = CORE_ID in configs or SAELENS_ID in configs
        models = {c.llm_dtype: build_model(model_name, saes, c.llm_dtype, args.device, logits=logits)
                  for c in configs.values()}  # fmt: skip
        runs = [out / f"seed-{offset}" for offset in range(args.seeds)]
        served: dict[str, str] = {}
        for offset, run in enumerate(runs):
            served = run_evals(
                saes,
                evals,
                model_name,
                run,
                device=args.device,
                overrides=overrides,
                models=models,
                seed_offset=offset,
                datasets_dir=args.datasets_dir.resolve() if args.datasets_dir else None,
                force_rerun=args.force_rerun,
                absorption_vocab_size=args.absorption_vocab_size,
            )
    except EvalError as err:
        print(f"sae-lens eval: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    labels = eval_labels(evals, served, args.absorption_vocab_size, overrides, configs)
    for run in runs:
        label_results(saes, run, labels)
    rows = summary_rows(saes, evals, runs, labels)
    _, md_path = write_summary(rows, out, model_name=model_name, saes=saes, served=served)
    plot_metrics(rows, out)
    if args.checkpoint_eval:
        copy_to_checkpoints(saes, rows, runs, model_name)
    print(md_path.read_text())
