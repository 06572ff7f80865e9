"""Mixed precision: SoftSAE trains under bfloat16 autocast on CPU, with the soft top-k solved in float32."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from sae_lens.saes.sae import TrainStepInput

from softsae_plugin import SoftTrainingSAEConfig, lapsum, train_on_activations
from softsae_plugin.softsae import SoftTrainingSAE

D_IN, D_SAE, K = 32, 256, 6


def synthetic_activations(n: int = 2048, seed: int = 0) -> torch.Tensor:
    """Positive mixes of a varying number (1..12) of ground-truth directions."""
    gen = torch.Generator().manual_seed(seed)
    directions = torch.nn.functional.normalize(torch.randn(128, D_IN, generator=gen), dim=-1)
    counts = torch.randint(1, 13, (n,), generator=gen)
    mask = torch.rand(n, 128, generator=gen).argsort(-1) < counts[:, None]
    return (mask * torch.rand(n, 128, generator=gen)) @ directions


@pytest.fixture
def solve_calls(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Record the dtypes the soft top-k solve receives and whether autocast was on around it."""
    calls: list[dict[str, Any]] = []
    solve = lapsum._solve

    def spy(x: torch.Tensor, k: torch.Tensor, tau: torch.Tensor, *args: Any) -> Any:
        weights, anchor, fallback = solve(x, k, tau, *args)
        calls.append(
            {
                "dtypes": {x.dtype, k.dtype, tau.dtype, weights.dtype},
                "autocast": torch.is_autocast_enabled("cpu"),
                "finite": bool(torch.isfinite(weights).all()),
            }
        )
        return weights, anchor, fallback

    monkeypatch.setattr(lapsum, "_solve", spy)
    return calls


def train(x: torch.Tensor, autocast: bool) -> SoftTrainingSAE:
    cfg = SoftTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=K)
    sae = train_on_activations(
        x, cfg, batch_size=128, training_steps=60, lr=2e-3, seed=1, progress=False, autocast=autocast,
        n_batches_for_norm_estimate=4,
    )  # fmt: skip
    assert isinstance(sae, SoftTrainingSAE)
    return sae


def fve(sae: SoftTrainingSAE, x: torch.Tensor) -> float:
    with torch.no_grad():
        x_hat = sae.decode(sae.encode(x))
    return float(1 - (x - x_hat).var(0).sum() / x.var(0).sum())


def test_train_on_activations_under_bf16_autocast(solve_calls: list[dict[str, Any]]) -> None:
    x = synthetic_activations()
    mixed = train(x, autocast=True)
    assert solve_calls, "the soft phase never ran"
    assert all(call["autocast"] for call in solve_calls)  # the solve really ran inside autocast...
    assert all(call["dtypes"] == {torch.float32} for call in solve_calls)  # ...and in float32 throughout
    assert all(call["finite"] for call in solve_calls)
    for name, value in mixed.state_dict().items():
        assert bool(torch.isfinite(value.float()).all()), name
        if value.is_floating_point():
            assert value.dtype == torch.float32, name  # autocast never changes the stored weights

    full = train(x, autocast=False)
    held_out = synthetic_activations(512, seed=5)
    assert fve(mixed, held_out) > 0.3
    assert abs(fve(mixed, held_out) - fve(full, held_out)) < 0.05
    k_mixed, k_full = mixed.predict_k(held_out).detach(), full.predict_k(held_out).detach()
    assert abs(float(k_mixed.mean() - k_full.mean())) < 0.1 * K


@pytest.mark.parametrize("step", [50, 99])  # soft phase, hard phase
def test_training_step_under_autocast_is_finite_and_k_hat_is_float32(step: int) -> None:
    torch.manual_seed(0)
    sae = SoftTrainingSAE(SoftTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=K, total_training_steps=100))
    x = synthetic_activations(256) * 8
    dead = torch.zeros(D_SAE, dtype=torch.bool)
    dead[:16] = True  # the auxiliary loss runs too
    with torch.autocast("cpu", dtype=torch.bfloat16):
        output = sae.training_forward_pass(TrainStepInput(x, {}, dead, step, False))
        k_hat = sae.predict_k(x)
    assert k_hat.dtype == torch.float32  # the k head's output layer runs in float32
    assert torch.allclose(k_hat, sae.predict_k(x), rtol=0.02)
    assert bool(torch.isfinite(output.loss)) and all(bool(torch.isfinite(v)) for v in output.losses.values())
    output.loss.backward()
    for name, param in sae.named_parameters():
        if param.grad is not None:
            assert bool(torch.isfinite(param.grad).all()), name
