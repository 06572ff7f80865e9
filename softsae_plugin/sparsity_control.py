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

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from softsae_plugin.collectives import gather_rows, sum_over_ranks

# The fraction of the way the k head's output bias moves towards each batch's solved shift. Soft phase: a running
# average over a few batches of the constraint's shift, which the hard phase starts from. Hard phase: 1/n over its
# first n batches (their mean), then at least MIN_CALIBRATION_STEP, so the calibration averages out batch-to-batch
# noise (each batch's own shift scatters by a few percent of L0 on widely spread k_hat) and still follows the encoder.
SHIFT_STEP = 0.2
MIN_CALIBRATION_STEP = 0.02
# The hard count is a step function of the shift, and the calibration finds a step's edge, where some input's k_hat
# rounds either way: it moves this far past it, so that float rounding (a matmul over another batch split, say)
# cannot decide that input's count. It moves k_hat by about 1e-4 features.
BOUNDARY_MARGIN = 1e-5
# The calibration's shifts lie within +-SHIFT_RANGE: a mean out of reach ends at the range's edge.
SHIFT_RANGE = 30.0
# Newton iterations of the constraint's shift. Measured on float32 batches of 64 to 4096 logits with a spread up to 3,
# k_max 24 to 640, targets across (1, k_max) and the root up to 3 away from the start: at most 6 reach the target to
# float rounding (float64: 6 in tests/test_sparsity_control.py). Training starts each solve at the running shift,
# where 1 to 3 do. A step moves the shift by at most MAX_NEWTON_STEP.
NEWTON_STEPS = 6
MAX_NEWTON_STEP = 4.0
SATURATED = 1e-6


def shift_update(shift: Tensor, hard_step: int | None) -> Tensor:
    """How far the k head's output bias moves this step towards the batch's solved `shift` (see SHIFT_STEP):
    SHIFT_STEP of it in the soft phase (`hard_step` None), the calibration's running mean in the hard phase."""
    if hard_step is None:
        return SHIFT_STEP * shift
    return shift * max(1 / (hard_step + 1), MIN_CALIBRATION_STEP)


def rounded_k(k_hat: Tensor, k_max: int) -> Tensor:
    """The hard top-k's k per input: round(k_hat), clamped to [1, k_max] (as a float tensor of k_hat's shape)."""
    return k_hat.detach().round().clamp(1, k_max)


def hard_counts(k_hat: Tensor, n_positive: Tensor, k_max: int) -> Tensor:
    """The number of codes the hard top-k keeps per input: `rounded_k`, or fewer where fewer codes are positive."""
    return torch.minimum(rounded_k(k_hat, k_max), n_positive.to(k_hat.dtype))


def k_from_logit(logit: Tensor, k_max: int, d_sae: int) -> Tensor:
    """The k head's output: k_max * sigmoid(logit), clamped to [1, d_sae]."""
    return (k_max * torch.sigmoid(logit)).clamp(1.0, float(d_sae))


def constraint_shift(logits: Tensor, target: float, k_max: int, d_sae: int) -> Tensor:
    """The shift s of the logits that makes the mean of k_from_logit(logits + s) equal `target` (over the global batch
    under data-parallel training), not differentiated; no device sync.

    Newton's method on psi(s) = logit(mean k_hat / k_max), which is close to linear in s (slope 1 for one input and
    at both ends, between 0 and 1 elsewhere), started at s = 0 (the logits already hold the running shift), for
    NEWTON_STEPS iterations of at most MAX_NEWTON_STEP each; an undefined step (the mean flat, or saturated in
    floating point) moves nothing. A target out of reach (k_max itself, say) ends with every k_hat at k_max in
    floating point, or MAX_NEWTON_STEP * NEWTON_STEPS away.
    """
    every = gather_rows(logits.detach())
    shift = torch.zeros((), dtype=every.dtype, device=every.device)
    goal = math.log(target / (k_max - target)) if target < k_max else math.inf  # psi(target)
    for _ in range(NEWTON_STEPS):
        probability = torch.sigmoid(every + shift)
        k_hat = (k_max * probability).clamp(1.0, float(d_sae))
        # Kept off 1, where a mean saturated in floating point would leave psi and its slope undefined.
        fraction = (k_hat.mean() / k_max).clamp(max=1 - SATURATED)
        # psi'(s) = mean(dk_hat/ds) / (k_max q (1 - q)), q = mean(k_hat) / k_max; dk_hat/ds = k_max p (1 - p) where
        # the clamp at 1 does not hold (k_max <= d_sae: the upper one never does).
        slope = (probability * (1 - probability) * (k_hat > 1)).mean()
        step = (goal - torch.logit(fraction)) * (fraction * (1 - fraction)) / slope
        shift = shift + step.nan_to_num(nan=0.0, posinf=MAX_NEWTON_STEP, neginf=-MAX_NEWTON_STEP).clamp(
            -MAX_NEWTON_STEP, MAX_NEWTON_STEP
        )
    return shift


def calibrated_offset(logits: Tensor, n_positive: Tensor, k: float, k_max: int, d_sae: int) -> Tensor:
    """The shift of the k head's logits that makes the batch's mean hard count (see `hard_counts`) equal `k`; under
    data-parallel training, the global batch's. Exact and without a device sync.

    Input i's count rises by one where k_max * sigmoid(z_i + s) crosses j + 1/2 (j = 1 .. k_max - 1), at
    s = logit((j + 1/2) / k_max) - z_i, up to its number of positive codes; it is 1 below every crossing (0 with no
    positive code). So the smallest shift reaching the mean k is the n-th smallest of the crossings that count, n the
    number of steps the batch needs above its base; BOUNDARY_MARGIN past it, within +-SHIFT_RANGE.
    """
    logits, n_positive = gather_rows(logits.detach().reshape(-1)), gather_rows(n_positive.reshape(-1))
    steps = torch.arange(1, k_max, device=logits.device)
    levels = torch.logit((steps.to(logits.dtype) + 0.5) / k_max)  # within 1e-6 of exact in float32: < the margin
    counted = steps < n_positive[:, None]  # the count is capped at the positive codes
    crossings = torch.where(counted, levels - logits[:, None], torch.inf).flatten().sort().values
    base = n_positive.clamp(max=1).sum()
    needed = math.ceil(len(logits) * k - 1e-9) - base  # the smallest whole count reaching a mean of k
    edge = crossings.gather(0, (needed - 1).clamp(0, max(len(crossings) - 1, 0)).reshape(1)).squeeze(0)
    edge = torch.where(needed > 0, edge, -SHIFT_RANGE)
    return edge.clamp(-SHIFT_RANGE, SHIFT_RANGE) + BOUNDARY_MARGIN


class _ConstrainedK(torch.autograd.Function):
    """logits -> k_hat with the batch mean of k_hat held at the target (see the module docstring)."""

    # Under data-parallel training the shift is solved on the global batch's logits, and the backward's weighted
    # mean gradient is summed over ranks: with DistributedDataParallel's averaging, the gradient is exactly the
    # one-process gradient of the global batch (each rank's k_hat depends on every rank's logits through the shift).
    @staticmethod
    def forward(ctx: Any, logits: Tensor, shift: Tensor, k_max: int, d_sae: int, record: Callable[..., None]) -> Tensor:
        probability = torch.sigmoid(logits + shift)
        k_hat = (k_max * probability).clamp(1.0, float(d_sae))
        # dk_hat/dz, zero where the clamp at 1 holds (those rows take no part in the constraint's slack).
        slope = k_max * probability * (1 - probability) * (k_max * probability > 1)
        ctx.save_for_backward(slope, sum_over_ranks(slope.sum()))
        ctx.record = record
        return k_hat

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        slope, total_slope = ctx.saved_tensors
        mean_grad = sum_over_ranks((slope * grad).sum()) / total_slope.clamp_min(torch.finfo(slope.dtype).tiny)
        if not torch.compiler.is_compiling():  # a Python side effect, which a compiled graph cannot hold
            ctx.record(multiplier=-mean_grad * grad.numel())
        return slope * (grad - mean_grad), None, None, None, None


def constrained_k(
    logits: Tensor,
    target: float,
    k_max: int,
    d_sae: int,
    record: Callable[..., None] = lambda **_: None,
    *,
    shift: Tensor | None = None,
) -> Tensor:
    """k_hat = clamp(k_max * sigmoid(logits + shift), 1, d_sae) with the one shift that makes mean(k_hat) = target
    (the mean over the global batch under data-parallel training).

    The gradient flows through the shift (implicit differentiation), so it never changes the batch mean. `record`
    is called with `shift=` (the solved shift, before the forward) and `multiplier=` (in the backward: the Lagrange
    multiplier mu of the term mu * (mean(k_hat) - target) that would hold the mean there, i.e. minus the batch size
    times the slope-weighted mean of the gradients arriving at k_hat). `shift`: the solved shift
    (`constraint_shift`), when the caller has it already.
    """
    if shift is None:
        shift = constraint_shift(logits, target, k_max, d_sae)
    record(shift=shift)
    return _ConstrainedK.apply(logits, shift, k_max, d_sae, record)
