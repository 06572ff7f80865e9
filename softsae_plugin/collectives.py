"""What the SAE's arithmetic needs from torch.distributed: the rank, the world size, and the global batch.

Under data-parallel training (training/data_parallel.py) a quantity that spans the batch (softsae's constraint on
mean k_hat, its hard-phase calibration, b_dec's initialisation, the AuxK residual's variance) is taken over every
rank's rows. Without torchrun (or with one process) every function here is the identity. In a sweep split by SAE
(training/by_sae.py) the rank that trains an SAE holds the whole global batch: inside `whole_batch_here` the
batch-spanning functions are the identity too, and the SAE's arithmetic never waits for the other ranks.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist


def world_size() -> int:
    """The number of data-parallel processes (1 without torchrun)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    """This process's rank (0 without torchrun)."""
    return dist.get_rank() if world_size() > 1 else 0


def is_main() -> bool:
    """Whether this process writes files and prints summaries (rank 0)."""
    return rank() == 0


_whole_batch_here = False


@contextmanager
def whole_batch_here() -> Iterator[None]:
    """While the block runs, this rank holds the whole global batch (it trains an SAE of a sweep split by SAE on the
    gathered batch, alone): `gather_rows` and `sum_over_ranks` are then the identity, as in one process."""
    global _whole_batch_here
    before, _whole_batch_here = _whole_batch_here, True
    try:
        yield
    finally:
        _whole_batch_here = before


def batch_ranks() -> int:
    """The number of ranks whose rows make up the global batch the SAE's arithmetic sees: the world size under
    data-parallel training, 1 in one process and inside `whole_batch_here`."""
    return 1 if _whole_batch_here else world_size()


def gather_rows(tensor: torch.Tensor) -> torch.Tensor:
    """The rows of every rank's `tensor`, concatenated in rank order (the tensor itself in one process, and inside
    `whole_batch_here`).

    Each rank's slice of the result is its own tensor, so gradients flow back to it (all_gather's autograd form).
    """
    if batch_ranks() == 1:
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
    """`tensor` summed over every rank (itself in one process, and inside `whole_batch_here`); not differentiated
    through."""
    if batch_ranks() == 1:
        return tensor
    total = tensor.detach().clone()
    dist.all_reduce(total)
    return total


def barrier() -> None:
    """Wait for every rank (a no-op in one process); it fails after the collective timeout if one never arrives."""
    if world_size() > 1:
        dist.barrier()
