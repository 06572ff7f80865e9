"""The four architectures every experiment compares: their names, one config for all, the model users load."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

import softsae_plugin  # noqa: F401  (registers softsae with SAE-Lens)

ARCHITECTURES = ("softsae", "topk", "batchtopk", "matryoshka_batchtopk")
LABELS = {"softsae": "SoftSAE", "topk": "TopK", "batchtopk": "BatchTopK", "matryoshka_batchtopk": "Matryoshka"}
COLOURS = dict(zip(ARCHITECTURES, ("tab:blue", "tab:orange", "tab:green", "tab:red"), strict=True))


def sae_config(architecture: str, d_in: int, d_sae: int, k: float, **overrides: Any) -> Any:
    """The training config of `architecture`, alike for all four: same normalisation, sizes and k."""
    from sae_lens.registry import SAE_TRAINING_CLASS_REGISTRY

    if architecture not in SAE_TRAINING_CLASS_REGISTRY:
        raise ValueError(f"architecture={architecture!r} is not registered; expected one of {ARCHITECTURES}")
    kwargs: dict[str, Any] = {
        "d_in": d_in,
        "d_sae": d_sae,
        "k": k,
        # Every architecture sees inputs scaled to mean norm sqrt(d_in), as SoftSAE does by default.
        "normalize_activations": "expected_average_only_in",
    }
    if architecture == "matryoshka_batchtopk":
        kwargs["matryoshka_widths"] = [d_sae // 16, d_sae // 4, d_sae]
    return SAE_TRAINING_CLASS_REGISTRY[architecture][1](**{**kwargs, **overrides})


def load_inference(training_sae: Any, folder: Path) -> Any:
    """Save the trained SAE as SAE-Lens' inference model (BatchTopK becomes JumpReLU) and load it back."""
    from sae_lens import SAE

    folder.mkdir(parents=True, exist_ok=True)
    training_sae.save_inference_model(str(folder))
    return SAE.load_from_disk(str(folder))


def k_hat_of(sae: Any, x: torch.Tensor) -> np.ndarray:
    """SoftSAE's predicted k_hat for each row of `x`."""
    with torch.no_grad():
        return sae.predict_k(x.to(sae.dtype)).double().numpy()
