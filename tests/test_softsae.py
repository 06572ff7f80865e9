"""The SoftSAE model: configs, per-input top-k, phases, schedules, folding, save/load."""

import pytest
import torch
from sae_lens import SAE, TrainingSAE
from sae_lens.saes.sae import TrainStepInput

from softsae_plugin import SoftSAE, SoftTrainingSAE, SoftTrainingSAEConfig
from softsae_plugin.softsae import geometric_median, hard_topk_per_row

D_IN, D_SAE = 16, 64


def make_sae(**overrides) -> SoftTrainingSAE:
    torch.manual_seed(0)
    cfg = dict(d_in=D_IN, d_sae=D_SAE, k=4, total_training_steps=100, hard_topk_steps=20)
    cfg.update(overrides)
    return SoftTrainingSAE(SoftTrainingSAEConfig(**cfg))


def step_input(x: torch.Tensor, step: int) -> TrainStepInput:
    return TrainStepInput(
        sae_in=x, coefficients={}, dead_neuron_mask=None, n_training_steps=step, is_logging_step=False
    )


def randomise_k_head(sae: SoftTrainingSAE) -> None:
    # A fresh k head predicts k_max / 2 for every input; give it spread so per-row k differs.
    with torch.no_grad():
        sae.w_k_out.normal_(0, 0.5)


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        (dict(k=10, k_max=5), "k_max"),
        (dict(k=4, k_max=65), "d_sae"),
        (dict(k=0.5), "k="),
        (dict(tau=0.0), "tau="),
        (dict(tau=-1.0), "tau="),
        (dict(hard_topk_steps=200), "hard_topk_steps=200"),
        (dict(sparsity_beta=0.0), "sparsity_beta"),
        (dict(normalize_activations="layer_norm"), "normalize_activations"),
        (dict(k_head_hidden=0), "k_head_hidden=0"),
    ],
)
def test_config_rejects_bad_values_by_name(overrides, field):
    with pytest.raises(ValueError, match=field):
        make_sae(**overrides)


def test_k_max_defaults_to_twice_k():
    assert SoftTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=5).k_max == 10


@pytest.mark.parametrize("shape", [(32, D_IN), (4, 8, D_IN)])
def test_encode_keeps_round_k_hat_per_input(shape):
    sae = make_sae()
    randomise_k_head(sae)
    # A large positive b_enc makes every pre-activation positive, so the L0 must equal round(k_hat) exactly.
    with torch.no_grad():
        sae.b_enc.fill_(10.0)
    x = torch.randn(shape)
    k_hat = sae.predict_k(x)
    assert k_hat.shape == shape[:-1]
    expected = k_hat.round().clamp(1, sae.cfg.k_max)
    assert expected.unique().numel() > 1, "the test needs inputs with different k"
    codes = sae.encode(x)
    assert codes.shape == (*shape[:-1], D_SAE)
    assert torch.equal((codes != 0).sum(-1).float(), expected)
    # The kept entries are each row's largest pre-activations, unscaled.
    hidden = torch.relu(sae.process_sae_in(x) @ sae.W_enc + sae.b_enc)
    kept_min = torch.where(codes != 0, codes, torch.inf).min(-1).values
    dropped_max = torch.where(codes == 0, hidden, -torch.inf).max(-1).values
    assert (kept_min >= dropped_max).all()
    assert torch.allclose(codes[codes != 0], hidden[codes != 0])


def test_hard_topk_keeps_fewer_only_when_fewer_are_positive():
    acts = torch.tensor([[3.0, 0.0, 0.0, 1.0], [1.0, 2.0, 3.0, 4.0]])
    codes = hard_topk_per_row(acts, torch.tensor([3, 2]))
    assert torch.equal(codes, torch.tensor([[3.0, 0.0, 0.0, 1.0], [0.0, 0.0, 3.0, 4.0]]))


def test_hook_points_fire_on_encode():
    sae = make_sae()
    _, cache = sae.run_with_cache(torch.randn(5, D_IN))
    for name in ("hook_sae_input", "hook_sae_acts_pre", "hook_sae_acts_post", "hook_sae_recons", "hook_sae_output"):
        assert name in cache


def test_schedules_are_linear_then_constant():
    cfg = SoftTrainingSAEConfig(
        d_in=D_IN, d_sae=D_SAE, k=4, k_max=12, tau=0.01, tau_start=0.1, tau_anneal_steps=10,
        k_anneal_steps=20, hard_topk_steps=30, total_training_steps=100,
    )  # fmt: skip
    assert cfg.schedule(0).tau == pytest.approx(0.1)
    assert cfg.schedule(5).tau == pytest.approx(0.055)
    assert cfg.schedule(10).tau == pytest.approx(0.01)
    assert cfg.schedule(0).target_k == pytest.approx(12)
    assert cfg.schedule(10).target_k == pytest.approx(8)
    assert cfg.schedule(50).target_k == pytest.approx(4)
    assert [cfg.schedule(s).hard for s in (0, 69, 70, 99)] == [False, False, True, True]


def test_schedule_needs_the_run_length():
    cfg = SoftTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=4)
    with pytest.raises(ValueError, match="total_training_steps"):
        cfg.schedule(0)


def test_soft_phase_trains_k_head_and_counts_hard_code():
    sae = make_sae()
    randomise_k_head(sae)
    x = torch.randn(64, D_IN)
    out = sae.training_forward_pass(step_input(x, 0))
    # SAE-Lens' trainer counts firing from feature_acts: it must be the hard top-round(k_hat) code.
    expected_l0 = sae.predict_k(x).round().clamp(1, sae.cfg.k_max)
    assert ((out.feature_acts != 0).sum(-1).float() <= expected_l0).all()
    assert out.losses["sparsity_loss"] > 0
    out.loss.backward()
    assert sae.W_k_in.grad is not None and sae.W_k_in.grad.abs().sum() > 0
    assert sae.w_k_out.grad.abs().sum() > 0


def test_hard_phase_freezes_k_head_and_its_centre_while_encoder_learns():
    sae = make_sae(hard_topk_steps=20)
    randomise_k_head(sae)
    optimizer = torch.optim.Adam(sae.parameters(), lr=1e-2)
    x = torch.randn(64, D_IN) + 1.0
    k_head_before = [p.detach().clone() for p in (sae.W_k_in, sae.b_k_in, sae.w_k_out, sae.b_k_out)]
    out = sae.training_forward_pass(step_input(x, 80))
    assert bool(sae.k_head_frozen)
    assert torch.equal(sae.k_centre, sae.b_dec.detach())
    k_hat_at_freeze = sae.predict_k(x).detach()
    assert torch.equal((out.feature_acts != 0).sum(-1).float(), k_hat_at_freeze.round().clamp(1, sae.cfg.k_max))
    W_enc_before, b_dec_before = sae.W_enc.detach().clone(), sae.b_dec.detach().clone()
    for step in range(80, 85):
        out = sae.training_forward_pass(step_input(x, step))
        out.loss.backward()
        assert sae.W_k_in.grad is None
        optimizer.step()
        optimizer.zero_grad()
    assert not torch.equal(sae.W_enc, W_enc_before), "the encoder keeps learning in the hard phase"
    assert not torch.equal(sae.b_dec, b_dec_before), "b_dec keeps learning in the hard phase"
    for before, p in zip(k_head_before, (sae.W_k_in, sae.b_k_in, sae.w_k_out, sae.b_k_out), strict=True):
        assert torch.equal(before, p)
    # The k head reads the snapshot of b_dec, so k_hat does not drift while b_dec moves.
    assert torch.equal(sae.predict_k(x), k_hat_at_freeze)


def test_decoder_rows_stay_unit_norm_under_an_optimizer():
    sae = make_sae()
    optimizer = torch.optim.Adam(sae.parameters(), lr=1e-2)
    x = torch.randn(64, D_IN)
    for step in range(5):
        sae.training_forward_pass(step_input(x, step)).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert torch.allclose(sae.W_dec.norm(dim=-1), torch.ones(D_SAE), atol=1e-6)


def test_b_dec_starts_at_the_geometric_median_of_the_first_batch():
    sae = make_sae()
    x = torch.randn(128, D_IN) * 2 + 3
    sae.training_forward_pass(step_input(x, 0))
    median = sae.b_dec.detach().double()
    # At the geometric median, the unit vectors to the points sum to zero.
    directions = (x.double() - median) / (x.double() - median).norm(dim=-1, keepdim=True)
    assert directions.sum(0).norm() < 1e-3 * x.shape[0]
    assert torch.allclose(geometric_median(x.double()), median, atol=1e-4)


def test_folding_the_normalisation_keeps_codes_and_k_hat_on_raw_inputs():
    sae = make_sae()
    randomise_k_head(sae)
    with torch.no_grad():
        sae.b_dec.normal_()
    sae._freeze_k_head()
    raw = torch.randn(50, D_IN) * 7
    scale = 0.3
    k_before, codes_before, out_before = sae.predict_k(raw * scale), sae.encode(raw * scale), sae(raw * scale)
    sae.fold_activation_norm_scaling_factor(scale)
    assert torch.allclose(sae.predict_k(raw), k_before, atol=1e-5)
    assert torch.allclose(sae.encode(raw), codes_before, atol=1e-4)
    assert torch.allclose(sae(raw), out_before / scale, atol=1e-4)


def test_fold_W_dec_norm_is_refused():
    with pytest.raises(NotImplementedError, match="top-k"):
        make_sae().fold_W_dec_norm()


@pytest.mark.parametrize(("frozen", "k_head_hidden"), [(False, None), (True, None), (True, 8)])
def test_saved_inference_model_loads_as_softsae_and_encodes_identically(tmp_path, frozen, k_head_hidden):
    sae = make_sae(k_head_hidden=k_head_hidden)
    randomise_k_head(sae)
    with torch.no_grad():
        sae.b_dec.normal_()
    if frozen:
        sae._freeze_k_head()
        with torch.no_grad():
            sae.b_dec.add_(1.0)  # b_dec moved on after the freeze: the k head must keep its snapshot
    sae.save_inference_model(tmp_path)
    loaded = SAE.load_from_disk(tmp_path)
    assert isinstance(loaded, SoftSAE)
    x = torch.randn(40, D_IN)
    assert torch.equal(loaded.predict_k(x), sae.predict_k(x))
    assert torch.equal(loaded.encode(x), sae.encode(x))
    assert torch.allclose(loaded(x), sae(x))


def test_training_checkpoint_round_trip_keeps_phase_state(tmp_path):
    sae = make_sae()
    sae.training_forward_pass(step_input(torch.randn(32, D_IN), 0))
    sae._freeze_k_head()
    sae.save_model(tmp_path)
    loaded = TrainingSAE.load_from_disk(tmp_path)
    assert isinstance(loaded, SoftTrainingSAE)
    assert bool(loaded.b_dec_initialised) and bool(loaded.k_head_frozen)
    assert not loaded.W_k_in.requires_grad
    assert torch.equal(loaded.k_centre, sae.k_centre)


def test_wrong_input_width_is_a_clear_error():
    sae = make_sae()
    with pytest.raises(ValueError, match=r"d_in=16.*\(3, 5\)"):
        sae.encode(torch.randn(3, 5))
