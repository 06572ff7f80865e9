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

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


def world_size() -> int:
    """The number of data-parallel processes (1 without torchrun)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    """This process's rank (0 without torchrun)."""
    return dist.get_rank() if world_size() > 1 else 0


def is_main() -> bool:
    """Whether this process writes files and prints summaries (rank 0)."""
    return rank() == 0


def init_from_environment(device: str) -> int:
    """Join the process group torchrun describes in the environment (WORLD_SIZE > 1): gloo on CPU, nccl on CUDA,
    each CUDA rank on its own GPU (LOCAL_RANK). Returns the world size."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size > 1 and not dist.is_initialized():
        cuda = torch.device(device).type == "cuda"
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if cuda else "gloo")
    return world_size()


def local_device(device: str) -> str:
    """The device this rank computes on: its own GPU (LOCAL_RANK) for a CUDA run, the given device otherwise."""
    if world_size() > 1 and torch.device(device).type == "cuda":
        return f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
    return device


def gather_rows(tensor: torch.Tensor) -> torch.Tensor:
    """The rows of every rank's `tensor`, concatenated in rank order (the tensor itself in one process).

    Each rank's slice of the result is its own tensor, so gradients flow back to it (all_gather's autograd form).
    """
    if world_size() == 1:
        return tensor
    return _GatherRows.apply(tensor) if tensor.requires_grad else _gather(tensor)


def _gather(tensor: torch.Tensor) -> torch.Tensor:
    parts = [torch.empty_like(tensor) for _ in range(world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


class _GatherRows(torch.autograd.Function):
    # Every rank computes the same function of the gathered rows, so a rank's rows receive the gradient that every
    # rank sends back for them: the sum over ranks of the gradient's slice for this rank.
    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor) -> torch.Tensor:
        ctx.rows = tensor.shape[0]
        return _gather(tensor)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        total = grad.contiguous().clone()
        dist.all_reduce(total)
        return total[rank() * ctx.rows : (rank() + 1) * ctx.rows]


def sum_over_ranks(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` summed over every rank (itself in one process); not differentiated through."""
    if world_size() == 1:
        return tensor
    total = tensor.detach().clone()
    dist.all_reduce(total)
    return total


def per_rank(trainer_cfg: Any, skip_nonfinite_rows: bool = False) -> Any:
    """SAE-Lens' trainer config for one rank: its share of the global batch and of the training samples, so that
    every rank takes the same number of steps (the config itself in one process)."""
    import dataclasses

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


def load_shard(path: str, *, streaming: bool, trust_remote_code: bool) -> Any:
    """This rank's shard of the Hub dataset `path`'s train split (what SAE-Lens' store would load, then sharded)."""
    from datasets import load_dataset

    return shard_dataset(load_dataset(path, split="train", streaming=streaming, trust_remote_code=trust_remote_code))


class GlobalBatches:
    """While `active`, the batches drawn from `source` come back as the global batch (every rank's rows)."""

    def __init__(self, source: Iterator[Any]) -> None:
        self.source, self.active = source, False

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
