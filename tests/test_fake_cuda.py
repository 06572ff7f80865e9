"""A device audit without a GPU (issue 21): SoftSAE's training step and inference on a faked accelerator.

Under torch's FakeTensorMode no data exists, only shapes, dtypes and devices: a CPU tensor meeting a device tensor
raises FakeTensorDeviceMismatchError, and any read of a value on the host (`bool(t)`, `.item()`, a data-dependent
size) raises DataDependentOutputException, so every line here is device-correct and free of host syncs.

The device is a stand-in, not "cuda": on a CPU-only build, fake "cuda" tensors can be created but not indexed
(Python indexing takes a CUDA device guard, which such a build lacks: "PyTorch is not linked with support for cuda
devices"), so PyTorch's Python-backend hooks register the PrivateUse1 device as "fakegpu" (with a device guard and
bf16 autocast), and the fake tensors live there. Construction runs on "meta" (SAE-Lens draws its initial weights
from the device's generator) and `to_empty` moves the SAE onto the fake device. Not covered here: bf16 autocast
(PyTorch registers no autocast kernels for a PrivateUse1 device; tests/test_autocast.py runs it on CPU and
eval/gpu_check.sh on CUDA), and the one-off reads at load time and in fold_W_dec_norm's shared-norm check.
"""

import pytest
import torch
from sae_lens.saes.sae import TrainStepInput
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils import backend_registration

from softsae_plugin import SoftSAE, SoftSAEConfig, SoftTrainingSAE, SoftTrainingSAEConfig, soft_topk
from softsae_plugin.unit_decoder import normalise_rows, remove_radial_gradient

DEVICE = "fakegpu"
D_IN, D_SAE, BATCH = 16, 256, 32


class _FakeGpuModule(backend_registration._DummyBackendModule):
    """What torch asks of a device module, autocast's supported dtypes included."""

    @staticmethod
    def get_amp_supported_dtype() -> list[torch.dtype]:
        return [torch.float16, torch.bfloat16]


# At collection, before any test runs a backward pass: the autograd engine sizes its per-device queues once, on the
# first backward in the process, from the devices registered by then.
if torch._C._get_privateuse1_backend_name() != DEVICE:
    backend_registration._setup_privateuseone_for_python_backend(DEVICE, backend_module=_FakeGpuModule())


@pytest.fixture
def device() -> str:
    return DEVICE


def on_fake_device(sae: torch.nn.Module, mode: FakeTensorMode) -> None:
    """Move an SAE built on "meta" onto the fake device, then let only fake tensors in."""
    mode.allow_non_fake_inputs = True
    with mode:
        sae.to_empty(device=DEVICE)
    sae.cfg.device = DEVICE
    mode.allow_non_fake_inputs = False


@pytest.mark.parametrize("control", ["constraint", "softplus"])
def test_training_steps_in_every_phase_run_on_the_device_without_a_sync(device, control):
    cfg = SoftTrainingSAEConfig(
        d_in=D_IN, d_sae=D_SAE, k=4, total_training_steps=100, hard_topk_steps=20, sparsity_control=control,
        sparse_decode=True, device="meta",
    )  # fmt: skip
    sae = SoftTrainingSAE(cfg)
    mode = FakeTensorMode()
    on_fake_device(sae, mode)
    with mode:
        optimizer = torch.optim.Adam(sae.parameters(), lr=1e-3, foreach=True)
        x = torch.empty(BATCH, D_IN, device=device)
        for step in (0, 1, 50, 85, 86):  # b_dec's initialisation, soft start, mid, the hard phase's freeze, hard
            out = sae.training_forward_pass(
                TrainStepInput(
                    sae_in=x, coefficients={}, dead_neuron_mask=None, n_training_steps=step, is_logging_step=False
                )
            )
            assert out.loss.device.type == device and out.feature_acts.device.type == device
            out.loss.backward()
            optimizer.step()  # with the unit-decoder hooks
            optimizer.zero_grad()
        assert sae._k_head_frozen and sae.W_dec.device.type == device and sae.b_k_out.device.type == device


def test_inference_and_the_unit_decoder_fold_run_on_the_device_without_a_sync(device):
    sae = SoftSAE(SoftSAEConfig(d_in=D_IN, d_sae=D_SAE, k=4, sparse_decode=True, device="meta"))
    mode = FakeTensorMode()
    on_fake_device(sae, mode)
    with mode:
        x = torch.empty(4, BATCH, D_IN, device=device)
        codes = sae.encode(x)
        assert codes.device.type == device and codes.shape == (4, BATCH, D_SAE)
        assert sae.decode(codes).device.type == device  # the sparse decode, from encode's own codes
        assert sae.predict_k(x).shape == (4, BATCH)
        sae.W_dec.grad = torch.empty_like(sae.W_dec)
        remove_radial_gradient(sae.W_dec)
        normalise_rows(sae.W_dec)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_soft_topk_forward_and_backward_run_on_the_device_without_a_sync(device, dtype):
    with FakeTensorMode():
        x = torch.empty(BATCH, D_SAE, device=device, dtype=dtype, requires_grad=True)
        k = torch.empty(BATCH, device=device, requires_grad=True)
        for method in ("auto", "sort"):  # with k_bound (the SAE's path): the candidates' fast path, the full sort
            weights = soft_topk(x, k, 0.01, method=method, k_bound=8)
            assert weights.device.type == device and weights.dtype == dtype
            weights.sum().backward()
        assert x.grad.device.type == device and k.grad.device.type == device
