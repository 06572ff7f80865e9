"""The sync-free training step (issue 21): the controller's Newton solve and the exact hard-phase calibration against
float64 bisection references, training state moved only by training steps with gradients (issue 24), and the static
bounds that replace reads from the device."""

import pytest
import torch
from sae_lens.saes.sae import TrainStepInput

from softsae_plugin import SoftSAE, SoftSAEConfig, SoftTrainingSAE, SoftTrainingSAEConfig, soft_topk, softsae
from softsae_plugin.sparsity_control import (
    BOUNDARY_MARGIN,
    SHIFT_RANGE,
    calibrated_offset,
    constraint_shift,
    hard_counts,
    k_from_logit,
)

D_IN, D_SAE = 16, 128


def smallest_shift_reaching(mean_at, target: float) -> float:
    """The smallest shift in [-SHIFT_RANGE, SHIFT_RANGE] with mean_at(shift) >= target, by 200 float64 halvings."""
    low, high = -SHIFT_RANGE, SHIFT_RANGE
    for _ in range(200):
        middle = (low + high) / 2
        low, high = (middle, high) if mean_at(middle) < target else (low, middle)
    return high


@pytest.mark.parametrize("spread", [0.0, 1.0, 3.0])
@pytest.mark.parametrize("fraction", [0.02, 0.5, 0.98])
def test_constraint_shift_matches_a_float64_bisection(spread, fraction):
    """float32 logits of several spreads, the root up to 2 away from the start: the shift to float32 rounding."""
    k_max, d_sae = 64, 4096
    gen = torch.Generator().manual_seed(int(10 * spread + 100 * fraction))
    logits = torch.randn(1024, generator=gen) * spread + 2 * (fraction - 0.5)
    target = 1 + (k_max - 1) * fraction
    z = logits.double()
    expected = smallest_shift_reaching(lambda s: k_from_logit(z + s, k_max, d_sae).mean().item(), target)
    shift = constraint_shift(logits, target, k_max, d_sae)
    assert shift.dtype == torch.float32
    assert shift.item() == pytest.approx(expected, abs=5e-5)
    assert k_from_logit(logits + shift, k_max, d_sae).mean().item() == pytest.approx(target, rel=1e-5)


def test_constraint_shift_at_an_unreachable_target_saturates_every_k_hat():
    # Step 0's target is k_max itself, which mean(k_max * sigmoid) reaches only in floating point.
    shift = constraint_shift(torch.zeros(64), 32.0, 32, 256)
    torch.testing.assert_close(k_from_logit(torch.zeros(64) + shift, 32, 256), torch.full((64,), 32.0))


@pytest.mark.parametrize("k", [1.0, 3.0, 6.5, 11.0, 40.0])
def test_calibrated_offset_is_the_float64_bisections_edge(k):
    k_max, d_sae = 24, 256
    gen = torch.Generator().manual_seed(int(k * 10))
    logits = torch.randn(300, generator=gen, dtype=torch.float64) * 1.5
    n_positive = torch.randint(0, 30, (300,), generator=gen)

    def mean_at(s: float) -> float:
        return hard_counts(k_from_logit(logits + s, k_max, d_sae), n_positive, k_max).mean().item()

    expected = smallest_shift_reaching(mean_at, k) + BOUNDARY_MARGIN
    shift = calibrated_offset(logits, n_positive, k, k_max, d_sae)
    assert shift.item() == pytest.approx(expected, abs=1e-9)
    if -SHIFT_RANGE < expected - BOUNDARY_MARGIN < SHIFT_RANGE:
        assert mean_at(shift.item()) >= k > mean_at(shift.item() - 2 * BOUNDARY_MARGIN)


def make_sae(**overrides) -> SoftTrainingSAE:
    torch.manual_seed(0)
    cfg = dict(d_in=D_IN, d_sae=D_SAE, k=4, total_training_steps=100, hard_topk_steps=20)
    cfg.update(overrides)
    sae = SoftTrainingSAE(SoftTrainingSAEConfig(**cfg))
    with torch.no_grad():
        sae.w_k_out.normal_(0, 0.5)
    return sae


def step_input(x: torch.Tensor, step: int, dead: torch.Tensor | None = None) -> TrainStepInput:
    return TrainStepInput(
        sae_in=x, coefficients={}, dead_neuron_mask=dead, n_training_steps=step, is_logging_step=False
    )


def state(sae: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: t.detach().clone() for name, t in sae.state_dict().items()}


@pytest.mark.parametrize("control", ["constraint", "softplus"])
@pytest.mark.parametrize("step", [0, 1, 50, 85])
def test_a_no_grad_forward_pass_changes_no_state_and_computes_the_steps_loss(control, step):
    sae = make_sae(sparsity_control=control)
    x = torch.randn(64, D_IN) + 1
    if step:
        sae.training_forward_pass(step_input(x, 0))  # initialises b_dec
    before = state(sae)
    with torch.no_grad():
        validation = sae.training_forward_pass(step_input(x, step))
    after = state(sae)
    assert after.keys() == before.keys()
    for name in before:
        assert torch.equal(after[name], before[name]), name
    # The same call with gradients moves the training state (b_dec's initialisation, the running shift, the hard
    # phase's freeze) and, once b_dec is initialised, computes the same loss.
    training = sae.training_forward_pass(step_input(x, step))
    if step:
        torch.testing.assert_close(validation.loss, training.loss.detach())
    moved = [name for name, t in state(sae).items() if not torch.equal(t, before[name])]
    assert moved or (control == "softplus" and 0 < step < 80)


def test_eval_mode_changes_no_state_either():
    sae = make_sae()
    x = torch.randn(64, D_IN)
    sae.training_forward_pass(step_input(x, 0))
    before = state(sae)
    sae.eval()
    sae.training_forward_pass(step_input(x, 85))
    assert all(torch.equal(t, before[name]) for name, t in state(sae).items())
    assert not sae._k_head_frozen


def test_the_training_flags_follow_a_loaded_state_dict():
    sae = make_sae()
    x = torch.randn(64, D_IN)
    sae.training_forward_pass(step_input(x, 0))
    sae.training_forward_pass(step_input(x, 85))
    fresh = make_sae()
    assert not fresh._b_dec_initialised and not fresh._k_head_frozen
    fresh.load_state_dict(sae.state_dict())
    assert fresh._b_dec_initialised and fresh._k_head_frozen
    torch.testing.assert_close(fresh.k_head_centre(), sae.k_centre)


@pytest.mark.parametrize("step", [1, 50, 85])
def test_the_static_bounds_of_the_device_path_give_the_cpu_paths_step(step, monkeypatch):
    """On CPU the top-k selections read the batch's largest k; on a device they take k_max: the same step."""
    outputs = []
    for static in (False, True):
        monkeypatch.setattr(softsae, "STATIC_BOUNDS_ON_CPU", static)
        sae = make_sae()
        x = torch.randn(64, D_IN, generator=torch.Generator().manual_seed(1)) + 1
        sae.training_forward_pass(step_input(x, 0))
        outputs.append(sae.training_forward_pass(step_input(x, step)))
    torch.testing.assert_close(outputs[1].loss, outputs[0].loss)
    torch.testing.assert_close(outputs[1].feature_acts, outputs[0].feature_acts)


def test_decode_counts_codes_that_were_changed_after_encode():
    sae = SoftSAE(SoftSAEConfig(d_in=D_IN, d_sae=D_SAE, k=2, k_max=4, sparse_decode=True))
    x = torch.randn(8, D_IN)
    codes = sae.encode(x)
    dense = codes @ sae.W_dec + sae.b_dec
    torch.testing.assert_close(sae.decode(codes), dense)
    codes[:, :10] = 1.0  # steering in place: more than k_max non-zeros per row, which the decode must notice
    torch.testing.assert_close(sae.decode(codes), codes @ sae.W_dec + sae.b_dec)
    assert not sae._encoded_here(codes) and not sae._encoded_here(codes.clone())


@pytest.mark.parametrize("tau", [1e-3, 0.1, 10.0])
def test_soft_topk_with_a_static_bound_gives_the_full_solves_weights(tau):
    """ReLU-like rows, some with fewer positive scores than k (ties at 0 below the threshold), k up to the bound:
    the bound's 2 k_bound + margin candidates always hold the threshold (no rows re-solved), float64 reference."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(32, 512, generator=gen, dtype=torch.float64).relu()
    x[:8, 10:] = 0  # 10 positive scores, k up to 20
    x[8:12] = 1.0  # every score tied
    k = torch.rand(32, generator=gen, dtype=torch.float64) * 19 + 1
    k[:12] = 20
    torch.testing.assert_close(soft_topk(x, k, tau, k_bound=20, margin=0), soft_topk(x, k, tau, method="sort"))
    with pytest.raises(ValueError, match="k_bound must be > 0"):
        soft_topk(x, k, 0.01, k_bound=0)
    with pytest.raises(ValueError, match="tau must be > 0, got tau=-1"):
        soft_topk(x, k, -1.0, k_bound=20)


def test_encode_and_decode_work_under_inference_mode():
    """SAEBench's evals encode and decode under torch.inference_mode(), whose tensors have no version counter: the
    same codes and reconstruction as under no_grad."""
    torch.manual_seed(0)
    sae = SoftSAE(SoftSAEConfig(d_in=16, d_sae=256, k=4, dtype="float32", device="cpu"))
    x = torch.randn(32, 16)
    with torch.no_grad():
        codes = sae.encode(x)
        expected = sae.decode(codes)
    with torch.inference_mode():
        inference_codes = sae.encode(x)
        assert torch.equal(inference_codes, codes)
        assert torch.allclose(sae.decode(inference_codes), expected)
