"""LapSum soft top-k (Struski et al., ICML 2025): closed-form solve and closed-form backward.

For a row of scores x, a target k in (0, n) and a scale tau > 0, the shift b solves
sum_j F((x_j - b) / tau) = k with F the standard Laplace CDF, and the weights are p_j = F((x_j - b) / tau).
See the SoftSAE method notes, section 1. All solving is done in "scaled" units v = (x - anchor) / tau, with the
anchor a score of the same row close to the threshold, so that float32 stays accurate at tau = 1e-4.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import Tensor

__all__ = ["soft_topk"]

Method = Literal["auto", "sort", "topk"]

# Far tails are flushed to exact zeros: e^z / 2 becomes 0 where z < floor. In
# float32 the floor e^-28 changes no weight by more than 4e-13 (their sum, k, by less than float32 resolves:
# n e^floor < 1e-7 k) and keeps every weight either 0 or above 1e-13: smaller weights, times the codes and their
# gradients, fall below float32's normal range (1.2e-38), and subnormal arithmetic is many times slower on CPUs
# (with a floor of e^-80, early soft-phase steps ran several times slower: eval/README.md). float64 keeps e^-80,
# 1e-35, far above its subnormals. Exp of very negative arguments is slow on CPU too.
_EXP_FLOOR = {torch.float64: -80.0}
_EXP_FLOOR_FLOAT32 = -28.0
# A term below e^-80 of a log-sum changes no float32 result; clamped there, logaddexp's result (log(1 + tiny)) stays
# out of the subnormal range.
_LOG_TERM_FLOOR = -80.0
# Scaled scores are clamped to +-_SCALED_LIMIT around the anchor: huge scores or a tiny tau (1e30 / 1e-6) would
# otherwise overflow float32 to inf and the solve would return NaN. The clamp changes no weight: the threshold lies
# within about 60 of the anchor, or midway between it and a far neighbour, so a score clamped this far out is
# thousands of units from the threshold either way, with weight exactly 0 or 1.
_SCALED_LIMIT = 1e4


def _exp_floor(dtype: torch.dtype) -> float:
    """The exponent below which e^z is flushed to zero for scores of `dtype` (see above)."""
    return _EXP_FLOOR.get(dtype, _EXP_FLOOR_FLOAT32)


def _half_exp(arg: Tensor) -> Tensor:
    """e^arg / 2 for arg <= 0, flushed to 0 where arg < floor (see above)."""
    floor = _exp_floor(arg.dtype)
    return arg.clamp(min=floor).exp_().masked_fill_(arg < floor, 0).mul_(0.5)


def _laplace_cdf(z: Tensor) -> Tensor:
    """Standard Laplace CDF F(z) = e^z / 2 for z <= 0 and 1 - e^-z / 2 for z > 0."""
    half_tail = _half_exp(-z.abs())
    return torch.where(z > 0, 1 - half_tail, half_tail)


def _kth_largest(sorted_desc: Tensor, k: Tensor) -> Tensor:
    """Per row, the ceil(k)-th largest entry of rows sorted in descending order (the solve's anchor)."""
    index = (torch.ceil(k).long() - 1).clamp_(0, sorted_desc.shape[-1] - 1)
    return sorted_desc.gather(-1, index[:, None]).squeeze(-1)


def _threshold(top: Tensor, k: Tensor, tail_lse: Tensor | None) -> tuple[Tensor, Tensor]:
    """Solve sum_j F(v_j - t) = k for t, closed form, for rows of scaled scores v.

    `top` (R, m) holds the largest scaled scores of each row in descending order; `tail_lse` (R,) is the
    log-sum-exp of the row's other scaled scores (all <= top[:, -1]), or None when `top` is the whole row.
    Returns t (R,) and a mask (R,) of the rows whose threshold is proven to lie at or above top[:, -1], which
    is what makes folding the tail into one sum exact; t is meaningless on the other rows.
    """
    m = top.shape[-1]
    # Choose the piece: S_i = S(t = v_i) = i + (1 + Q_i - P_i) / 2 with P_i = sum_{j<=i} e^(v_i - v_j) and
    # Q_i = sum_{j>=i} e^(v_j - v_i) (every exponent <= 0), nondecreasing in i. Rounding in these running sums
    # can only pick a neighbouring piece when k is within rounding of an S_i, i.e. when t is that close to
    # v_i, where the neighbour's root is accurate to second order; cummax keeps rounding from breaking the
    # monotonicity searchsorted relies on.
    log_p = top + torch.logcumsumexp(-top, dim=-1)
    log_q = torch.logcumsumexp(top.flip(-1), dim=-1).flip(-1) - top
    if tail_lse is not None:
        log_q = torch.logaddexp(log_q, (tail_lse[:, None] - top).clamp(min=_LOG_TERM_FLOOR))
    position = torch.arange(m, dtype=top.dtype, device=top.device)
    s = torch.cummax(position + 0.5 * (1 + log_q.exp() - log_p.exp()), dim=-1).values
    piece = torch.searchsorted(s, k[:, None]).squeeze(-1)  # first i with S_i >= k: t in [v_i, v_{i-1}]

    # The root needs A = P_{i-1} and B = Q_i accurately: re-sum them directly (logsumexp sums in blocks).
    above = (piece - 1).clamp(min=0)[:, None]
    below = piece.clamp(max=m - 1)[:, None]
    v_above = top.gather(-1, above).squeeze(-1)
    v_below = top.gather(-1, below).squeeze(-1)
    is_above = torch.arange(m, device=top.device) < piece[:, None]
    log_a = torch.logsumexp((v_above[:, None] - top).masked_fill_(~is_above, -math.inf), dim=-1)
    log_b = torch.logsumexp((top - v_below[:, None]).masked_fill_(is_above, -math.inf), dim=-1)
    if tail_lse is not None:
        log_b = torch.logaddexp(log_b, tail_lse - v_below)
    # On the piece, y = e^(t - v_above) solves A y^2 + 2 e y - B g = 0 with e = k - i, g = e^(v_below - v_above).
    # Take log r, r = |e| + sqrt(e^2 + A B g), in the log domain: g underflows in float32 for integer k.
    # The end pieces need no formula of their own: on piece 0 (threshold above every score) A = 0, so r = 2 e and
    # t = v_0 + log(B / 2k); on piece m (below every score, whole row only) B = 0 and t = v_{m-1} + log(2 (m - k) / A).
    excess = k - piece.to(k.dtype)
    log_abs_excess = excess.abs().log()
    log_root = torch.logaddexp(
        log_abs_excess, 0.5 * torch.logaddexp(2 * log_abs_excess, log_a + log_b + (v_below - v_above))
    )
    # Of the two equivalent forms of the root, each side uses the one without cancellation.
    t = torch.where(excess <= 0, v_above + log_root - log_a, v_below + log_b - log_root)
    found = piece < m if tail_lse is not None else torch.ones_like(piece, dtype=torch.bool)
    return t, found


def _solve_sorted(x: Tensor, k: Tensor, tau: Tensor) -> tuple[Tensor, Tensor]:
    """Reference solve on rows x (R, n): full sort. Returns the weights and each row's anchor score."""
    sorted_x, order = torch.sort(x, dim=-1, descending=True)
    anchor = _kth_largest(sorted_x, k)
    scaled = ((sorted_x - anchor[:, None]) / tau).clamp_(-_SCALED_LIMIT, _SCALED_LIMIT)
    t, _ = _threshold(scaled, k, None)
    weights = torch.empty_like(x).scatter_(-1, order, _laplace_cdf(scaled - t[:, None]))
    return weights, anchor


# Fusion (soft_topk(..., fused=True)): the fast path's passes over the whole (R, n) matrix, written as pure
# functions that torch.compile turns into one loop each: one read of x for the tail's sum and one for the weights,
# one or two reads of the weights and gradient in the backward, instead of about 17 eager passes. Compiled on
# first use; where compilation fails (no C++ compiler or Triton) they run uncompiled, with the same results.
_COMPILED: dict[Callable[..., Any], Callable[..., Any]] = {}
_FUSION_FAILED = False


def _call_fused(fn: Callable[..., Any], *args: Tensor) -> Any:
    """`fn(*args)` through its torch.compile'd version, or `fn` itself once compilation has failed."""
    global _FUSION_FAILED
    if not _FUSION_FAILED:
        compiled = _COMPILED.get(fn)
        if compiled is None:
            compiled = _COMPILED[fn] = torch.compile(fn)
        try:
            return compiled(*args)
        except Exception as error:  # any compiler or backend failure: the uncompiled function gives the same result
            _FUSION_FAILED = True
            warnings.warn(
                f"soft_topk: fusing with torch.compile failed ({type(error).__name__}: {error}); running unfused",
                RuntimeWarning,
                stacklevel=2,
            )
    return fn(*args)


def _tail_sums(x: Tensor, low: Tensor, tau: Tensor) -> tuple[Tensor, Tensor]:
    """Per row, the sum of e^((x - low) / tau) (floored as below) over the entries x < low; the count of x == low."""
    z = ((x - low) / tau).clamp(_exp_floor(x.dtype), 0).exp()
    return torch.where(x < low, z, 0).sum(-1), (x == low).sum(-1)


def _tail_weights(x: Tensor, low: Tensor, tau: Tensor, flush_level: Tensor, scale: Tensor) -> Tensor:
    """The tail's weights e^((x - low) / tau) * scale, flushed to zero below flush_level as in _solve_candidates."""
    z = ((x - low) / tau).clamp(_exp_floor(x.dtype), 0).exp()
    return torch.where(z < flush_level, 0, z) * scale


def _density_sums(weights: Tensor, grad: Tensor) -> tuple[Tensor, Tensor]:
    """Per row, sum(d) and sum(d * grad) with d = min(p, 1 - p) = tau * dp/dz (see _SoftTopK.backward)."""
    density = torch.minimum(weights, 1 - weights)
    return density.sum(-1, keepdim=True), (density * grad).sum(-1, keepdim=True)


def _density_grad(weights: Tensor, grad: Tensor, mean_grad: Tensor, tau: Tensor) -> Tensor:
    """x's gradient d * (grad - gbar) / tau (see _SoftTopK.backward)."""
    return torch.minimum(weights, 1 - weights) * (grad - mean_grad) / tau


def _solve_candidates(
    x: Tensor, k: Tensor, tau: Tensor, size: int, fused: bool = False
) -> tuple[Tensor, Tensor, Tensor]:
    """Fast solve on rows x (R, n): the top `size` scores are solved exactly, the rest enter as one sum.

    Returns the weights, the anchors and the mask of rows whose threshold lies among the candidates; the
    weights of the other rows are meaningless.
    """
    top_x, top_index = torch.topk(x, size, dim=-1)
    anchor = _kth_largest(top_x, k)
    top = ((top_x - anchor[:, None]) / tau).clamp_(-_SCALED_LIMIT, _SCALED_LIMIT)
    low = top_x[:, -1:]
    if fused:
        low = low.contiguous()  # its stride would follow `size` and make the compiled loops recompile
        # Ties with the lowest candidate add e^0 = 1 each, exactly; those among the candidates are not tail.
        below, ties = _call_fused(_tail_sums, x, low, tau)
        tail_sum = below + (ties - (top_x == low).sum(-1)).to(below.dtype)
    else:
        # e^((x - lowest candidate) / tau) over the tail, clamped to <= 0 and with the candidates zeroed.
        tail = torch.sub(x, low).div_(tau).clamp_(_exp_floor(x.dtype), 0).exp_().scatter_(-1, top_index, 0)
        tail_sum = tail.sum(-1)
    t, found = _threshold(top, k, top[:, -1] + tail_sum.log())
    # The tail lies below the threshold, so p = e^(v - t) / 2 there: `tail` rescaled by e^(lowest - t) / 2 (no
    # second exp pass), flushed as in _half_exp before rescaling so that tiny weights become zeros, not subnormals.
    # A tail score equal to the lowest candidate gets that candidate's weight exactly (1 * e^shift / 2).
    shift = (top[:, -1] - t)[:, None]  # <= 0 on the rows where `found`
    floor = _exp_floor(x.dtype)
    flush_level = torch.exp(floor - shift)
    # Below the floor every tail weight is flushed (z <= 1 < flush_level): the scale need not go lower.
    scale = 0.5 * torch.exp(shift.clamp(min=floor))
    if fused:
        weights = _call_fused(_tail_weights, x, low, tau, flush_level, scale)
    else:
        weights = tail.masked_fill_(tail < flush_level, 0).mul_(scale)
    weights.scatter_(-1, top_index, _laplace_cdf(top - t[:, None]))
    return weights, anchor, found


def _solve(
    x: Tensor,
    k: Tensor,
    tau: Tensor,
    method: Method,
    margin: int,
    fused: bool = False,
    k_bound: int | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Forward solve on rows x (R, n) with targets k (R,); `fused`: the fast path's big passes compiled; `k_bound`:
    the caller's promise 0 < k <= k_bound (see soft_topk).

    Returns the weights (R, n), each row's anchor score (R,) and the indices of the rows the fast path handed
    to the full solve (observable for tests; empty when the full solve was used directly).
    """
    n = x.shape[-1]
    promised = k_bound is not None and k_bound < n  # every row inside the domain: nothing to read from the device
    inside = None if promised else (k > 0) & (k < n)
    k_solved = k if inside is None else torch.where(inside, k, min(1.0, n / 2))  # rows outside: overwritten below
    if method == "sort" or x.shape[0] == 0:
        size = n
    elif k_bound is not None:
        # S(t) at the m-th largest score is at least m / 2 (each of the m terms above it is at least 1/2), so with
        # m >= 2 k_bound the threshold always lies among the candidates: no row can need the full solve.
        size = 2 * math.ceil(k_bound) + margin
    else:
        size = int(torch.ceil(k_solved.max())) + margin
    use_candidates = size < (n / 2 if method == "auto" else n)
    fallback = torch.empty(0, dtype=torch.long, device=x.device)
    if use_candidates:
        weights, anchor, found = _solve_candidates(x, k_solved, tau, size, fused)
        if k_bound is None:
            fallback = (~found).nonzero().squeeze(-1)
        if fallback.numel() > 0:
            weights[fallback], anchor[fallback] = _solve_sorted(x[fallback], k_solved[fallback], tau)
    else:
        weights, anchor = _solve_sorted(x, k_solved, tau)
    # Ends of the domain: the limits k -> 0 (all zeros) and k -> n (all ones).
    if inside is not None and not bool(inside.all()):
        weights = torch.where(inside[:, None], weights, (k >= n).to(weights.dtype)[:, None])
    return weights, anchor, fallback


class _SoftTopK(torch.autograd.Function):
    """Closed-form solve forward; implicit-differentiation backward for x, k and tau."""

    @staticmethod
    def forward(
        ctx, x: Tensor, k: Tensor, tau: Tensor, method: Method, margin: int, fused: bool, k_bound: int | None
    ) -> Tensor:
        n = x.shape[-1]
        weights, anchor, _ = _solve(x.reshape(-1, n), k.reshape(-1), tau, method, margin, fused, k_bound)
        out = weights.view(x.shape)
        ctx.fused = fused
        ctx.save_for_backward(out, x if ctx.needs_input_grad[2] else None, anchor, tau)  # x: for dL/dtau only
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        out, x, anchor, tau = ctx.saved_tensors
        n = out.shape[-1]
        weights, grad = out.reshape(-1, n), grad_out.reshape(-1, n)
        # tau * dp/dz = F'(z) = min(F, 1 - F): no exp needed. Zero on saturated rows and at the domain ends.
        if ctx.fused and not ctx.needs_input_grad[2]:  # one fused pass for both sums (dL/dtau: the eager path)
            total, weighted_sum = _call_fused(_density_sums, weights, grad)
            density = weighted_grad = None
        else:
            density = (1 - weights).clamp_max_(weights)
            weighted_grad = density * grad
            total, weighted_sum = density.sum(-1, keepdim=True), weighted_grad.sum(-1, keepdim=True)
        total = torch.where(total > 0, total, 1)  # every weight is exactly 0 or 1: no gradient, and no NaN
        mean_grad = weighted_sum / total  # gbar = sum_i q_i g_i
        grad_x = grad_k = grad_tau = None
        if ctx.needs_input_grad[2]:
            # Offsets from a score near the threshold keep x_j - xbar free of cancellation.
            offset = x.reshape(-1, n) - anchor[:, None]
            mean_offset = (density * offset).sum(-1, keepdim=True) / total
            grad_tau = -(weighted_grad * (offset - mean_offset)).sum() / tau**2
        if ctx.needs_input_grad[1]:
            grad_k = mean_grad.view(out.shape[:-1])
        if ctx.needs_input_grad[0] and weighted_grad is None:
            grad_x = _call_fused(_density_grad, weights, grad, mean_grad, tau).view(out.shape)
        elif ctx.needs_input_grad[0]:  # last: it reuses weighted_grad's memory
            grad_x = weighted_grad.addcmul_(density, mean_grad, value=-1).div_(tau).view(out.shape)
        return grad_x, grad_k, grad_tau, None, None, None, None


def soft_topk(
    x: Tensor,
    k: float | Tensor,
    tau: float | Tensor,
    *,
    method: Method = "auto",
    margin: int = 16,
    fused: bool = False,
    k_bound: int | None = None,
) -> Tensor:
    """LapSum soft top-k weights p = F((x - b) / tau) along the last axis, with b chosen so that sum(p) == k.

    `x` is (..., n), floating point (float16/bfloat16 are computed in float32 and cast back); `k` is a real
    number or a tensor of shape x.shape[:-1], used as is (not rounded); `tau` > 0 is a number or a 0-dim
    tensor (small tau = close to the hard top-k mask). Gradients flow to x, k and tau (closed form). The valid
    domain is 0 < k < n; the ends are defined by their limits: rows with k <= 0 give all zeros and rows with
    k >= n all ones, with zero gradient. `method`: "sort" solves on the fully sorted row; "topk" solves on the
    top ceil(max k) + `margin` scores with the rest folded into one sum, verifies that the threshold lies among
    them and re-solves the failing rows with "sort" (same result to rounding); "auto" uses "topk" when
    ceil(max k) + margin < n / 2. Weights below about 4e-13 (1e-35 for float64) are flushed to exact zeros (speed;
    see _EXP_FLOOR). Reading max k and checking tau synchronise with the device. `fused=True` runs the fast path's
    passes over the whole matrix (forward and backward) as torch.compile'd loops: same results to float
    rounding, several times faster on large inputs, at the price of compiling once per process (seconds to a
    minute; unfused, with a warning, where compilation is unavailable). `k_bound`: the caller's promise that
    0 < k <= k_bound on every row (not checked): "topk" then takes 2 ceil(k_bound) + `margin` candidates, enough
    for every row's threshold to lie among them, and nothing is read from the device (no max k, no domain ends, no
    rows to re-solve; a Python tau is checked on the host): no sync, the same result to float rounding.
    """
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating point tensor, got {x.dtype}")
    if method not in ("auto", "sort", "topk"):
        raise ValueError(f"method must be 'auto', 'sort' or 'topk', got {method!r}")
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    dtype = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    if k_bound is not None and not k_bound > 0:
        raise ValueError(f"k_bound must be > 0 or None, got {k_bound}")
    if isinstance(tau, Tensor):
        if tau.dim() != 0:
            raise ValueError(f"tau must be a number or a 0-dim tensor, got shape {tuple(tau.shape)}")
        tau_value = tau.to(device=x.device, dtype=dtype)
        if not bool(tau_value > 0):
            raise ValueError(f"tau must be > 0, got tau={float(tau_value)}")
    else:
        if not float(tau) > 0:
            raise ValueError(f"tau must be > 0, got tau={float(tau)}")
        tau_value = torch.full((), float(tau), device=x.device, dtype=dtype)  # a fill, not a copy from the host
    if isinstance(k, Tensor):
        if k.shape != x.shape[:-1]:
            raise ValueError(
                f"k must be a number or have shape x.shape[:-1] = {tuple(x.shape[:-1])}, got shape {tuple(k.shape)}"
            )
        k_value = k.to(device=x.device, dtype=dtype)
    else:
        k_value = torch.full(x.shape[:-1], float(k), device=x.device, dtype=dtype)
    return _SoftTopK.apply(x.to(dtype), k_value, tau_value, method, margin, fused, k_bound).to(x.dtype)
