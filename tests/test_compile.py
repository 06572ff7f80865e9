"""The training step under torch.compile (issue 21): no graph break in any phase, and the compiled step (SAE-Lens'
compile_sae) computes what the eager step does."""

import pytest
import torch
from sae_lens.saes.sae import TrainStepInput

from softsae_plugin import SoftTrainingSAE, SoftTrainingSAEConfig

D_IN, D_SAE, BATCH = 16, 256, 32
# Steps of a 100-step run with the dead-latent masks they are traced with: b_dec's initialisation, the anneals, the
# final tau, the hard phase's freeze, the hard phase (each trace costs seconds: a few cover every branch).
PHASES = {
    "constraint": ((0, None), (1, "some"), (50, "none"), (85, None), (86, "some")),
    "softplus": ((1, "some"),),
}


def make_sae(control: str) -> SoftTrainingSAE:
    torch.manual_seed(0)
    cfg = SoftTrainingSAEConfig(
        d_in=D_IN, d_sae=D_SAE, k=4, total_training_steps=100, hard_topk_steps=20, sparsity_control=control,
        sparse_decode=True,
    )  # fmt: skip
    return SoftTrainingSAE(cfg)


def step_input(x: torch.Tensor, step: int, dead: torch.Tensor | None) -> TrainStepInput:
    return TrainStepInput(
        sae_in=x, coefficients={}, dead_neuron_mask=dead, n_training_steps=step, is_logging_step=False
    )


def dead_mask(which: str | None) -> torch.Tensor | None:
    masks = {"none": torch.zeros(D_SAE, dtype=torch.bool), "some": torch.arange(D_SAE) % 3 == 0}
    return None if which is None else masks[which]


@pytest.mark.parametrize("control", list(PHASES))
def test_the_training_step_traces_without_a_graph_break_in_every_phase(control):
    sae = make_sae(control)
    x = torch.randn(BATCH, D_IN)
    for step, dead in PHASES[control]:
        torch._dynamo.reset()
        explanation = torch._dynamo.explain(sae.training_forward_pass)(step_input(x, step, dead_mask(dead)))
        reasons = [reason.reason for reason in explanation.break_reasons]
        assert explanation.graph_break_count == 0 and explanation.graph_count == 1, (step, dead, reasons)
        sae.training_forward_pass(step_input(x, step, None))  # the eager step: the state moves on as in training


def test_the_compiled_step_computes_the_eager_steps_losses_and_state():
    """SAE-Lens' compile_sae replaces training_forward_pass by its torch.compile'd version; aot_eager traces forward
    and backward as inductor would, without generating code (seconds on CPU)."""
    eager, compiled = make_sae("constraint"), make_sae("constraint")
    compiled.training_forward_pass = torch.compile(compiled.training_forward_pass, backend="aot_eager")
    x = torch.randn(BATCH, D_IN) + 0.5
    dead = dead_mask("some")
    for sae in (eager, compiled):  # b_dec's initialisation (traced above), eagerly: its 100 iterations trace slowly
        type(sae).training_forward_pass(sae, step_input(x, 0, dead))
    for step in (50, 86):
        out_eager = eager.training_forward_pass(step_input(x, step, dead))
        out_compiled = compiled.training_forward_pass(step_input(x, step, dead))
        for name, loss in out_eager.losses.items():
            torch.testing.assert_close(out_compiled.losses[name], loss, rtol=1e-5, atol=1e-5, msg=name)
        out_eager.loss.backward()
        out_compiled.loss.backward()
        torch.testing.assert_close(compiled.W_enc.grad, eager.W_enc.grad, rtol=1e-4, atol=1e-6)
        for sae in (eager, compiled):
            sae.zero_grad()
    for name, tensor in eager.state_dict().items():
        torch.testing.assert_close(compiled.state_dict()[name], tensor, rtol=1e-5, atol=1e-6, msg=name)
