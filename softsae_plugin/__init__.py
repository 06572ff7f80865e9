"""SoftSAE for SAE-Lens: sparse autoencoders with an input-dependent number of active features.

Importing this package registers the architecture ``softsae`` with SAE-Lens' registry, for inference
(`SAE.load_from_disk`, `SAE.from_pretrained`) and for training (SAE-Lens' runner and `SAETrainer`).
"""

import importlib
import importlib.abc
import importlib.util
import sys
import warnings
from types import ModuleType
from typing import Any

from sae_lens.registry import (
    SAE_CLASS_REGISTRY,
    SAE_TRAINING_CLASS_REGISTRY,
    register_sae_class,
    register_sae_training_class,
)

from softsae_plugin.lapsum import soft_topk
from softsae_plugin.softsae import SoftSAE, SoftSAEConfig, SoftTrainingSAE, SoftTrainingSAEConfig
from softsae_plugin.training.on_activations import train_on_activations

# Re-import safe: SAE-Lens refuses a second registration under the same name.
if "softsae" not in SAE_CLASS_REGISTRY:
    register_sae_class("softsae", SoftSAE, SoftSAEConfig)
if "softsae" not in SAE_TRAINING_CLASS_REGISTRY:
    register_sae_training_class("softsae", SoftTrainingSAE, SoftTrainingSAEConfig)

__all__ = ["SoftSAE", "SoftSAEConfig", "SoftTrainingSAE", "SoftTrainingSAEConfig", "soft_topk", "train_on_activations"]

# Modules that moved into the package's rooms, under the names a user's script may still import.
MOVED_MODULES = {
    "softsae_plugin.activations": "softsae_plugin.training.activations",
    "softsae_plugin.card": "softsae_plugin.hub.card",
    "softsae_plugin.distributed": "softsae_plugin.training.data_parallel",
    "softsae_plugin.push": "softsae_plugin.hub.push",
    "softsae_plugin.reliability": "softsae_plugin.training.guards",
    "softsae_plugin.smollm2": "softsae_plugin.offline.smollm2",
    "softsae_plugin.summary": "softsae_plugin.training.summary",
    "softsae_plugin.sweep": "softsae_plugin.training.sweep",
    "softsae_plugin.text": "softsae_plugin.offline.text",
    "softsae_plugin.train": "softsae_plugin.training.on_activations",
    "softsae_plugin.typecheck": "softsae_plugin.checks",
}


class _MovedModuleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    # Importing an old name gives the new module itself (one module object, so patches and isinstance agree).
    def find_spec(self, fullname: str, path: Any, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        return importlib.util.spec_from_loader(fullname, self) if fullname in MOVED_MODULES else None

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        new = MOVED_MODULES[spec.name]
        warnings.warn(f"{spec.name} is now {new}; import it from there", DeprecationWarning, stacklevel=2)
        return importlib.import_module(new)

    def exec_module(self, module: ModuleType) -> None:
        pass  # the new module has run already; importlib files it under the old name itself


if not any(isinstance(finder, _MovedModuleFinder) for finder in sys.meta_path):
    sys.meta_path.append(_MovedModuleFinder())
