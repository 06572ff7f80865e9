"""Guards around SAE-Lens' trainer: finite batches, finite saves, whole checkpoints and exact resumes.

SAE-Lens' `SAETrainer` is used unchanged: `guard_trainer` wraps the data provider it reads and the
`save_checkpoint` method it calls on itself, `check_checkpoint` validates a checkpoint before SAE-Lens'
own loading reads it, and `continue_from_checkpoint` corrects two counters after that loading.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from sae_lens.constants import (
    ACTIVATION_SCALER_CFG_FILENAME,
    ACTIVATIONS_STORE_STATE_FILENAME,
    RUNNER_CFG_FILENAME,
    SAE_CFG_FILENAME,
    SAE_WEIGHTS_FILENAME,
    TRAINER_STATE_FILENAME,
)
from sae_lens.saes.sae import TrainingSAEConfig
from sae_lens.training.sae_trainer import SAETrainer
from safetensors import SafetensorError
from safetensors.torch import load_file

from softsae_plugin.checks import check_finite
from softsae_plugin.collectives import barrier, is_main, world_size

GUARD_STATE_FILENAME = "softsae_guard_state.json"
# A batch of activations: one tensor, or (a sweep's) one tensor per hook, for the same tokens.
Batch = torch.Tensor | dict[str, torch.Tensor]

logger = logging.getLogger(__name__)


class FiniteBatches:
    """The data provider SAE-Lens' trainer reads, with every batch checked for NaN and inf before it is used.

    A batch holding non-finite values stops training with an error naming where (`where()`, e.g. the training
    step) and how many values were bad; with `skip_rows` the rows holding them are dropped instead (the batch
    shrinks; a batch with no good row is replaced by the next one) and counted in `rows_skipped`. A batch may be
    one tensor or, for a sweep, a mapping of hook names to tensors of the same tokens.
    `batches_drawn` counts the batches taken from `source`: the data position a resumed run skips to.
    """

    def __init__(
        self,
        source: Iterator[Batch],
        where: Callable[[], str],
        *,
        skip_rows: bool,
        batches_drawn: int = 0,
        rows_skipped: int = 0,
    ) -> None:
        self.source, self.where, self.skip_rows = source, where, skip_rows
        self.batches_drawn, self.rows_skipped = batches_drawn, rows_skipped

    def __iter__(self) -> FiniteBatches:
        return self

    def __next__(self) -> Batch:
        while True:
            batch = next(self.source)
            self.batches_drawn += 1
            # A sweep's batch maps each hook to its activations of the same tokens: a row is bad in every hook if
            # it is bad in one, so that the hooks stay aligned.
            tensors = list(batch.values()) if isinstance(batch, dict) else [batch]
            rows = [t.reshape(-1, t.shape[-1]) for t in tensors]
            finite = torch.stack([torch.isfinite(r).all(-1) for r in rows]).all(0)
            # One device sync per batch: the price of never letting a NaN reach the optimiser.
            if bool(finite.all()):
                return batch
            n_bad_rows, n_bad = int((~finite).sum()), sum(int((~torch.isfinite(t)).sum()) for t in tensors)
            if not self.skip_rows:
                raise ValueError(
                    f"non-finite activations at {self.where()}: {n_bad} of {sum(t.numel() for t in tensors)} values "
                    f"(in {n_bad_rows} of {finite.numel()} rows) are NaN or inf; expected finite values. Fix the "
                    "activation source, or drop such rows with --skip_nonfinite_rows (train_on_activations(..., "
                    "skip_nonfinite_rows=True))"
                )
            self.rows_skipped += n_bad_rows
            logger.warning(
                "skipped %d rows with NaN or inf activations at %s (%d so far)",
                n_bad_rows,
                self.where(),
                self.rows_skipped,
            )
            if n_bad_rows < finite.numel():
                if isinstance(batch, dict):
                    return {hook: r[finite] for hook, r in zip(batch, rows, strict=True)}
                return rows[0][finite]


def check_replaceable(path: str | Path) -> None:
    """Refuse an output folder that holds something other than an SAE, since `atomic_folder` replaces it whole.

    Called before a run starts as well, so that a wrong output_path costs no training time.
    """
    path = Path(path)
    # An SAE has cfg.json; a sweep's folder (one SAE per subfolder) has SAE-Lens' runner_cfg.json.
    ours = (path / SAE_CFG_FILENAME).is_file() or (path / RUNNER_CFG_FILENAME).is_file()
    if path.is_file() or (path.is_dir() and any(path.iterdir()) and not ours):
        raise FileExistsError(
            f"{path} exists and is not an SAE folder (it has no {SAE_CFG_FILENAME}); expected a new or empty folder, "
            "or an earlier SAE or sweep to replace: choose another output path"
        )


@contextmanager
def atomic_folder(path: str | Path) -> Iterator[Path]:
    """Yield a staging path beside `path` to build a folder in; when the block succeeds, rename it to `path`.

    A process killed at any moment leaves `path` either as it was or complete, never half-written: the
    folder is built in a hidden staging folder `.<name>.<random>.partial` on the same file system and
    renamed into place. An existing `path` must be empty or an SAE folder (see `check_replaceable`); it is
    moved into the staging folder first (for that instant the previous folder is whole there, not at
    `path`), and the staging folder is deleted afterwards or when the block fails: a kill can leave only it.
    """
    path = Path(path)
    check_replaceable(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent))
    staged = staging / path.name
    try:
        yield staged
        # Renaming is atomic against a kill; the fsyncs make it atomic against a power cut too.
        for file in staged.rglob("*"):
            if file.is_file():
                with open(file, "rb") as handle:
                    os.fsync(handle.fileno())
        if path.exists():
            os.replace(path, staging / f"{path.name}.previous")
        os.replace(staged, path)
        directory = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def guard_trainer(
    trainer: SAETrainer[Any, Any], *, skip_nonfinite_rows: bool, guard_state: Mapping[str, int] | None = None
) -> FiniteBatches:
    """Make `trainer` check every batch for NaN and inf, and write only whole checkpoints of finite weights.

    Wraps `trainer.data_provider` in a `FiniteBatches` (returned, for its counts) and `trainer.save_checkpoint`
    (which SAE-Lens calls for every checkpoint, including the runner's) in a version that refuses non-finite
    weights, builds the checkpoint with `atomic_folder`, and adds the guard's counts to it so that a resumed
    run knows its data position (and its number of data-parallel ranks). Under data-parallel training only rank 0
    writes. `guard_state` is what `check_checkpoint` read from the checkpoint resumed.
    """
    guard = guard_batches(trainer, skip_nonfinite_rows=skip_nonfinite_rows, guard_state=guard_state or {})
    save = trainer.save_checkpoint

    def save_whole_finite_checkpoint(
        checkpoint_name: str, base_path: Path | str | None = None, wandb_aliases: list[str] | None = None
    ) -> None:
        with rank_zero_writes():
            if is_main():
                write(checkpoint_name, base_path, wandb_aliases)

    def write(checkpoint_name: str, base_path: Path | str | None, wandb_aliases: list[str] | None) -> None:
        check_finite(
            trainer.sae.state_dict(),
            f"refusing to save checkpoint {checkpoint_name!r} at training step {trainer.n_training_steps}",
        )
        base = base_path if base_path is not None else trainer.cfg.checkpoint_path
        if base is None:  # nothing goes to disk: SAE-Lens only uploads to W&B, from a temporary folder
            save(checkpoint_name=checkpoint_name, base_path=base_path, wandb_aliases=wandb_aliases)
            return
        with atomic_folder(Path(base) / checkpoint_name) as staged:
            save(checkpoint_name=checkpoint_name, base_path=staged.parent, wandb_aliases=wandb_aliases)
            write_guard_state(staged, guard)

    trainer.save_checkpoint = save_whole_finite_checkpoint  # type: ignore[method-assign]
    return guard


def guard_batches(trainer: Any, *, skip_nonfinite_rows: bool, guard_state: Mapping[str, Any]) -> FiniteBatches:
    """Wrap a trainer's (or multi trainer's) data provider in a `FiniteBatches` that continues the counts of the
    checkpoint resumed (`guard_state`); returns it."""
    guard = FiniteBatches(
        trainer.data_provider,
        lambda: f"training step {trainer.n_training_steps}",
        skip_rows=skip_nonfinite_rows,
        batches_drawn=guard_state.get("batches_drawn", 0),
        rows_skipped=guard_state.get("nonfinite_rows_skipped", 0),
    )
    trainer.data_provider = guard
    return guard


def sample_share(guard_state: Mapping[str, Any]) -> int:
    """The number of ranks a checkpoint's trainers divided the global sample count among (`sample_share` where the
    writer recorded it, as a sweep split by SAE does: 1, each SAE trained on the global batch; else its world size)."""
    return int(guard_state.get("sample_share", guard_state.get("world_size", 1)))


def write_guard_state(folder: Path, guard: FiniteBatches, **extra: Any) -> None:
    """Write the guard's counts into a checkpoint folder (the data position a resume continues from, the rows
    skipped, the number of data-parallel ranks), with any `extra` entries."""
    counts = {
        "batches_drawn": guard.batches_drawn,
        "nonfinite_rows_skipped": guard.rows_skipped,
        "world_size": world_size(),
        **extra,
    }
    (folder / GUARD_STATE_FILENAME).write_text(json.dumps(counts) + "\n")


@contextmanager
def rank_zero_writes() -> Iterator[None]:
    """Around a checkpoint that rank 0 writes while every rank calls the save: the ranks wait for each other after
    it, so none runs ahead of a checkpoint still being written (and a rank 0 that fails while writing ends the
    others by the collective timeout at the latest). Not while an exception is being handled: SAE-Lens saves from
    its SIGTERM / Ctrl-C handler on each rank, which need not all be there."""
    yield
    if sys.exc_info()[1] is None:
        barrier()


def _read_safely(file: Path, action: str, remedy: str) -> Any:
    """Read one file of an SAE or checkpoint folder, or raise a ValueError naming it, the fault and `remedy`.

    safetensors files must load and hold only finite values; JSON must parse; a trainer state must load with
    `torch.load(weights_only=True)`, so that no pickled code from the file ever runs.
    """
    try:
        if file.name.endswith(".json"):
            return json.loads(file.read_text())
        if file.name.endswith(".safetensors"):
            tensors = load_file(file)
            check_finite(tensors, f"{action}: {file} is unusable")
            return tensors
        return torch.load(file, map_location="cpu", weights_only=True)
    except (SafetensorError, json.JSONDecodeError, pickle.UnpicklingError, RuntimeError, EOFError, OSError) as err:
        first_line = (str(err).strip() or "no data").splitlines()[0][:200]
        raise ValueError(
            f"{action}: {file} cannot be read safely ({type(err).__name__}: {first_line}); expected the whole "
            f"file SAE-Lens wrote: {remedy}"
        ) from None


def check_sae_folder(path: str | Path, action: str) -> dict[str, Any]:
    """Check that `path` holds an SAE that `SAE.load_from_disk` can load whole, before anything reads it.

    A missing, truncated or corrupted cfg.json or weights file, NaN or inf weights, or an architecture that
    SAE-Lens has not registered each raise a ValueError led by `action` (e.g. "sae-lens eval") that names the
    file and what was expected. Returns the parsed cfg.json.
    """
    from sae_lens.registry import SAE_CLASS_REGISTRY

    path = Path(path)
    missing = [name for name in (SAE_CFG_FILENAME, SAE_WEIGHTS_FILENAME) if not (path / name).is_file()]
    if missing:
        raise ValueError(f"{action}: {path} has no {' or '.join(missing)}; expected an SAE folder (SAE.save_model)")
    remedy = "save or download the SAE again"
    cfg = _read_safely(path / SAE_CFG_FILENAME, action, remedy)
    architecture = cfg.get("architecture", "standard") if isinstance(cfg, dict) else None
    try:
        SAE_CLASS_REGISTRY[architecture]  # a plugin's architecture registers itself on lookup (softsae_plugin_autoload)
    except (KeyError, TypeError):
        raise ValueError(
            f"{action}: {path / SAE_CFG_FILENAME} has architecture={architecture!r}, which SAE-Lens has not "
            f"registered; expected one of {sorted(SAE_CLASS_REGISTRY)} (a plugin's architecture is registered when "
            "its package is imported)"
        ) from None
    _read_safely(path / SAE_WEIGHTS_FILENAME, action, remedy)
    return cfg


def check_checkpoint(path: str | Path, sae_cfg: TrainingSAEConfig, *, has_activations_store: bool) -> dict[str, int]:
    """Check that `path` is a whole checkpoint of a run configured like `sae_cfg`, before SAE-Lens reads it.

    Every problem names the file and what was expected: a missing file, a weights or store file that
    safetensors cannot read (truncated, corrupted) or that holds NaN or inf, a JSON file that does not parse,
    a trainer state that `torch.load(weights_only=True)` refuses (so SAE-Lens' own `torch.load` of it never
    runs pickled code), or a cfg.json of another architecture, size or run length. Returns the guard's counts
    saved with the checkpoint (empty for a checkpoint written without `guard_trainer`). The number of ranks is checked
    where the data position depends on it (a language-model run's; a sweep's is checked by `check_sweep_checkpoint`).
    """
    path = Path(path)
    required = [SAE_CFG_FILENAME, SAE_WEIGHTS_FILENAME, TRAINER_STATE_FILENAME, ACTIVATION_SCALER_CFG_FILENAME]
    if has_activations_store:
        required.append(ACTIVATIONS_STORE_STATE_FILENAME)
    missing = [name for name in required if not (path / name).is_file()]
    if missing:
        inside = sorted(p.name for p in path.glob("[!.]*") if p.is_dir())
        hint = f"; it holds the checkpoints {inside}: resume from one of them" if inside else ""
        raise FileNotFoundError(
            f"resume: {path} is not a whole training checkpoint: it lacks {missing}; expected a folder written "
            f"by a checkpointing run (CHECKPOINT_PATH/<run id>/<n_training_samples>){hint}"
        )
    for name in (*required, GUARD_STATE_FILENAME):
        if (path / name).exists():
            _read_safely(path / name, "resume", "resume from an earlier checkpoint")
    saved = json.loads((path / SAE_CFG_FILENAME).read_text())
    expected = {
        "architecture": sae_cfg.architecture(),
        "d_in": sae_cfg.d_in,
        "d_sae": sae_cfg.d_sae,
        "total_training_steps": getattr(sae_cfg, "total_training_steps", None),
    }
    for name, value in expected.items():
        if value is not None and saved.get(name) != value:
            raise ValueError(
                f"resume: {path / SAE_CFG_FILENAME} has {name}={saved.get(name)!r}, but this run has {name}={value!r}; "
                "expected the configuration the checkpoint was trained with"
            )
    guard_file = path / GUARD_STATE_FILENAME
    guard_state = json.loads(guard_file.read_text()) if guard_file.exists() else {}
    if has_activations_store:
        # A language-model run's data position is per rank (each reads its own shard of the text); a run on a file
        # of activations counts global batches, which any number of ranks continues.
        check_world_size(guard_state, path)
    return guard_state


def check_world_size(guard_state: Mapping[str, int], path: str | Path) -> None:
    """Refuse to resume a language-model checkpoint written by another number of data-parallel ranks: each rank's
    text shard and data position depend on it."""
    saved = guard_state.get("world_size", 1)
    if saved != world_size():
        raise ValueError(
            f"resume: {path} was written by a run of {saved} data-parallel process(es), and this run has "
            f"{world_size()}; resume with the same number (torchrun --nproc_per_node, --nnodes)"
        )


def continue_from_checkpoint(
    trainer: SAETrainer[Any, Any], saved_share: int | None = None, share: int | None = None
) -> None:
    """Correct the counters that SAE-Lens' checkpoint loading (`load_trainer_state`) leaves behind.

    SAE-Lens saves a mid-run checkpoint before counting the step it has just taken, so `n_training_steps`
    comes back one short: every step-driven schedule (softsae's tau, target k and phase) would repeat a step
    and stay one behind. The LR scheduler steps exactly once per optimiser step, so its count is right. The
    sample count is a share of the global one: given `saved_share`, the number of ranks it was divided among in the
    run that wrote the checkpoint (see `sample_share`; a run on a file of activations, whose position is in global
    batches, may resume on another number of ranks), it is rescaled to this run's `share` (default: the world
    size). And the checkpoint thresholds are rebuilt from zero, so each one already passed would fire again.
    """
    trainer.n_training_steps = trainer.lr_scheduler.last_epoch
    if saved_share is not None:
        trainer.n_training_samples = trainer.n_training_samples * saved_share // (share or world_size())
    trainer.checkpoint_thresholds = [t for t in trainer.checkpoint_thresholds if t >= trainer.n_training_samples]
