"""Sweeps split by SAE across ranks: under torchrun, each rank trains its share of a sweep's SAEs on the global batch.

Data-parallel training (data_parallel.py) gives every SAE of a sweep its own DistributedDataParallel, and every step
all-reduces every SAE's gradients, one SAE after another (SAE-Lens steps them in turn, so the all-reduces never
overlap): for the paper's Gemma sweep, gigabytes per step. Split by SAE (`sweep_parallel: sae`, the default for a
sweep under torchrun), as EleutherAI's sparsify does (`distribute_modules`), each rank still computes the
activations of its own shard of the data, the ranks all-gather them into the global batch (the only exchange of a
step), and each SAE is trained by one rank, its owner (round-robin over the sorted names), on that global batch,
exactly as one process trains it: BatchTopK's batch-level selection, softsae's constraint on mean k_hat and its L0
calibration, the norm estimate, b_dec's initialisation and the dead-latent counters all see the global batch, with
no collective inside the step (`collectives.whole_batch_here`).

Every rank builds every SAE from the same seed, since SAE-Lens' loop drives them all, but only the owner steps one:
elsewhere its step only counts the samples, so it has no gradients and no Adam moments (Adam creates them at the
first step). The trade-off: each rank holds the weights of the whole sweep (plus gradients and two moments for its
own SAEs: on N ranks about (1 + 3/N) / 4 of the weights, gradients and moments of every SAE that data-parallel
training holds), in exchange for SAE-Lens' loop, checkpoints and resume unchanged. Ownership is by count, not cost:
a rank whose SAEs are SoftSAEs steps longer than one whose are TopK. Before rank 0 writes a checkpoint or the
outputs, each owner sends its SAEs' weights and trainer state to rank 0 (`gathered_on_main`), and the ranks share
which SAEs diverged (only an owner sees its SAE's loss); rank 0 then drops the optimizer state it received, which it
never steps.

With fewer SAEs than ranks a split would leave ranks idle, and combining both (each SAE data-parallel over its own
group of ranks) needs a process group and a DDP per SAE, whose ranks would exchange gradients again: such a sweep
runs data-parallel instead (`sweep_parallel: data`), with a logged reason, and asking for `sae` is refused. A single
SAE is always data-parallel.
"""

from __future__ import annotations

import io
import logging
import math
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any

import torch
import torch.distributed as dist
from sae_lens.saes.sae import TrainStepOutput

from softsae_plugin.collectives import is_main, rank, whole_batch_here, world_size

# The shared sweep option that chooses how a sweep uses the ranks of a torchrun launch.
SWEEP_PARALLEL_KEY = "sweep_parallel"
BY_SAE, BY_DATA = "sae", "data"
# SAE-Lens' per-SAE trainer counters that a checkpoint and the outputs read (besides the optimizer and schedulers).
TRAINER_COUNTERS = ("act_freq_scores", "n_forward_passes_since_fired", "n_frac_active_samples", "started_fine_tuning")

logger = logging.getLogger(__name__)


def check_mode(value: Any) -> str | None:
    """`sweep_parallel` as a sweep config gives it (None: chosen at launch by `choose_mode`); an error naming the
    value and the modes for anything else."""
    if value is not None and value not in (BY_SAE, BY_DATA):
        raise ValueError(f"{SWEEP_PARALLEL_KEY}={value!r} is not a mode; expected {BY_SAE!r} or {BY_DATA!r}")
    return value


def choose_mode(requested: str | None, n_saes: int) -> str:
    """How a sweep of `n_saes` SAEs uses this launch's ranks: `sae` (split by SAE) or `data` (data-parallel, and in
    one process, where the two are the same). Unset: `sae` when every rank gets an SAE, else `data` with a logged
    reason; `sae` with fewer SAEs than ranks is refused (see the module's docstring)."""
    size = world_size()
    if size == 1:
        return BY_DATA
    if n_saes < size:
        if requested == BY_SAE:
            raise ValueError(
                f"{SWEEP_PARALLEL_KEY}={BY_SAE!r} gives each rank at least one SAE, and this sweep has {n_saes} SAE(s) "
                f"for {size} ranks; expected {SWEEP_PARALLEL_KEY}: {BY_DATA}, or at most {n_saes} ranks"
            )
        if requested is None:
            logger.warning("sweep: %d SAE(s) for %d ranks; training them data-parallel (%s: %s)", n_saes, size,
                           SWEEP_PARALLEL_KEY, BY_DATA)  # fmt: skip
        return BY_DATA
    return requested or BY_SAE


def owner(name: str, names: Iterable[str]) -> int:
    """The rank that trains the SAE `name` of a sweep split by SAE: round-robin over the sorted names."""
    return sorted(names).index(name) % world_size()


def train_own_saes_only(trainer: Any) -> None:
    """Make each per-SAE step of the multi trainer `trainer` run on its owner only, on the whole batch it is given
    (`whole_batch_here`); on the other ranks the step only counts the batch's samples (SAE-Lens' loop reads them as
    the sweep's clock), and the SAE's firing statistics and step outputs, never computed there, are neither logged
    nor shown in the progress bar."""
    own = {name: per_sae for name, per_sae in trainer.trainers.items() if owner(name, trainer.trainers) == rank()}
    for name, per_sae in trainer.trainers.items():
        if name in own:
            per_sae.step = _on_the_whole_batch(per_sae.step)
        else:
            per_sae.step = partial(_count_only, per_sae)
            per_sae.maybe_reset_sparsity = per_sae.full_sparsity_window_log = dict
    trainer._log_train_step = partial(_own_outputs_only, trainer, trainer._log_train_step, own)
    update_pbar = trainer._update_pbar
    trainer._update_pbar = lambda outputs, *args: update_pbar({n: outputs[n] for n in own}, *args)


def _own_outputs_only(trainer: Any, log: Any, own: dict[str, Any], outputs: dict[str, TrainStepOutput]) -> None:
    # SAE-Lens' W&B step log reads every trainer's output: this rank's SAEs only (rank 0 alone logs to W&B).
    every, trainer.trainers = trainer.trainers, own
    try:
        log({name: outputs[name] for name in own})
    finally:
        trainer.trainers = every


def _on_the_whole_batch(step: Any) -> Any:
    def owned(batch: torch.Tensor) -> TrainStepOutput:
        with whole_batch_here():
            return step(batch)

    return owned


def _count_only(per_sae: Any, batch: torch.Tensor) -> TrainStepOutput:
    per_sae.n_training_samples += batch.shape[0]
    none = batch.new_empty(0)
    return TrainStepOutput(sae_in=batch, sae_out=batch, feature_acts=none, hidden_pre=none,
                           loss=batch.new_tensor(math.nan), losses={})  # fmt: skip


def collect_on_main(trainer: Any) -> None:
    """Bring to rank 0 the weights and trainer state of every SAE that another rank trains, from its owner, and
    give every rank the record of every SAE that diverged. Every rank calls it; a diverged SAE is not sent (it is
    neither checkpointed nor saved)."""
    records: list[Any] = [None] * world_size()
    dist.all_gather_object(records, trainer.diverged)
    for record in records:
        trainer.diverged.update(record)
    for name, per_sae in trainer.trainers.items():
        source = owner(name, trainer.trainers)
        if source == 0 or name in trainer.diverged:
            continue
        if rank() == source:
            dist.send_object_list([_packed_state(per_sae)], dst=0)
        elif is_main():
            received: list[Any] = [None]
            dist.recv_object_list(received, src=source)
            _load_state(per_sae, received[0])


def _packed_state(per_sae: Any) -> bytes:
    # torch.save's bytes, read back with map_location: tensors land on rank 0's device whatever the owner's GPU.
    state = {
        "sae": per_sae.sae.state_dict(),
        "metadata": per_sae.sae.cfg.metadata,
        "optimizer": per_sae.optimizer.state_dict(),
        "lr_scheduler": per_sae.lr_scheduler.state_dict(),
        "coefficient_schedulers": {name: s.state_dict() for name, s in per_sae.coefficient_schedulers.items()},
        **{key: getattr(per_sae, key) for key in TRAINER_COUNTERS},
    }
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def _load_state(per_sae: Any, packed: bytes) -> None:
    # The bytes come from another rank of this run (weights_only=False: the metadata is SAE-Lens' dataclass).
    state = torch.load(io.BytesIO(packed), map_location=per_sae.sae.device, weights_only=False)
    per_sae.sae.load_state_dict(state["sae"])
    per_sae.sae.cfg.metadata = state["metadata"]
    per_sae.optimizer.load_state_dict(state["optimizer"])
    per_sae.lr_scheduler.load_state_dict(state["lr_scheduler"])
    for name, scheduler_state in state["coefficient_schedulers"].items():
        per_sae.coefficient_schedulers[name].load_state_dict(scheduler_state)
    for key in TRAINER_COUNTERS:
        setattr(per_sae, key, state[key])


def forget_optimizers_not_owned(trainer: Any) -> None:
    """Drop the optimizer state of the SAEs this rank does not train (read from a checkpoint, or received for one):
    it is never stepped here, and it is twice the SAE's size."""
    for name, per_sae in trainer.trainers.items():
        if owner(name, trainer.trainers) != rank():
            per_sae.optimizer.state.clear()


@contextmanager
def gathered_on_main(trainer: Any) -> Iterator[None]:
    """Run the block (rank 0 writing a checkpoint or the outputs) with every SAE's state on rank 0
    (`collect_on_main`); afterwards rank 0 drops the optimizer state it received. A no-op unless `trainer` is a
    sweep split by SAE (its `by_sae`)."""
    if not getattr(trainer, "by_sae", False):
        yield
        return
    collect_on_main(trainer)
    try:
        yield
    finally:
        forget_optimizers_not_owned(trainer)
