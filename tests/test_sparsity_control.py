"""Sparsity control: the soft phase's constraint on mean k_hat, the hard phase's L0 calibration, and what they do."""

import sys
from pathlib import Path

import pytest
import torch

from softsae_plugin import SoftTrainingSAEConfig, train_on_activations
from softsae_plugin.sparsity_control import calibrated_offset, constrained_k, hard_counts, k_from_logit
from softsae_plugin.training.summary import summarise

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "eval"))
from lab.activations import synthetic_activations

K_MAX, D_SAE = 24, 256


def logits(n: int = 200, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 2


@pytest.mark.parametrize("target", [1.5, 7.0, 12.0, 23.0])
def test_constrained_k_holds_the_batch_mean_at_the_target(target):
    k_hat = constrained_k(logits(), target, K_MAX, D_SAE)
    assert k_hat.mean().item() == pytest.approx(target, abs=1e-9)
    assert k_hat.min() >= 1 and k_hat.max() <= K_MAX
    # A common offset of the logits changes nothing: the shift absorbs it.
    torch.testing.assert_close(constrained_k(logits() + 3.7, target, K_MAX, D_SAE), k_hat)


def test_constrained_k_gradient_is_the_implicit_derivative():
    """float64 finite differences of L(k_hat(z)), each evaluation re-solving the shift, against the backward."""
    z = logits(40).requires_grad_()
    weights = torch.randn(40, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    assert torch.autograd.gradcheck(lambda t: (weights * constrained_k(t, 9.0, K_MAX, D_SAE) ** 2).sum(), (z,))


def test_constrained_k_gives_a_common_offset_no_gradient_and_reports_the_multiplier():
    z = logits().requires_grad_()
    recorded = {}
    k_hat = constrained_k(z, 8.0, K_MAX, D_SAE, lambda **kw: recorded.update(kw))
    grad_out = torch.randn_like(k_hat)
    (grad_z,) = torch.autograd.grad(k_hat, z, grad_out)
    # Shifting every logit alike changes no k_hat, so the k head's output bias has nothing to learn.
    assert grad_z.sum().abs() < 1e-12 * grad_z.abs().sum()
    slope = (k_from_logit(z.detach() + recorded["shift"] + 1e-7, K_MAX, D_SAE) - k_hat.detach()) / 1e-7
    # The multiplier is minus the batch size times the slope-weighted mean incoming gradient.
    expected = -(slope * grad_out).sum() / slope.sum() * len(z)
    assert recorded["multiplier"].item() == pytest.approx(expected.item(), rel=1e-4)


def test_calibrated_offset_makes_the_hard_count_reach_k():
    z = logits(500, seed=3)
    n_positive = torch.randint(0, 30, (500,), generator=torch.Generator().manual_seed(4))
    shift = calibrated_offset(z, n_positive, 6.0, K_MAX, D_SAE)
    mean_at = lambda s: hard_counts(k_from_logit(z + s, K_MAX, D_SAE), n_positive, K_MAX).mean()  # noqa: E731
    assert mean_at(shift + 1e-6) >= 6.0 > mean_at(shift - 1e-3)


def synthetic_run(k: int, normalise: bool, **overrides):
    x, _, _ = synthetic_activations(16384, 64, 256, 16, seed=1, normalise=normalise)
    cfg = SoftTrainingSAEConfig(d_in=64, d_sae=256, k=k, **overrides)
    sae = train_on_activations(x[:-2048], cfg, batch_size=512, training_steps=400, lr=1e-3, lr_warm_up_steps=20,
                               lr_decay_steps=100, seed=0, progress=False, dead_feature_window=100,
                               feature_sampling_window=100, n_batches_for_norm_estimate=10)  # fmt: skip
    return summarise(sae, [x[-2048:]])[0]


@pytest.mark.parametrize(("k", "normalise"), [(6, False), (12, True)])
def test_the_constraint_lands_held_out_l0_on_k(single_thread, k, normalise):
    summary = synthetic_run(k, normalise)
    assert summary["mean_l0"] == pytest.approx(k, rel=0.01)


def test_the_papers_softplus_budget_is_selectable_and_lands_below_k(single_thread):
    summary = synthetic_run(6, False, sparsity_control="softplus", calibrate_hard_l0=False)
    # The one-sided budget only pushes k_hat down: it settles about a feature below the target.
    assert summary["mean_l0"] < 0.95 * 6
