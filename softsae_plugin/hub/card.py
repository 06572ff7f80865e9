"""The model card `sae-lens push` writes into a Hub repo: what SoftSAE is, how to load it, each SAE's numbers.

Every number comes from a file of the SAE's checkpoint folder: SAE-Lens' cfg.json and runner_cfg.json, the
training_summary.json that `sae-lens train` writes, and SAEBench's result files under eval/. The same
reader serves a local checkpoint and an SAE folder downloaded back from the repo, so one card lists every
SAE the repo holds.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import Any

from huggingface_hub import ModelCardData
from sae_lens.constants import RUNNER_CFG_FILENAME, SAE_CFG_FILENAME

from softsae_plugin.show.page import PAGE_FILENAME, SCREENSHOT_FILENAME
from softsae_plugin.training.summary import K_HAT_HISTOGRAM_FILENAME, SUMMARY_FILENAME

logger = logging.getLogger(__name__)

# `sae-lens eval` stores SAEBench's result files here, inside the checkpoint folder.
EVAL_DIRNAME = "eval"
# Lets a later push tell its own card (safe to rewrite) from a README.md somebody wrote by hand.
CARD_MARKER = "<!-- This card is written by `sae-lens push` (softsae-plugin) and rewritten on every push. -->"
# The library name SAE-Lens' own upload helper puts in the cards it writes.
LIBRARY_NAME = "saelens"
SOFTSAE_INTRO = (
    "**SoftSAE** is a sparse autoencoder that chooses how many features each input uses. Next to the usual "
    "encoder and decoder it has a small head that predicts k_hat, the number of active latents for this input "
    "(between 1 and k_max). During training a differentiable soft top-k (LapSum) keeps about k_hat of the "
    "ReLU codes and a budget holds the mean k_hat near the target k; at inference the SAE keeps exactly the "
    "round(k_hat) largest codes of each input. Simple inputs get few features and complex ones more, at the "
    'mean sparsity of a TopK SAE with the same k (paper: "SoftSAE: Dynamic Top-K Selection"). The '
    "architecture is a plugin for [SAE-Lens](https://github.com/decoderesearch/SAELens): install "
    "`softsae-plugin` and import it before loading."
)
BASELINE_INTRO = (
    "These sparse autoencoders were trained with `softsae-plugin` as baselines; their architectures are built "
    "into [SAE-Lens](https://github.com/decoderesearch/SAELens), so they load without the plugin."
)
SUMMARY_ROWS = (
    ("architecture", "architecture"),
    ("model", "model_name"),
    ("hook", "hook_name"),
    ("d_in", "d_in"),
    ("d_sae", "d_sae"),
    ("k", "k"),
    ("k_max", "k_max"),
    ("training tokens", "training_tokens"),
    ("FVE (fraction of variance explained)", "fve"),
    ("mean L0", "mean_l0"),
    ("dead latents", "dead_fraction"),
)


# The Hub ids of the models this package builds offline under a local name (the GGUF's source model).
LOCAL_BASE_MODELS = {"smollm2-135m-instruct-q4_1": "HuggingFaceTB/SmolLM2-135M-Instruct"}
# Written by `sae-lens eval` into a checkpoint's eval/ folder: the means over seeds, labels and decoder note.
EVAL_SUMMARY_FILENAME = "summary.json"


@dataclass(frozen=True)
class SAEResult:
    """SAEBench numbers for the card: an eval type, its headline values (as text) and the labels they carry."""

    eval_type_id: str
    headlines: tuple[tuple[str, str], ...]
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class SAEEntry:
    """What the card says about one SAE folder of the repo.

    `facts` holds cfg.json's shape and hook, overlaid with training_summary.json (FVE, L0, k_hat) when the
    checkpoint has one; `results` the SAEBench results found under eval/.
    """

    sae_id: str
    facts: dict[str, Any]
    results: tuple[SAEResult, ...] = ()
    has_histogram: bool = False
    has_page: bool = False
    has_screenshot: bool = False


def is_card_source(relative_path: str) -> bool:
    """Whether a file of an SAE folder (path relative to it, '/'-separated) feeds the model card.

    These are SAE-Lens' configs, the training summary and k_hat histogram, the `sae-lens show` page and its
    screenshot, and SAEBench's JSON results under eval/: the files a push downloads to describe SAEs that are
    already in the repo.
    """
    own = (SAE_CFG_FILENAME, RUNNER_CFG_FILENAME, SUMMARY_FILENAME, K_HAT_HISTOGRAM_FILENAME)
    if relative_path in (*own, PAGE_FILENAME, SCREENSHOT_FILENAME):
        return True
    return relative_path.startswith(f"{EVAL_DIRNAME}/") and relative_path.endswith(".json")


def read_entry(sae_id: str, folder: str | Path) -> SAEEntry:
    """Describe the SAE in `folder` (a checkpoint, or a folder downloaded from the repo) for the card.

    Shape, model and hook come from SAE-Lens' cfg.json and the token count from runner_cfg.json; the
    training summary, when present, adds FVE, mean L0, dead latents and the k_hat statistics. JSON files
    under eval/ without SAEBench's top-level keys (eval_type_id, eval_result_metrics) are passed over.
    """
    folder = Path(folder)
    cfg = json.loads((folder / SAE_CFG_FILENAME).read_text())
    metadata = cfg.get("metadata") or {}
    facts: dict[str, Any] = {
        "architecture": cfg.get("architecture"),
        "model_name": metadata.get("model_name"),
        "hook_name": metadata.get("hook_name"),
        "d_in": cfg.get("d_in"),
        "d_sae": cfg.get("d_sae"),
        "k": cfg.get("k"),
        "k_max": cfg.get("k_max"),
    }
    runner_cfg = folder / RUNNER_CFG_FILENAME
    if runner_cfg.exists():
        facts["training_tokens"] = json.loads(runner_cfg.read_text()).get("training_tokens")
    summary = folder / SUMMARY_FILENAME
    if summary.exists():
        facts.update(json.loads(summary.read_text()))
    eval_summary = folder / EVAL_DIRNAME / EVAL_SUMMARY_FILENAME
    summary_row = json.loads(eval_summary.read_text()) if eval_summary.exists() else {}
    if isinstance(summary_row, dict) and "metrics" in summary_row:
        results = _summary_results(summary_row)
    else:  # SAEBench's own result files (copied by hand, or by an older `sae-lens eval`)
        results = [r for path in sorted((folder / EVAL_DIRNAME).rglob("*.json")) if (r := _read_saebench_result(path))]
    return SAEEntry(
        sae_id,
        facts,
        tuple(results),
        (folder / K_HAT_HISTOGRAM_FILENAME).exists(),
        (folder / PAGE_FILENAME).exists(),
        (folder / SCREENSHOT_FILENAME).exists(),
    )


def _summary_results(summary: dict[str, Any]) -> list[SAEResult]:
    # One row per metric: mean and spread over the seeds, with its labels and, when it was not already unit norm,
    # what was done about the decoder.
    decoder = summary.get("decoder") or ""
    results = []
    for metric, values in (summary.get("metrics") or {}).items():
        if values.get("mean") is None:
            continue
        text = f"{values['mean']:.4g}"
        if values.get("std") is not None:
            text += f" ± {values['std']:.2g} ({len(values.get('values', []))} seeds)"
        notes = [
            *values.get("labels", []),
            *([f"decoder: {decoder}"] if decoder and decoder != "unit-norm rows" else []),
        ]
        results.append(SAEResult(values.get("eval_type_id", ""), ((metric, text),), tuple(notes)))
    return results


def _read_saebench_result(path: Path) -> SAEResult | None:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        logger.warning("%s is not JSON (%s); the model card leaves it out", path, err)
        return None
    # eval/ also holds files that are not SAEBench results (`sae-lens eval` writes its summary row there):
    # they are uploaded but have no headline numbers, so the card passes over them without a warning.
    if not (isinstance(data, dict) and "eval_type_id" in data and isinstance(data.get("eval_result_metrics"), dict)):
        return None
    headlines = tuple((title, f"{value:.4g}") for title, value in saebench_headlines(data))
    return SAEResult(data["eval_type_id"], headlines, tuple(data.get("sae_lens_eval_notes", ())))


def saebench_headlines(result: dict[str, Any]) -> list[tuple[str, float]]:
    """The headline numbers of one SAEBench result, as (metric title, value) pairs.

    The headlines are the metrics SAEBench's own output schema for this eval type marks for display by
    default (`ui_default_display`), titled as the schema titles them; when the installed SAEBench has no
    schema for the eval type, or it marks nothing, every number is shown under its category.metric name.
    """
    displayed = _displayed_metrics(result["eval_type_id"])
    rows = []
    for category, metrics in result["eval_result_metrics"].items():
        if not isinstance(metrics, dict):
            continue
        for name, value in metrics.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if not displayed:
                rows.append((f"{category}.{name}", float(value)))
            elif (category, name) in displayed:
                rows.append((displayed[(category, name)], float(value)))
    return rows


@functools.cache
def _displayed_metrics(eval_type_id: str) -> dict[tuple[str, str], str]:
    # SAEBench ships one JSON schema per eval type beside its code (evals/<eval>/eval_output_schema_<id>.json).
    schemas = sorted(Path(str(files("sae_bench"))).glob(f"evals/*/eval_output_schema_{eval_type_id}.json"))
    if not schemas:
        return {}
    schema = json.loads(schemas[0].read_text())
    definitions = schema.get("$defs", {})
    categories = _definition(schema["properties"]["eval_result_metrics"], definitions)
    displayed = {}
    for category, category_schema in (categories or {}).get("properties", {}).items():
        metrics = _definition(category_schema, definitions) or {}
        for name, metric in metrics.get("properties", {}).items():
            if metric.get("ui_default_display"):
                displayed[(category, name)] = metric.get("title", name)
    return displayed


def _definition(prop: dict[str, Any], definitions: dict[str, Any]) -> dict[str, Any] | None:
    # A pydantic schema names a nested class by "$ref", directly or inside anyOf/allOf when it is optional.
    for option in (prop, *prop.get("anyOf", ()), *prop.get("allOf", ())):
        if "$ref" in option:
            return definitions.get(option["$ref"].rsplit("/", 1)[-1])
    return None


def base_model(model_name: str) -> str | None:
    """The Hub id of the model an SAE reads, when it is known: a local model's source, or TransformerLens' id."""
    if model_name in LOCAL_BASE_MODELS:
        return LOCAL_BASE_MODELS[model_name]
    from transformer_lens.loading_from_pretrained import get_official_model_name

    try:
        return get_official_model_name(model_name)
    except ValueError:
        return None


def model_card(repo_id: str, entries: Sequence[SAEEntry], revision: str = "main", license: str | None = None) -> str:
    """The README.md of a Hub repo holding `entries`, one folder per SAE.

    Hub metadata first (library name, the license when given, the base models where known, tags for search:
    sparse-autoencoder, softsae when a SoftSAE is in the repo, sae-lens, and each model name), then what SoftSAE
    is, how to install and load the SAEs, and per SAE a table of its shape, hook, training tokens, FVE and mean L0,
    the k_hat statistics and histogram (SoftSAEs only), the `sae-lens show` screenshot linked to its page (when the
    checkpoint has them), and SAEBench's headline numbers, with their spread over
    seeds and their labels (a pipeline check, reduced settings, a decoder that was folded), when the checkpoint
    held results.
    """
    if not entries:
        raise ValueError("model_card: no SAEs to describe")
    has_softsae = any(entry.facts.get("architecture") == "softsae" for entry in entries)
    models = sorted({str(entry.facts["model_name"]) for entry in entries if entry.facts.get("model_name")})
    tags = ["sparse-autoencoder", *(["softsae"] if has_softsae else []), "sae-lens", *models]
    bases = sorted({b for model in models if (b := base_model(model))})
    metadata = ModelCardData(
        library_name=LIBRARY_NAME, tags=tags, license=license, base_model=(bases or None)
    ).to_yaml()
    example = next((e for e in entries if e.facts.get("architecture") == "softsae"), entries[0]).sae_id
    title = "SoftSAE sparse autoencoders" if has_softsae else "Sparse autoencoders"
    code = ["import softsae_plugin  # registers the softsae architecture with SAE-Lens"] if has_softsae else []
    code += [
        "from sae_lens import SAE",
        "",
        f"sae = SAE.from_pretrained({json.dumps(repo_id)}, {json.dumps(example)})",
        "codes = sae.encode(activations)  # (..., d_sae)",
    ]
    if has_softsae:
        code.append("k_hat = sae.predict_k(activations)  # the predicted number of active features per input")
    lines = [
        "---",
        metadata,
        "---",
        CARD_MARKER,
        "",
        f"# {title}{' for ' + ', '.join(models) if models else ''}",
        "",
        SOFTSAE_INTRO if has_softsae else BASELINE_INTRO,
        "",
        "## Load",
        "",
        "```bash",
        "pip install softsae-plugin",
        "```",
        "",
        "```python",
        *code,
        "```",
        "",
    ]
    if has_softsae:
        lines += [
            "Import `softsae_plugin` first: without it SAE-Lens does not know the `softsae` architecture and "
            "fails with `KeyError: 'softsae'`.",
            "",
        ]
    if revision != "main":
        lines += [
            f"These files are on the branch `{revision}`; `SAE.from_pretrained` reads `main` only, so download "
            "the folder and load it from disk:",
            "",
            "```python",
            "from huggingface_hub import snapshot_download",
            "",
            f"folder = snapshot_download({json.dumps(repo_id)}, revision={json.dumps(revision)}, "
            f'allow_patterns="{example}/*")',
            f'sae = SAE.load_from_disk(f"{{folder}}/{example}")',
            "```",
            "",
        ]
    lines += [f"## SAEs in this repository ({len(entries)})", ""]
    for entry in entries:
        lines += _entry_section(entry)
    return "\n".join(lines).rstrip() + "\n"


def _entry_section(entry: SAEEntry) -> list[str]:
    facts = entry.facts
    lines = [f"### `{entry.sae_id}`", "", "| | |", "|---|---|"]
    lines += [f"| {label} | {_format(key, facts.get(key))} |" for label, key in SUMMARY_ROWS]
    k_hat = facts.get("k_hat")
    if "n_eval_inputs" in facts:
        measured = "FVE, mean L0 and k_hat are" if isinstance(k_hat, dict) else "FVE and mean L0 are"
        lines += ["", f"{measured} measured on {facts['n_eval_inputs']:,} inputs after training."]
    if isinstance(k_hat, dict):
        lines += [
            "",
            f"**Predicted k_hat per input**: mean {k_hat['mean']:.2f} (std {k_hat['std']:.2f}), quartiles "
            f"{k_hat['q1']:.2f} / {k_hat['median']:.2f} / {k_hat['q3']:.2f} (IQR / k = {k_hat['iqr_over_k']:.2f}); "
            f"{100 * k_hat['share_near_k_max']:.1f}% of inputs within 1 of k_max, "
            f"{100 * k_hat['share_near_1']:.1f}% at k_hat <= 2.",
        ]
    if entry.has_histogram:
        lines += ["", f"![k_hat histogram of {entry.sae_id}]({entry.sae_id}/{K_HAT_HISTOGRAM_FILENAME})"]
    page = f"{entry.sae_id}/{PAGE_FILENAME}"
    if entry.has_screenshot:
        image = f"![features per token of {entry.sae_id}]({entry.sae_id}/{SCREENSHOT_FILENAME})"
        lines += ["", f"[{image}]({page})" if entry.has_page else image]
    if entry.has_page:
        lines += [
            "",
            f"**Features per token**: [{PAGE_FILENAME}]({page}) shows held-out text with each token shaded by the "
            "number of features it uses (`sae-lens show`); download it and open it in a browser, then hover or "
            "focus a token for its features and their top tokens.",
        ]
    if entry.results:
        lines += ["", "**SAEBench**", "", "| eval | metric | value | notes |", "|---|---|---|---|"]
        for result in entry.results:
            notes = "; ".join(result.notes).replace("|", "\\|")
            lines += [f"| {result.eval_type_id} | {title} | {value} | {notes} |" for title, value in result.headlines]
    return [*lines, ""]


def _format(key: str, value: Any) -> str:
    if value is None:
        return "n/a"
    if key == "hook_name":
        return f"`{value}`"
    if key == "fve":
        return f"{value:.4f}"
    if key == "mean_l0":
        return f"{value:.2f}"
    if key == "dead_fraction":
        return f"{100 * value:.2f}%"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value).replace("|", "\\|")
