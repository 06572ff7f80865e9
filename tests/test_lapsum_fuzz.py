"""Property-based fuzzing of the LapSum soft top-k over extreme inputs, in float32 and bfloat16.

Scores from zero and denormals to the float32 maximum, ties, constant rows, rows of zeros; k from near 0 to
near n; tau from 1e-6 to 1e3. Every output must be finite, in [0, 1], sum to k and be monotone in the scores.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from softsae_plugin.lapsum import soft_topk

HUGE = float(torch.finfo(torch.bfloat16).max)  # also a float32; the float32 maximum overflows bfloat16
EXTREMES = [0.0, -0.0, 1e-45, -1e-45, 1e-38, 1e-30, -1e-30, 1.0, -1.0, 1e30, -1e30, HUGE, -HUGE]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


pytestmark = pytest.mark.usefixtures("single_thread")


scores = st.one_of(
    st.floats(-HUGE, HUGE, width=32, allow_nan=False, allow_infinity=False),
    st.floats(-1e-3, 1e-3),
    st.sampled_from(EXTREMES),
)


@st.composite
def rows(draw: st.DrawFn) -> list[float]:
    """One row of scores: free, ties drawn from a few values, constant, or zeros."""
    n = draw(st.integers(2, 40))
    kind = draw(st.sampled_from(["free", "ties", "constant", "zeros"]))
    if kind == "free":
        return draw(st.lists(scores, min_size=n, max_size=n))
    if kind == "ties":
        return draw(st.lists(st.sampled_from(draw(st.lists(scores, min_size=1, max_size=3))), min_size=n, max_size=n))
    return [draw(scores) if kind == "constant" else 0.0] * n


@st.composite
def targets(draw: st.DrawFn, n: int) -> float:
    """k near 0, near n, at an integer, or anywhere in (0, n)."""
    small = 10 ** draw(st.floats(-6, -1))
    return draw(
        st.sampled_from([small, n - small, float(draw(st.integers(1, n - 1))), draw(st.floats(0.01, 0.99)) * n])
    )


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=st.data(),
    dtype=st.sampled_from(sorted(DTYPES)),
    log_tau=st.floats(-6, 3),
    method=st.sampled_from(["sort", "topk"]),
)
def test_soft_topk_extreme_inputs(data: st.DataObject, dtype: str, log_tau: float, method: str) -> None:
    batch = [data.draw(rows()) for _ in range(data.draw(st.integers(1, 3)))]
    n = min(len(row) for row in batch)
    x = torch.tensor([row[:n] for row in batch], dtype=DTYPES[dtype], requires_grad=True)
    k = torch.tensor([data.draw(targets(n)) for _ in batch], dtype=torch.float32, requires_grad=True)
    tau = 10**log_tau
    weights = soft_topk(x, k, tau, method=method, margin=data.draw(st.integers(0, 4)))
    (weights.float() * torch.linspace(-1, 1, n)).sum().backward()
    assert bool(torch.isfinite(x.grad).all()) and bool(torch.isfinite(k.grad).all()), (x.grad, k.grad)
    p, x, k = weights.detach().double(), x.detach(), k.detach()

    assert bool(torch.isfinite(p).all()), p
    assert bool(((p >= 0) & (p <= 1)).all()), p
    # bfloat16 outputs are rounded to 8 bits: each weight is off by up to 2^-9 of itself.
    tolerance = 1e-5 * n + (2**-8 * k.double() if dtype == "bfloat16" else 0)
    assert bool(((p.sum(-1) - k.double()).abs() <= tolerance).all()), (p.sum(-1), k)
    # Monotone: sorting by score sorts the weights; equal scores get equal weights.
    xs = x.double()
    order = xs.argsort(-1)
    sorted_x, sorted_p = xs.gather(-1, order), p.gather(-1, order)
    assert bool((sorted_p.diff(dim=-1) >= 0).all()), (sorted_x, sorted_p)
    assert bool((sorted_p.diff(dim=-1)[sorted_x.diff(dim=-1) == 0] == 0).all()), (sorted_x, sorted_p)


@settings(max_examples=60, deadline=None)
@given(
    value=scores,
    n=st.integers(2, 64),
    k_fraction=st.floats(1e-6, 1 - 1e-6),
    log_tau=st.floats(-6, 3),
    dtype=st.sampled_from(sorted(DTYPES)),
)
def test_constant_rows_share_k_equally(value: float, n: int, k_fraction: float, log_tau: float, dtype: str) -> None:
    x = torch.full((1, n), value, dtype=DTYPES[dtype])
    k = k_fraction * n
    p = soft_topk(x, k, 10**log_tau).double()
    expected = torch.tensor(float(torch.tensor(k, dtype=torch.float32)) / n, dtype=DTYPES[dtype]).double()
    assert torch.allclose(p, expected.expand_as(p), rtol=2**-7 if dtype == "bfloat16" else 1e-5, atol=0), (p, k)
    assert math.isfinite(float(p.sum()))


@pytest.mark.parametrize("dtype", sorted(DTYPES))
def test_regression_huge_scaled_scores_stay_finite(dtype: str) -> None:
    """Found by the fuzzing above: (x - anchor) / tau near or past the float32 maximum gave NaN or a wrong sum."""
    for row, tau in (([0.0, 3.397e33], 1e-5), ([HUGE, -HUGE], 1e-6), ([1e30, -1e30, 0.0], 1e-6)):
        x = torch.tensor([row], dtype=DTYPES[dtype])
        for k in (0.1, 1.25, len(row) - 0.5):
            p = soft_topk(x, k, tau).double()
            assert bool(torch.isfinite(p).all()), (row, k, p)
            assert float(p.sum()) == pytest.approx(k, abs=1e-3 * k), (row, k, p)
