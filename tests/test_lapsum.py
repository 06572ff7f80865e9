"""Tests of the LapSum soft top-k against an independent float64 bisection reference."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from softsae_plugin import lapsum
from softsae_plugin.lapsum import soft_topk

FLOAT64_EPS = torch.finfo(torch.float64).eps


pytestmark = pytest.mark.usefixtures("single_thread")


def laplace_cdf(z: torch.Tensor) -> torch.Tensor:
    half_tail = torch.exp(-z.abs()) / 2
    return torch.where(z > 0, 1 - half_tail, half_tail)


def reference_soft_topk(x: torch.Tensor, k: float | torch.Tensor, tau: float) -> torch.Tensor:
    """Bisection on the shift b of S(b) = sum_j F((x_j - b) / tau) = k, in float64, until b stops moving."""
    x = x.double()
    k = torch.as_tensor(k, dtype=torch.float64).expand(x.shape[:-1])
    reach = tau * (60 + math.log(x.shape[-1]))  # S(lo) >= k >= S(hi) for every k used in these tests
    lo, hi = x.amin(-1) - reach, x.amax(-1) + reach
    for _ in range(400):
        mid = (lo + hi) / 2
        if bool(((mid == lo) | (mid == hi)).all()):
            break
        above = laplace_cdf((x - mid[..., None]) / tau).sum(-1) >= k
        lo, hi = torch.where(above, mid, lo), torch.where(above, hi, mid)
    return laplace_cdf((x - ((lo + hi) / 2)[..., None]) / tau)


def reference_tolerance(x: torch.Tensor, tau: float) -> float:
    """The reference's own rounding: b is only known to an ulp of the scores, i.e. eps * |x| / tau in z."""
    return 1e-12 + 8 * FLOAT64_EPS * float(x.abs().max()) / tau


def make_rows(n: int, scale: float, generator: torch.Generator) -> torch.Tensor:
    """Eight float64 rows: Gaussian, ties on a coarse grid, constant, ReLU-like (mostly exact zeros)."""
    gauss = torch.randn(2, n, generator=generator, dtype=torch.float64)
    ties = torch.round(torch.randn(2, n, generator=generator, dtype=torch.float64) * 2) / 2
    constant = torch.full((2, n), 0.3, dtype=torch.float64)
    relu = torch.relu(torch.randn(2, n, generator=generator, dtype=torch.float64) - 1.5)
    return torch.cat([gauss, ties, constant, relu]) * scale


@pytest.mark.parametrize("n", [2, 3, 50, 1000, 16384])
@pytest.mark.parametrize("tau", [1e-4, 1e-2, 1.0, 10.0])
@pytest.mark.parametrize("scale", [1e-3, 1.0, 1e3])
def test_matches_bisection_reference(n: int, tau: float, scale: float) -> None:
    generator = torch.Generator().manual_seed(n * 7 + int(math.log10(tau)) * 3 + int(math.log10(scale)))
    x = make_rows(n, scale, generator)
    small_k = 0.3 + torch.rand(x.shape[0], generator=generator, dtype=torch.float64) * min(n - 0.6, 40)
    cases = [(small_k, 4), (small_k, 16), (0.7 * n, 16), (float(max(n // 3, 1)), 16)]  # per-row, scalar, integer
    for k, margin in cases:
        expected = reference_soft_topk(x, k, tau)
        k_sum = torch.as_tensor(k, dtype=torch.float64).expand(x.shape[:-1])
        x32 = x.float()
        k32 = k.float() if isinstance(k, torch.Tensor) else float(torch.tensor(k, dtype=torch.float32))
        expected32 = reference_soft_topk(x32, k32, tau)  # the float32 inputs are exact in float64
        results = {}
        for method in ("sort", "topk", "auto"):
            p = results[method] = soft_topk(x, k, tau, method=method, margin=margin)
            assert p.dtype == torch.float64 and p.shape == x.shape
            assert torch.allclose(p, expected, rtol=0, atol=reference_tolerance(x, tau)), method
            assert torch.allclose(p.sum(-1), k_sum, rtol=1e-13, atol=1e-12)
            assert bool(((p >= 0) & (p <= 1)).all())
            p32 = soft_topk(x32, k32, tau, method=method, margin=margin)
            assert torch.allclose(p32.double(), expected32, rtol=0, atol=2e-6 + reference_tolerance(x32, tau))
            assert torch.allclose(p32.double().sum(-1), expected32.sum(-1), rtol=1e-5, atol=1e-6)
        assert torch.allclose(results["topk"], results["sort"], rtol=0, atol=1e-14)


def test_float32_small_tau_long_rows() -> None:
    """tau = 1e-4 on unit-scale scores, n = 16384: finite, sums to k, integer k included (no b = -inf)."""
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(6, 16384, generator=generator)
    x[5] = torch.relu(x[5] - 2)
    k = torch.tensor([1.0, 64.0, 100.5, 1000.0, 8191.3, 64.0])
    for method in ("sort", "topk"):
        p = soft_topk(x, k, 1e-4, method=method, margin=16)
        assert bool(torch.isfinite(p).all())
        assert torch.allclose(p.double().sum(-1), k.double(), rtol=1e-6, atol=0)
        assert torch.allclose(p.double(), reference_soft_topk(x, k, 1e-4), rtol=0, atol=1e-5)


@pytest.mark.parametrize("method", ["sort", "topk"])
def test_gradcheck(method: str) -> None:
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(3, 9, generator=generator, dtype=torch.float64).requires_grad_()
    k = torch.tensor([1.3, 2.0, 3.7], dtype=torch.float64, requires_grad=True)
    tau = torch.tensor(0.6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, k, tau: soft_topk(x, k, tau, method=method, margin=2), (x, k, tau))


def test_gradcheck_scalar_k_and_tau_float() -> None:
    x = torch.randn(2, 6, generator=torch.Generator().manual_seed(3), dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(lambda x: soft_topk(x, 2.5, 0.4), (x,))


def test_saturated_rows_have_zero_finite_gradient() -> None:
    """Integer k with gaps of thousands of tau: every weight is exactly 0 or 1 and sum(d) = 0; no NaN."""
    x = torch.tensor([[3.0, 2.0, 1.0, 0.0], [5.0, 4.0, 1.0, 0.0]], requires_grad=True)
    tau = torch.tensor(1e-4, requires_grad=True)
    k = torch.tensor([2.0, 2.0], requires_grad=True)
    p = soft_topk(x, k, tau)
    assert torch.equal(p, torch.tensor([[1.0, 1.0, 0.0, 0.0]] * 2))
    (p * torch.arange(4.0)).sum().backward()
    for grad in (x.grad, k.grad, tau.grad):
        assert bool(torch.isfinite(grad).all()) and bool((grad == 0).all())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_returns_input_dtype(dtype: torch.dtype) -> None:
    x = torch.randn(4, 300, generator=torch.Generator().manual_seed(4)).to(dtype).requires_grad_()
    k = torch.tensor([3.0, 10.5, 50.0, 120.0], requires_grad=True)
    p = soft_topk(x, k, 0.05)
    assert p.dtype == dtype
    expected = soft_topk(x.detach().float(), k.detach(), 0.05)
    assert torch.allclose(p.float(), expected, rtol=0, atol=1e-2)
    p.float().pow(2).sum().backward()
    assert x.grad.dtype == dtype and k.grad.dtype == torch.float32
    assert bool(torch.isfinite(x.grad.float()).all())


@pytest.mark.parametrize("method", ["sort", "topk"])
def test_inputs_not_modified(method: str) -> None:
    x = torch.randn(3, 200, generator=torch.Generator().manual_seed(5), requires_grad=True)
    k = torch.tensor([2.0, 5.5, 0.0], requires_grad=True)
    tau = torch.tensor(0.1, requires_grad=True)
    saved = [t.detach().clone() for t in (x, k, tau)]
    soft_topk(x, k, tau, method=method, margin=4).pow(2).sum().backward()
    for before, after in zip(saved, (x, k, tau), strict=True):
        assert torch.equal(before, after.detach())


@pytest.mark.parametrize("method", ["sort", "topk"])
def test_domain_ends(method: str) -> None:
    """k <= 0 gives all zeros, k >= n all ones, with zero gradient; the other rows are unaffected."""
    n = 40
    x = torch.randn(6, n, generator=torch.Generator().manual_seed(6), dtype=torch.float64, requires_grad=True)
    k = torch.tensor([0.0, float(n), -1.0, n + 1.0, 3.5, 1.0], dtype=torch.float64, requires_grad=True)
    tau = torch.tensor(0.2, dtype=torch.float64, requires_grad=True)
    p = soft_topk(x, k, tau, method=method, margin=2)
    assert not bool(torch.isnan(p).any())
    assert bool((p[[0, 2]] == 0).all()) and bool((p[[1, 3]] == 1).all())
    assert torch.allclose(p[4:], soft_topk(x[4:].detach(), k[4:].detach(), 0.2), rtol=0, atol=1e-14)
    (p * torch.randn(6, n, dtype=torch.float64)).sum().backward()
    for grad in (x.grad, k.grad, tau.grad):
        assert bool(torch.isfinite(grad).all())
    assert bool((x.grad[:4] == 0).all()) and bool((k.grad[:4] == 0).all())
    assert bool((x.grad[4:] != 0).any()) and bool((k.grad[4:] != 0).all())
    for k_end, value in ((0.0, 0.0), (float(n), 1.0), (-2.0, 0.0), (n + 5.0, 1.0)):
        assert bool((soft_topk(x.detach(), k_end, 0.2, method=method) == value).all())


def test_fast_path_falls_back_exactly_where_needed() -> None:
    """The fast path re-solves only the rows whose threshold lies beyond its candidates, and matches the full solve."""
    n = 1000
    tau = torch.tensor(1e-3, dtype=torch.float64)
    generator = torch.Generator().manual_seed(7)
    typical = torch.randn(n, generator=generator, dtype=torch.float64)
    ties = torch.zeros(n, dtype=torch.float64)
    ties[torch.randperm(n, generator=generator)[:100]] = 1.0  # S at the tied value is 50 < k: threshold below them
    x = torch.stack([typical, ties, torch.relu(typical)])
    k = torch.tensor([10.0, 60.0, 30.0], dtype=torch.float64)
    weights, _, fallback = lapsum._solve(x, k, tau, "topk", 4)  # 64 candidates
    assert fallback.tolist() == [1]
    full, _, none = lapsum._solve(x, k, tau, "sort", 4)
    assert none.numel() == 0
    assert torch.allclose(weights, full, rtol=0, atol=1e-14)
    assert torch.allclose(weights, reference_soft_topk(x, k, 1e-3), rtol=0, atol=1e-12)

    # k right at the candidate count: S at the last candidate is about k - 1/2 on every row.
    distinct = torch.randn(4, n, generator=generator, dtype=torch.float64)
    k_edge = torch.full((4,), 64.0, dtype=torch.float64)
    weights, _, fallback = lapsum._solve(distinct, k_edge, tau, "topk", 0)
    assert fallback.tolist() == [0, 1, 2, 3]
    assert torch.allclose(weights, reference_soft_topk(distinct, k_edge, 1e-3), rtol=0, atol=1e-12)
    public = soft_topk(distinct, k_edge, tau, method="topk", margin=0)
    assert torch.allclose(public, soft_topk(distinct, k_edge, tau, method="sort"), rtol=0, atol=1e-14)


def test_fast_path_does_not_fall_back_on_typical_rows() -> None:
    generator = torch.Generator().manual_seed(8)
    x = torch.randn(64, 4096, generator=generator)
    x[32:] = torch.relu(x[32:])
    k = 1 + torch.rand(64, generator=generator) * 63
    for tau in (1e-4, 1e-2, 1.0):
        weights, _, fallback = lapsum._solve(x, k, torch.tensor(tau), "auto", 16)
        assert fallback.numel() == 0
        assert torch.allclose(weights, lapsum._solve(x, k, torch.tensor(tau), "sort", 16)[0], rtol=0, atol=1e-6)


def test_shapes() -> None:
    x = torch.randn(2, 3, 30, generator=torch.Generator().manual_seed(9))
    k = torch.rand(2, 3) * 10
    p = soft_topk(x, k, 0.5)
    assert p.shape == x.shape
    assert torch.allclose(p.sum(-1), k, atol=1e-5)
    transposed = x.transpose(0, 1)  # non-contiguous
    assert torch.allclose(soft_topk(transposed, k.T, 0.5), p.transpose(0, 1), atol=1e-6)
    single = soft_topk(x[0, 0], torch.tensor(4.0), 0.5)
    assert single.shape == (30,) and abs(float(single.sum()) - 4) < 1e-5
    assert soft_topk(torch.empty(0, 30), 3.0, 0.5).shape == (0, 30)


def test_invalid_arguments() -> None:
    x = torch.randn(3, 10)
    for bad_tau in (0.0, -1.5, torch.tensor(0.0), float("nan")):
        with pytest.raises(ValueError, match=r"tau.*(0\.0|-1\.5|nan)"):
            soft_topk(x, 2.0, bad_tau)
    with pytest.raises(ValueError, match=r"\(3,\).*\(3, 1\)"):
        soft_topk(x, torch.ones(3, 1), 1.0)
    with pytest.raises(ValueError, match="method"):
        soft_topk(x, 2.0, 1.0, method="bisect")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu() -> None:
    x = torch.randn(8, 5000, generator=torch.Generator().manual_seed(10))
    k = torch.rand(8, generator=torch.Generator().manual_seed(11)) * 50
    for method in ("sort", "topk"):
        on_gpu = soft_topk(x.cuda(), k.cuda(), 1e-3, method=method).cpu()
        assert torch.allclose(on_gpu, soft_topk(x, k, 1e-3, method=method), rtol=0, atol=1e-5)


@settings(max_examples=40, deadline=None)
@given(
    values=st.lists(st.floats(-100, 100, allow_nan=False, width=64), min_size=2, max_size=40),
    k_fraction=st.floats(0.01, 0.99),
    tau=st.floats(1e-3, 10),
    margin=st.integers(0, 5),
)
def test_property_matches_reference(values: list[float], k_fraction: float, tau: float, margin: int) -> None:
    x = torch.tensor([values], dtype=torch.float64)
    k = k_fraction * len(values)
    expected = reference_soft_topk(x, k, tau)
    for method in ("sort", "topk"):
        p = soft_topk(x, k, tau, method=method, margin=margin)
        assert torch.allclose(p, expected, rtol=0, atol=reference_tolerance(x, tau))
        assert abs(float(p.sum()) - k) < 1e-10 * max(k, 1)
