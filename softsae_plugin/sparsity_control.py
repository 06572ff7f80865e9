"""Sparsity control for SoftSAE: the mean of k_hat held at the target while training, and L0 calibrated to k.

Soft phase (`sparsity_control="constraint"`). The k head's logits z_i are shifted by the one offset delta that makes
the batch's mean k_hat equal the target k_t exactly: k_hat_i = clamp(k_max * sigmoid(z_i + delta), 1, d_sae) with
mean(k_hat) = k_t. delta is differentiated through (implicitly: d delta / d z_j = -w_j / sum(w), w_i = dk_hat_i/dz_i),
so the gradient reaching the k head is w_i * (g_i - gbar), gbar the w-weighted mean of the loss gradients g_i on
k_hat: the k head learns how to share the batch's features among its inputs, never how many to spend. That is the
Lagrangian of the constraint mean(k_hat) = k_t solved exactly on every batch, its multiplier being gbar: no budget
weight to tune, no gradient that outweighs the reconstruction's pull (or inflates Adam's second moment), and no
offset below the target like the paper's one-sided softplus budget, which settles about (1/beta) ln(pull / lambda)
features short of it.

Hard phase. What decides L0 there is not mean(k_hat) but the mean of min(round(k_hat), positive codes), clamped to
[1, k_max]. With the k head frozen, `calibrated_offset` finds the shift of its logits that makes a batch's hard L0
equal k, and the caller moves the k head's output bias a fraction of the way there on every batch, while the
encoder keeps changing how many codes are positive.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from softsae_plugin.collectives import gather_rows, sum_over_ranks

# The hard count is a step function of the shift, and the bisection finds a step's edge, where some input's k_hat
# rounds either way: the calibration moves this far past it, so that float rounding (a matmul over another batch
# split, say) cannot decide that input's count. It moves k_hat by about 1e-4 features.
BOUNDARY_MARGIN = 1e-5
# Bisection for a shift of the logits: 60 halvings of a 60-wide interval resolve 5e-17, below float64's resolution.
SHIFT_RANGE = 30.0
BISECTION_STEPS = 60


def rounded_k(k_hat: Tensor, k_max: int) -> Tensor:
    """The hard top-k's k per input: round(k_hat), clamped to [1, k_max] (as a float tensor of k_hat's shape)."""
    return k_hat.detach().round().clamp(1, k_max)


def hard_counts(k_hat: Tensor, n_positive: Tensor, k_max: int) -> Tensor:
    """The number of codes the hard top-k keeps per input: `rounded_k`, or fewer where fewer codes are positive."""
    return torch.minimum(rounded_k(k_hat, k_max), n_positive.to(k_hat.dtype))


def k_from_logit(logit: Tensor, k_max: int, d_sae: int) -> Tensor:
    """The k head's output: k_max * sigmoid(logit), clamped to [1, d_sae]."""
    return (k_max * torch.sigmoid(logit)).clamp(1.0, float(d_sae))


def _solve_shift(mean_of: Callable[[Tensor], Tensor], target: float, like: Tensor) -> Tensor:
    # The smallest shift whose mean reaches `target`, for a mean nondecreasing in the shift; no device sync.
    low = torch.full((), -SHIFT_RANGE, dtype=like.dtype, device=like.device)
    high = torch.full((), SHIFT_RANGE, dtype=like.dtype, device=like.device)
    for _ in range(BISECTION_STEPS):
        middle = (low + high) / 2
        short = mean_of(middle) < target
        low, high = torch.where(short, middle, low), torch.where(short, high, middle)
    return (low + high) / 2


def calibrated_offset(logits: Tensor, n_positive: Tensor, k: float, k_max: int, d_sae: int) -> Tensor:
    """The shift of the k head's logits that makes the batch's mean hard count (see `hard_counts`) equal `k`; under
    data-parallel training, the global batch's."""
    logits, n_positive = gather_rows(logits.detach()), gather_rows(n_positive)
    edge = _solve_shift(
        lambda shift: hard_counts(k_from_logit(logits + shift, k_max, d_sae), n_positive, k_max).mean(), k, logits
    )
    return edge + BOUNDARY_MARGIN


class _ConstrainedK(torch.autograd.Function):
    """logits -> k_hat with the batch mean of k_hat held at the target (see the module docstring)."""

    # Under data-parallel training the shift is solved on the global batch's logits, and the backward's weighted
    # mean gradient is summed over ranks: with DistributedDataParallel's averaging, the gradient is exactly the
    # one-process gradient of the global batch (each rank's k_hat depends on every rank's logits through the shift).
    @staticmethod
    def forward(ctx: Any, logits: Tensor, target: float, k_max: int, d_sae: int, record: Callable[..., None]) -> Tensor:
        every = gather_rows(logits)
        shift = _solve_shift(lambda s: k_from_logit(every + s, k_max, d_sae).mean(), target, logits)
        k_hat = k_from_logit(logits + shift, k_max, d_sae)
        probability = torch.sigmoid(logits + shift)
        # dk_hat/dz, zero where the clamp at 1 holds (those rows take no part in the constraint's slack).
        slope = k_max * probability * (1 - probability) * (k_max * probability > 1)
        ctx.save_for_backward(slope, sum_over_ranks(slope.sum()))
        ctx.record = record
        record(shift=shift)
        return k_hat

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        slope, total_slope = ctx.saved_tensors
        mean_grad = sum_over_ranks((slope * grad).sum()) / total_slope.clamp_min(torch.finfo(slope.dtype).tiny)
        ctx.record(multiplier=-mean_grad * grad.numel())
        return slope * (grad - mean_grad), None, None, None, None


def constrained_k(
    logits: Tensor, target: float, k_max: int, d_sae: int, record: Callable[..., None] = lambda **_: None
) -> Tensor:
    """k_hat = clamp(k_max * sigmoid(logits + shift), 1, d_sae) with the one shift that makes mean(k_hat) = target
    (the mean over the global batch under data-parallel training).

    The gradient flows through the shift (implicit differentiation), so it never changes the batch mean. `record`
    is called with `shift=` (the solved shift, in the forward) and `multiplier=` (in the backward: the Lagrange
    multiplier mu of the term mu * (mean(k_hat) - target) that would hold the mean there, i.e. minus the batch size
    times the slope-weighted mean of the gradients arriving at k_hat).
    """
    return _ConstrainedK.apply(logits, float(target), k_max, d_sae, record)
