"""Resumable stages: each returns JSON-able results, saved to work/<name>.json with its inputs and read back instead
of rerun; a training stage cut short resumes from its last checkpoint."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

# SAE-Lens files checkpoints under checkpoint_path/<wandb_id>: a fixed id lets a run cut short resume from them.
CHECKPOINT_RUN = "run"


def stage(work: Path, name: str, bar: tqdm, compute: Callable[[], Any], inputs: dict[str, Any] | None = None) -> Any:
    """Run `compute` unless work/<name>.json holds its result for the same `inputs` (saved beside the result, so a
    changed learning-rate grid or pick reruns the stages it feeds); save the result atomically when it finishes.
    Either way it returns the result as JSON reads it back (tuples as lists, arrays as lists, keys as strings)."""
    path = work / f"{name}.json"
    inputs = json.loads(json.dumps(inputs or {}))  # compared as JSON reads them back (tuples as lists)
    if path.exists():
        saved = json.loads(path.read_text())
        if all(saved.get(key) == value for key, value in inputs.items()):
            bar.update()
            return saved
        tqdm.write(f"{name}: its inputs changed since it was saved; running it again")
    bar.set_postfix_str(name)
    start = time.perf_counter()
    result = {"seconds": None, **inputs, **compute()}
    result["seconds"] = time.perf_counter() - start
    text = json.dumps(result, indent=1, default=_plain) + "\n"
    staged = path.with_suffix(".tmp")
    staged.write_text(text)
    staged.replace(path)
    bar.update()
    return json.loads(text)  # as a later run reads it back, so a fresh run and a resumed one hand on the same values


def _plain(value: Any) -> Any:
    """What JSON cannot write as it is: numpy arrays (per-input k_hat) as lists, other numbers (numpy's) as floats."""
    return value.tolist() if isinstance(value, np.ndarray) else float(value)


def numbered_checkpoints(path: Path) -> list[Path]:
    """The checkpoint folders SAE-Lens saved under `path` for a run of id `CHECKPOINT_RUN`, in training order."""
    folder = path / CHECKPOINT_RUN
    found = [p for p in folder.glob("*") if p.is_dir() and p.name.isdigit()] if folder.exists() else []
    return sorted(found, key=lambda p: int(p.name))


def resume_point(path: Path, inputs: dict[str, Any]) -> Path | None:
    """The last checkpoint under `path` of a run with the same `inputs` (recorded in path/inputs.json), where that
    run resumes; None where there is none. Checkpoints of other inputs are deleted: they belong to another run."""
    plan = path / "inputs.json"
    recorded = json.dumps(inputs, sort_keys=True)
    if not plan.exists() or plan.read_text() != recorded:
        shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True, exist_ok=True)
    plan.write_text(recorded)
    numbered = numbered_checkpoints(path)
    return numbered[-1] if numbered else None


def stage_seconds(work: Path) -> dict[str, Any]:
    """Each finished stage's wall time, and the stages that resumed from a checkpoint: their time counts only the
    last call, so it is scaled to the whole run by the share of its tokens that call trained (an estimate)."""
    seconds, resumed = {}, []
    for path in sorted(work.glob("*.json")):
        result = json.loads(path.read_text())
        if path.stem == "scale" or not result.get("seconds"):
            continue
        seconds[path.stem] = result["seconds"]
        if result.get("resumed_from"):
            seconds[path.stem] *= result["tokens"] / (result["tokens"] - int(result["resumed_from"]))
            resumed.append(path.stem)
    return {"stage_seconds": seconds, "stages_resumed": resumed}
