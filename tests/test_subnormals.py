"""No subnormal floats in soft top-k or a SoftSAE training step: subnormal arithmetic is many times slower on CPUs,
and tiny soft weights times small gradients used to produce them in bulk early in the soft phase.

Checked on every tensor of at least a row of scores (the soft top-k) or a weight matrix (the step): the solve's own
per-row work on its k + margin candidates can hold a few log-sums of 1 + e^-100 (subnormal: zero to float32's
precision), which cost nothing."""

import collections

import pytest
import torch
from sae_lens.config import LoggingConfig, SAETrainerConfig
from sae_lens.training.sae_trainer import SAETrainer
from torch.utils._python_dispatch import TorchDispatchMode

from softsae_plugin import SoftTrainingSAE, SoftTrainingSAEConfig, soft_topk

TAUS = [0.05, 0.0275, 0.005, 1e-3, 1e-4]
TINY = torch.finfo(torch.float32).tiny


class CountSubnormals(TorchDispatchMode):
    """Counts, per operator, the subnormal values in the outputs of at least `min_numel` values of every operator
    that runs inside the block."""

    def __init__(self, min_numel: int) -> None:
        super().__init__()
        self.min_numel = min_numel
        self.counts: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(tensor, torch.Tensor) and tensor.dtype == torch.float32 and tensor.numel() >= self.min_numel:
                n = int(((tensor != 0) & (tensor.abs() < TINY)).sum())
                if n:
                    self.counts[str(func)] += n
        return out


@pytest.mark.parametrize("tau", TAUS)
@pytest.mark.parametrize("fused", [False, True])
def test_soft_topk_with_its_product_makes_no_subnormals(tau, fused):
    gen = torch.Generator().manual_seed(0)
    codes = torch.relu(torch.randn(64, 4096, generator=gen)).requires_grad_()
    k = torch.full((64,), 40.0, requires_grad=True)
    with CountSubnormals(min_numel=4096) as counter:
        weighted = codes * soft_topk(codes.detach(), k, tau, fused=fused)
        weighted.backward(torch.randn(64, 4096, generator=gen) * 1e-4)
    assert not counter.counts, dict(counter.counts)


@pytest.mark.parametrize("tau", TAUS)
def test_a_training_step_makes_no_subnormals(single_thread, tau):
    """SAE-Lens' own trainer step (forward, backward, gradient clipping, Adam) a few steps into the soft phase."""
    torch.manual_seed(0)
    cfg = SoftTrainingSAEConfig(d_in=64, d_sae=1024, k=16, tau=tau, tau_start=None, total_training_steps=1000)
    sae = SoftTrainingSAE(cfg)
    trainer_cfg = SAETrainerConfig(total_training_samples=1000 * 256, train_batch_size_samples=256, lr=3e-4,
                                   lr_end=3e-4, logger=LoggingConfig(log_to_wandb=False))  # fmt: skip
    trainer = SAETrainer(cfg=trainer_cfg, sae=sae, data_provider=iter(()))
    x = torch.randn(256, 64, generator=torch.Generator().manual_seed(1))
    for step in range(5):
        trainer.n_training_steps = step
        trainer._train_step(sae, x)
    with CountSubnormals(min_numel=64 * 1024) as counter:
        trainer.n_training_steps = 5
        trainer._train_step(sae, x)
    assert not counter.counts, dict(counter.counts)
