"""soft_topk(fused=True): the fast path's big passes as torch.compile'd loops give the unfused results."""

from __future__ import annotations

import pytest
import torch

from softsae_plugin import SoftTrainingSAEConfig, lapsum
from softsae_plugin.lapsum import soft_topk
from softsae_plugin.softsae import FUSE_MIN_SCORES, _fuse_soft_topk


def rows(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows that exercise every branch: typical, ReLU-like with exact zeros among the candidates, ties that force
    the full-sort fallback, and the domain ends."""
    n = 1000
    gen = torch.Generator().manual_seed(3)
    typical = torch.randn(n, generator=gen, dtype=torch.float64)
    few_positive = torch.zeros(n, dtype=torch.float64)
    few_positive[:20] = torch.rand(20, generator=gen, dtype=torch.float64) + 0.5  # lowest candidates are zeros
    ties = torch.zeros(n, dtype=torch.float64)
    ties[torch.randperm(n, generator=gen)[:100]] = 1.0  # threshold below the candidates: falls back
    x = torch.stack([typical, torch.relu(typical), few_positive, few_positive, ties, typical, typical])
    k = torch.tensor([10.0, 30.0, 10.0, 24.5, 60.0, 0.0, float(n)], dtype=torch.float64)
    return x.to(dtype), k.to(dtype)


@pytest.fixture
def fresh_fusion(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lapsum, "_COMPILED", {})
    monkeypatch.setattr(lapsum, "_FUSION_FAILED", False)


def both_ways(x: torch.Tensor, k: torch.Tensor, tau: float, grad_tau: bool) -> list[list[torch.Tensor]]:
    out = []
    upstream = torch.randn(x.shape, generator=torch.Generator().manual_seed(4), dtype=x.dtype)
    for fused in (False, True):
        xs, ks = x.clone().requires_grad_(), k.clone().requires_grad_()
        taus = torch.tensor(tau, dtype=x.dtype, requires_grad=grad_tau)
        p = soft_topk(xs, ks, taus, method="topk", margin=4, fused=fused)
        (p * upstream).sum().backward()
        out.append([p.detach(), xs.grad, ks.grad] + ([taus.grad] if grad_tau else []))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_fused_matches_unfused(fresh_fusion: None, dtype: torch.dtype) -> None:
    x, k = rows(dtype)
    _, _, fallback = lapsum._solve(x, k, torch.tensor(1e-3, dtype=dtype), "topk", 4, True)
    assert fallback.tolist() == [4]
    atol = 1e-12 if dtype == torch.float64 else 2e-5
    for tau, grad_tau in ((1e-3, False), (0.3, False), (0.3, True)):
        unfused, fused = both_ways(x, k, tau, grad_tau)
        for name, a, b in zip(("p", "dx", "dk", "dtau"), unfused, fused, strict=False):
            scale = max(1.0, float(a.abs().max()))
            assert torch.allclose(a, b, rtol=0, atol=atol * scale), (name, tau, float((a - b).abs().max()))
    assert not lapsum._FUSION_FAILED


def test_failed_compilation_falls_back_with_a_warning(fresh_fusion: None, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(fn: object, **kwargs: object) -> object:
        def run(*args: object) -> object:
            raise RuntimeError("no compiler here")

        return run

    monkeypatch.setattr(torch, "compile", broken)
    x, k = rows(torch.float64)
    with pytest.warns(RuntimeWarning, match="no compiler here"):
        fused = soft_topk(x, k, 1e-2, fused=True, margin=4)
    assert lapsum._FUSION_FAILED
    assert torch.allclose(fused, soft_topk(x, k, 1e-2, margin=4), rtol=0, atol=1e-12)


def test_softsae_fuses_only_runs_long_enough_to_repay_compiling() -> None:
    scores = torch.zeros(1024, 4096)
    short = SoftTrainingSAEConfig(d_in=512, d_sae=4096, k=60, total_training_steps=400)
    long = SoftTrainingSAEConfig(d_in=512, d_sae=4096, k=60, total_training_steps=40_000)
    assert 400 * scores.numel() < FUSE_MIN_SCORES <= 40_000 * scores.numel()
    assert not _fuse_soft_topk(short, scores)
    assert _fuse_soft_topk(long, scores)
    forced = SoftTrainingSAEConfig(d_in=512, d_sae=4096, k=60, total_training_steps=400, fuse_soft_topk=True)
    assert _fuse_soft_topk(forced, scores)
    off = SoftTrainingSAEConfig(d_in=512, d_sae=4096, k=60, total_training_steps=40_000, fuse_soft_topk=False)
    assert not _fuse_soft_topk(off, scores)
