"""Data-parallel training on PyTorch's own stack: `sae-lens train` launched under torchrun.

    torchrun --nproc_per_node N $(which sae-lens) train --config ...            # one machine
    torchrun --nnodes M --nproc_per_node N --rdzv_endpoint HOST:PORT ... train ...   # several

Each rank runs its own model on its own shard of the data and SAE-Lens' own trainer; the SAE is wrapped in
DistributedDataParallel, which averages the gradients. What spans the batch is taken over the global batch:
softsae's constraint on mean k_hat and its hard-phase L0 calibration (sparsity_control.py), the dead-latent
counters and firing rates (`synchronise_counters`), the norm-scaling estimate (`global_batches`) and b_dec's
geometric-median initialisation. Rank 0 alone writes checkpoints, the output folder and the summary. gloo on CPU,
nccl on CUDA. Without torchrun (or with one process) every function here is the identity.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from sae_lens.constants import RUNNER_CFG_FILENAME
from torch import nn

from softsae_plugin.collectives import barrier, gather_rows, is_main, rank, sum_over_ranks, world_size

# How long a collective waits for the other ranks before it fails (PyTorch's defaults: 10 min for NCCL, 30 for gloo):
# a rank lost without closing its connections (a machine gone, a hung process) ends the others within this time.
# The longest wait in a healthy run is rank 0 writing a checkpoint while the others stand at the barrier after it.
COLLECTIVE_TIMEOUT_ENV = "SOFTSAE_COLLECTIVE_TIMEOUT_S"
DEFAULT_COLLECTIVE_TIMEOUT_S = 300.0
# The key in the process group's store (PyTorch's rendezvous store) under which the first rank that fails says why.
FIRST_FAILURE_KEY = "softsae/first_failure"


def collective_timeout() -> timedelta:
    """The collectives' timeout: SOFTSAE_COLLECTIVE_TIMEOUT_S seconds if set, else 5 minutes."""
    value = os.environ.get(COLLECTIVE_TIMEOUT_ENV, str(DEFAULT_COLLECTIVE_TIMEOUT_S))
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if not seconds > 0 or math.isinf(seconds):
        raise ValueError(f"{COLLECTIVE_TIMEOUT_ENV}={value!r} is invalid; expected a positive number of seconds")
    return timedelta(seconds=seconds)


def init_from_environment(device: str) -> int:
    """Join the process group torchrun describes in the environment (WORLD_SIZE > 1): gloo on CPU, nccl on CUDA,
    each CUDA rank on its own GPU (LOCAL_RANK), with an explicit collective timeout (`collective_timeout`). Returns
    the world size."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size > 1 and not dist.is_initialized():
        cuda = torch.device(device).type == "cuda"
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if cuda else "gloo", timeout=collective_timeout())
    return world_size()


@contextmanager
def failures_named_on_every_rank() -> Iterator[None]:
    """Run the block so that a failure on one data-parallel rank is named on every rank: the first rank to fail
    records its rank and error in the process group's store; a rank that fails after it (its collectives broken by
    the lost peer, or timed out) raises an error that names that rank and its error, chained to its own. One
    process, or before the process group exists: the block runs as is."""
    try:
        yield
    except Exception as error:
        if world_size() == 1:
            raise
        store = dist.distributed_c10d._get_default_store()
        mine = f"rank {rank()} failed with {type(error).__name__}: {_first_line(error)}"
        # compare_set writes only where the key is absent (expected ""), and returns the value the key now holds.
        first = store.compare_set(FIRST_FAILURE_KEY, "", mine).decode()
        if first == mine:
            raise
        raise RuntimeError(f"data-parallel training stopped because {first}; rank {rank()} then failed too") from error


def _first_line(error: BaseException) -> str:
    return (str(error).strip() or "no message").splitlines()[0][:300]


@contextmanager
def main_rank_first() -> Iterator[None]:
    """Run the block on rank 0 first and on the other ranks once it is done (a barrier between): a model or dataset
    it downloads, or a cache it builds, is then read by the others instead of fetched by every rank at once."""
    if not is_main():
        barrier()
    yield
    if is_main():
        barrier()


def local_device(device: str) -> str:
    """The device this rank computes on: its own GPU (LOCAL_RANK) for a CUDA run, the given device otherwise."""
    if world_size() > 1 and torch.device(device).type == "cuda":
        return f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
    return device


def per_rank(trainer_cfg: Any, skip_nonfinite_rows: bool = False) -> Any:
    """SAE-Lens' trainer config for one rank: its share of the global batch and of the training samples, so that
    every rank takes the same number of steps (the config itself in one process)."""
    size = world_size()
    if size == 1:
        return trainer_cfg
    if skip_nonfinite_rows:
        raise ValueError("skip_nonfinite_rows cannot be used with data-parallel training (ranks' batches must match)")
    if trainer_cfg.train_batch_size_samples % size:
        raise ValueError(
            f"train_batch_size_tokens={trainer_cfg.train_batch_size_samples} cannot be split evenly over {size} "
            "data-parallel ranks; expected a multiple of the number of processes"
        )
    return dataclasses.replace(
        trainer_cfg,
        train_batch_size_samples=trainer_cfg.train_batch_size_samples // size,
        total_training_samples=trainer_cfg.total_training_samples // size,
    )


def whole_batch(trainer_cfg: Any) -> Any:
    """SAE-Lens' trainer config for the global batch from one rank's (`per_rank`'s inverse, counted as `global_scale`
    counts): a sweep split by SAE (by_sae.py) trains each SAE on the batch gathered from every rank."""
    size = world_size()
    return dataclasses.replace(
        trainer_cfg,
        train_batch_size_samples=trainer_cfg.train_batch_size_samples * size,
        total_training_samples=trainer_cfg.total_training_samples * size,
    )


def split_over_ranks(cfg: Any, skip_nonfinite_rows: bool = False) -> bool:
    """Set a runner config (SAE-Lens' `LanguageModelSAERunnerConfig`, or `MultiSAETrainingRunnerConfig` for a sweep)
    up for this rank after joining the process group: its own device, its share of the batch and of the tokens (the
    configured ones are global), W&B on rank 0 only. Returns whether the run is data-parallel (a no-op otherwise)."""
    if init_from_environment(cfg.device) == 1:
        return False
    cfg.device = local_device(cfg.device)
    cfg.llm_device = local_device(cfg.llm_device or cfg.device)
    cfg.act_store_device = local_device(cfg.act_store_device or cfg.device)
    trainer_cfg = per_rank(cfg.to_sae_trainer_config(), skip_nonfinite_rows)
    cfg.train_batch_size_tokens = trainer_cfg.train_batch_size_samples
    cfg.training_tokens = trainer_cfg.total_training_samples
    if hasattr(cfg, "saes"):  # a sweep: every SAE on this rank's device
        cfg.saes = {name: dataclasses.replace(sae_cfg, device=cfg.device) for name, sae_cfg in cfg.saes.items()}
    if not is_main():
        cfg.logger.log_to_wandb = False
    return True


def global_scale(per_rank_batch: int, per_rank_samples: int) -> dict[str, int]:
    """The run's scale as summaries and saved configs record it: the world size, and the global batch size and number
    of training samples (tokens, or vectors on the embedding path): each rank's share times the world size."""
    size = world_size()
    return {
        "world_size": size,
        "train_batch_size_tokens": per_rank_batch * size,
        "training_tokens": per_rank_samples * size,
    }


def write_runner_config(cfg: Any, folder: Path) -> None:
    """Write SAE-Lens' runner config file into `folder` as the run's, not this rank's: the global batch size and
    token count (under torchrun the config holds this rank's share) and the world size."""
    data = {**cfg.to_dict(), **global_scale(cfg.train_batch_size_tokens, cfg.training_tokens)}
    (folder / RUNNER_CFG_FILENAME).write_text(json.dumps(data))


def shard(batch: torch.Tensor) -> torch.Tensor:
    """This rank's contiguous slice of a global batch's rows (batches are split evenly)."""
    size = world_size()
    if size == 1:
        return batch
    if batch.shape[0] % size:
        raise ValueError(f"a batch of {batch.shape[0]} rows cannot be split evenly over {size} data-parallel ranks")
    part = batch.shape[0] // size
    return batch[rank() * part : (rank() + 1) * part]


def shard_dataset(dataset: Any) -> Any:
    """This rank's share of a Hugging Face dataset (map-style or streaming), with datasets' own
    `split_dataset_by_node` (the dataset itself in one process)."""
    if world_size() == 1:
        return dataset
    from datasets.distributed import split_dataset_by_node

    return split_dataset_by_node(dataset, rank=rank(), world_size=world_size())


def shard_cached_activations(store: Any) -> None:
    """Give this rank its own contiguous share of the rows of an activation store's cache (`use_cached_activations`):
    SAE-Lens' store reads a cache from its first row on every rank, with the same shuffle, so N ranks would train on
    the same batches. A no-op in one process or for a store without a cache."""
    if world_size() > 1 and getattr(store, "cached_activation_dataset", None) is not None:
        store.cached_activation_dataset = shard_dataset(store.cached_activation_dataset)


def load_shard(path: str, *, streaming: bool, trust_remote_code: bool) -> Any:
    """This rank's shard of the Hub dataset `path`'s train split (what SAE-Lens' store would load, then sharded)."""
    from datasets import load_dataset

    return shard_dataset(load_dataset(path, split="train", streaming=streaming, trust_remote_code=trust_remote_code))


class GlobalBatches:
    """While `active`, the batches drawn from `source` come back as the global batch (every rank's rows)."""

    def __init__(self, source: Iterator[Any], *, active: bool = False) -> None:
        self.source, self.active = source, active

    def __iter__(self) -> GlobalBatches:
        return self

    def __next__(self) -> Any:
        batch = next(self.source)
        if not self.active:
            return batch
        if isinstance(batch, dict):
            return {hook: gather_rows(t) for hook, t in batch.items()}
        return gather_rows(batch)


@contextmanager
def global_batches(trainer: Any) -> Iterator[None]:
    """While the block runs, `trainer.data_provider` yields global batches: SAE-Lens' norm-scaling estimate, drawn
    inside it, then sees the same rows as one process with the global batch would."""
    if world_size() == 1:
        yield
        return
    provider = GlobalBatches(trainer.data_provider)
    trainer.data_provider, provider.active = provider, True
    try:
        yield
    finally:
        trainer.data_provider = provider.source


class _TrainingStep(nn.Module):
    # DistributedDataParallel hooks the backward of what its forward returns: SAE-Lens' trainer calls the SAE's
    # training_forward_pass, so that is what the wrapped module's forward runs: the one the SAE had when wrapped, which
    # is SAE-Lens' torch.compile'd version under compile_sae.
    def __init__(self, sae: nn.Module) -> None:
        super().__init__()
        self.sae = sae
        self.step = sae.training_forward_pass

    def forward(self, step_input: Any) -> Any:
        return self.step(step_input)


def data_parallel(trainer: Any) -> None:
    """Make SAE-Lens' `trainer` train its SAE data-parallel: the SAE's training forward pass runs through
    DistributedDataParallel (gradient averaging; buffers broadcast from rank 0), and after every step the
    dead-latent counters and firing rates are combined over ranks. A no-op in one process."""
    if world_size() == 1:
        return
    sae = trainer.sae
    device_ids = [sae.W_enc.device.index] if sae.W_enc.device.type == "cuda" else None
    # Unused parameters: the k head's output bias under the constraint, the frozen k head in the hard phase.
    ddp = nn.parallel.DistributedDataParallel(_TrainingStep(sae), device_ids=device_ids, find_unused_parameters=True)
    sae.training_forward_pass = lambda step_input: ddp(step_input)
    step = trainer.step

    def step_and_synchronise(batch: torch.Tensor) -> Any:
        before = (trainer.act_freq_scores.clone(), trainer.n_frac_active_samples)
        output = step(batch)
        synchronise_counters(trainer, before)
        return output

    trainer.step = step_and_synchronise


def synchronise_counters(trainer: Any, before: tuple[torch.Tensor, int]) -> None:
    """Combine what one step added to SAE-Lens' firing counters on every rank: a latent fired if it fired on any
    rank, and the firing counts and the number of inputs they cover are summed."""
    torch.distributed.all_reduce(trainer.n_forward_passes_since_fired, op=dist.ReduceOp.MIN)
    fired = trainer.act_freq_scores - before[0]
    trainer.act_freq_scores = before[0] + sum_over_ranks(fired)
    trainer.n_frac_active_samples = before[1] + (trainer.n_frac_active_samples - before[1]) * world_size()
