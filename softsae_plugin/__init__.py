"""SoftSAE for SAE-Lens: sparse autoencoders with an input-dependent number of active features.

Importing this package registers the architecture ``softsae`` with SAE-Lens' registry, for inference
(`SAE.load_from_disk`, `SAE.from_pretrained`) and for training (SAE-Lens' runner and `SAETrainer`).
"""

from sae_lens.registry import (
    SAE_CLASS_REGISTRY,
    SAE_TRAINING_CLASS_REGISTRY,
    register_sae_class,
    register_sae_training_class,
)

from softsae_plugin.lapsum import soft_topk
from softsae_plugin.softsae import SoftSAE, SoftSAEConfig, SoftTrainingSAE, SoftTrainingSAEConfig
from softsae_plugin.train import train_on_activations

# Re-import safe: SAE-Lens refuses a second registration under the same name.
if "softsae" not in SAE_CLASS_REGISTRY:
    register_sae_class("softsae", SoftSAE, SoftSAEConfig)
if "softsae" not in SAE_TRAINING_CLASS_REGISTRY:
    register_sae_training_class("softsae", SoftTrainingSAE, SoftTrainingSAEConfig)

__all__ = ["SoftSAE", "SoftSAEConfig", "SoftTrainingSAE", "SoftTrainingSAEConfig", "soft_topk", "train_on_activations"]
