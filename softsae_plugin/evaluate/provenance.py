"""What produced each result, recorded from the data it actually used, and the labels computed from that record.

`sae-lens eval` writes a provenance record into every result JSON it produces (PROVENANCE_KEY): the datasets read
(name, where from, fingerprint, and whether it is a pipeline-check stand-in, which the stand-ins say of
themselves), the first-letter probe's vocabulary, every setting that differs from SAEBench's published defaults,
the seed, the decoder note, SAEBench's version and this package's version and commit. A result SAEBench kept from
an earlier run (`--no-force-rerun`) keeps the record it was written with, and its labels are computed from that
record, never from the current command line.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import subprocess
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import softsae_plugin
from softsae_plugin.evaluate.evals import (
    ABSORPTION_ID,
    CORE_ID,
    DEFAULT_TEXT,
    PIPELINE_CHECK_LABEL,
    PIPELINE_CHECK_MARK,
    SAELENS_ID,
    SECTION_EVAL_IDS,
)

# The key `sae-lens eval` adds to SAEBench's result JSON for what produced it.
PROVENANCE_KEY = "sae_lens_eval_provenance"


# SAEBench's published core settings (its run-all scripts, custom_saes/run_all_evals_*.py), under the names its core
# result JSON stores them; SAE-Lens' own evals (saelens) are held to the same.
PUBLISHED_CORE = {
    "batch_size_prompts": 16,
    "n_eval_reconstruction_batches": 200,
    "n_eval_sparsity_variance_batches": 2000,
    "exclude_special_tokens_from_reconstruction": True,
    "context_size": 128,
}
PUBLISHED_SAELENS = {
    key: value for key, value in PUBLISHED_CORE.items() if key != "exclude_special_tokens_from_reconstruction"
}


# Config fields that are not settings of the measurement: the model, core's and saelens' text (labelled from the
# datasets record instead) and the seed (recorded on its own).
NOT_SETTINGS = ("model_name", "random_seed", "dataset")


# Written beside SAEBench's first-letter probe when `sae-lens eval` trains it: the vocabulary it was trained on.
PROBE_RECORD = "sae_lens_eval_probe.json"


def saebench_version() -> str:
    """The installed SAEBench: its git commit where pip recorded one (a VCS install), else `sae_bench==VERSION`.

    This replaces SAEBench's own `get_sae_bench_version`, which runs `git rev-parse HEAD` in the working
    directory and so records whatever repository the command happens to run in.
    """
    from importlib.metadata import distribution

    dist = distribution("sae_bench")
    direct = json.loads(dist.read_text("direct_url.json") or "{}")
    commit = (direct.get("vcs_info") or {}).get("commit_id")
    return f"sae_bench=={dist.version} ({commit})" if commit else f"sae_bench=={dist.version}"


@functools.cache
def package_provenance() -> dict[str, str]:
    """This package's version and, when it runs from a git checkout of itself, the commit (with `+dirty` when
    tracked files differ from it); `unknown` outside a checkout (an installed wheel records no commit)."""
    try:
        own_version = version("softsae-plugin")
    except PackageNotFoundError:
        own_version = "unknown"
    root = Path(softsae_plugin.__file__).resolve().parent.parent
    commit = "unknown"
    try:
        git = ["git", "-C", str(root)]
        top = subprocess.run([*git, "rev-parse", "--show-toplevel"], capture_output=True, text=True, check=True)
        # Only this package's own repository: a package installed inside another checkout must not take its HEAD.
        if Path(top.stdout.strip()).resolve() == root:
            head = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=True)
            dirty = subprocess.run([*git, "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                                   text=True, check=True).stdout.strip()  # fmt: skip
            commit = head.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        pass
    return {"softsae_plugin_version": own_version, "softsae_plugin_commit": commit}


def dataset_record(name: str, data: Any, source: str) -> dict[str, Any]:
    """What is known of one dataset read: its name, where from, a fingerprint of its contents, and whether it is a
    pipeline-check stand-in (the stand-ins carry PIPELINE_CHECK_MARK in their own description, wherever they are
    read from)."""
    import datasets

    splits = data.values() if isinstance(data, datasets.DatasetDict) else [data]
    description = next((s.info.description for s in splits if getattr(s, "info", None)), "") or ""
    return {
        "name": name,
        "source": source,
        "fingerprint": fingerprint(data),
        "stand_in": description.startswith(PIPELINE_CHECK_MARK),
        "description": description,
    }


def fingerprint(data: Any) -> str | None:
    """A fingerprint of a dataset's contents: the `datasets` library's own for data loaded from files (stable for
    the same files), a SHA-256 of the rows for data built in memory; None for a stream."""
    import datasets

    if isinstance(data, datasets.DatasetDict):
        parts = [f"{split}:{fingerprint(d)}" for split, d in sorted(data.items())]
        return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]
    if not isinstance(data, datasets.Dataset):
        return None
    if data.cache_files:
        return str(data._fingerprint)
    # An in-memory dataset's library fingerprint is random; its rows are not.
    digest = hashlib.sha256()
    for batch in data.iter(batch_size=1000):
        digest.update(json.dumps(batch, sort_keys=True, default=str).encode())
    return digest.hexdigest()[:16]


def published_defaults(eval_id: str, model_name: str) -> dict[str, Any]:
    """SAEBench's published default for each setting of an eval (its config class's defaults, with its per-model
    batch size and dtype; for core, its run-all scripts' settings)."""
    from softsae_plugin.evaluate.options import eval_configs

    if eval_id == CORE_ID:
        return dict(PUBLISHED_CORE)
    if eval_id == SAELENS_ID:
        return dict(PUBLISHED_SAELENS)
    no_overrides: dict[str, dict[str, Any]] = {name: {} for name in SECTION_EVAL_IDS}
    config = eval_configs([_EVAL_NAMES[eval_id]], model_name, no_overrides)[eval_id]
    # As a result JSON stores it (tuples become lists), so that equal settings compare equal.
    return json.loads(json.dumps(dataclasses.asdict(config), default=str))


# The `--evals` name that builds each SAEBench eval's config.
_EVAL_NAMES = {ABSORPTION_ID: "absorption", "scr": "scr", "tpp": "tpp", "sparse_probing": "sparse_probing"}


def settings_changed(eval_id: str, eval_config: dict[str, Any], model_name: str) -> dict[str, dict[str, Any]]:
    """Each setting of `eval_config` (as the result stores it) that differs from SAEBench's published default:
    `{field: {"used": value, "default": value}}`."""
    defaults = published_defaults(eval_id, model_name)
    return {
        key: {"used": eval_config.get(key), "default": default}
        for key, default in defaults.items()
        if key not in NOT_SETTINGS and key in eval_config and eval_config[key] != default
    }


def probe_record_path(probes_dir: Path, model_name: str, layer: int) -> Path:
    """Where the record of SAEBench's first-letter probe for `layer` lives: beside the probe itself."""
    return probes_dir / model_name / f"layer_{layer}" / PROBE_RECORD


def labels(result: dict[str, Any]) -> list[str]:
    """The labels a result carries, computed from its own provenance record and settings (so a result kept from an
    earlier run keeps its labels): pipeline-check stand-ins, local copies, another text than SAEBench's, a reduced
    probe vocabulary, settings changed from SAEBench's published defaults."""
    record = result.get(PROVENANCE_KEY)
    if not isinstance(record, dict):
        return ["provenance not recorded (a result written by SAEBench directly or by an earlier sae-lens eval)"]
    out = []
    datasets_read = record.get("datasets") or []
    stand_ins = sorted(d["name"] for d in datasets_read if d.get("stand_in"))
    if stand_ins:
        out.append(f"{PIPELINE_CHECK_LABEL}: stand-in datasets ({', '.join(stand_ins)})")
    local = sorted(
        d["name"] for d in datasets_read if d.get("source", "").startswith("local") and not d.get("stand_in")
    )
    if local and result.get("eval_type_id") not in (CORE_ID, SAELENS_ID):
        out.append(f"datasets from local copies (--datasets-dir): {', '.join(local)}")
    text = record.get("text")
    if text and text != DEFAULT_TEXT:
        out.append(f"measured on {text}, not SAEBench's {DEFAULT_TEXT}")
    probe = record.get("probe_vocabulary")
    if result.get("eval_type_id") == ABSORPTION_ID:
        if not probe:
            out.append("first-letter probe of unrecorded vocabulary (a cached probe without its record)")
        elif probe["probe_tokens"] < probe["alphabetic_tokens"]:
            out.append(
                f"reduced vocabulary: first-letter probe on {probe['probe_tokens']} of the model's "
                f"{probe['alphabetic_tokens']} alphabetic tokens, not comparable with full-vocabulary SAEBench numbers"
            )
    changed = record.get("settings_changed") or {}
    if changed:
        text_changed = ", ".join(f"{k}={v['used']!r} (default {v['default']!r})" for k, v in sorted(changed.items()))
        quick = "--quick: " if record.get("quick") else ""
        out.append(f"{quick}settings changed from SAEBench's published defaults: {text_changed}")
    return out
