"""Unit-norm decoder rows under SAE-Lens' trainer, which never hands the SAE its optimizer.

The constraint (remove the radial part of W_dec's gradient before each step, renormalise the rows after it) runs
from global optimizer hooks that act only on optimizers holding the W_dec of an SAE registered here.
"""

from __future__ import annotations

import weakref
from typing import Any, Protocol

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook


class UnitDecoderSAE(Protocol):
    """What the hooks need of an SAE: its decoder."""

    W_dec: torch.nn.Parameter


_REGISTERED: weakref.WeakSet[Any] = weakref.WeakSet()
_HOOKS_INSTALLED = False


def keep_decoder_rows_unit(sae: UnitDecoderSAE) -> None:
    """Keep `sae.W_dec`'s rows on the unit sphere through every optimizer step that updates it (for its lifetime)."""
    global _HOOKS_INSTALLED
    _REGISTERED.add(sae)
    if not _HOOKS_INSTALLED:
        register_optimizer_step_pre_hook(_project_gradients)
        register_optimizer_step_post_hook(_renormalise_rows)
        _HOOKS_INSTALLED = True


def _saes_in(optimizer: torch.optim.Optimizer) -> list[UnitDecoderSAE]:
    params = {id(p) for group in optimizer.param_groups for p in group["params"]}
    return [sae for sae in list(_REGISTERED) if id(sae.W_dec) in params]


@torch.no_grad()
def remove_radial_gradient(W_dec: torch.nn.Parameter) -> None:
    """Remove the component of W_dec's gradient along each row (rows stay on the unit sphere)."""
    if W_dec.grad is not None:
        # grad -= (grad . w) w / |w|^2 per row, in three passes over W_dec and no temporary of its size.
        along = torch.linalg.vecdot(W_dec.grad, W_dec) / W_dec.norm(dim=-1).clamp_min(1e-12).square()
        W_dec.grad.addcmul_(W_dec, along.unsqueeze(-1), value=-1)


@torch.no_grad()
def normalise_rows(W_dec: torch.nn.Parameter) -> None:
    """Rescale every row of W_dec to unit norm."""
    W_dec.data /= W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def _project_gradients(optimizer: torch.optim.Optimizer, *_: Any) -> None:
    for sae in _saes_in(optimizer):
        remove_radial_gradient(sae.W_dec)


def _renormalise_rows(optimizer: torch.optim.Optimizer, *_: Any) -> None:
    for sae in _saes_in(optimizer):
        normalise_rows(sae.W_dec)
