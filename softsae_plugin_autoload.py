"""Make SAE-Lens find the `softsae` architecture in any script, with or without `import softsae_plugin`.

Python runs this at start-up (the installed `softsae_plugin_autoload.pth` imports it), so it imports nothing
heavy. It waits for SAE-Lens' registry module and then wraps its two registries: asking one for `softsae`
imports softsae_plugin, which registers it; asking for an architecture that no installed package provides
raises a KeyError that names the architecture and the registered ones, instead of SAE-Lens' bare
`KeyError: 'softsae'`. So `SAE.load_from_disk` and `SAE.from_pretrained` load a SoftSAE checkpoint as they
load a built-in one.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
from types import ModuleType
from typing import Any

REGISTRY_MODULE = "sae_lens.registry"
# Architecture name -> the package whose import registers it.
PLUGIN_ARCHITECTURES = {"softsae": "softsae_plugin"}


class LazyRegistry(dict):
    """SAE-Lens' architecture registry that imports a plugin package the first time one of its names is looked up."""

    def __init__(self, entries: dict[str, Any], kind: str) -> None:
        super().__init__(entries)
        self.kind = kind

    def __missing__(self, architecture: str) -> Any:
        package = PLUGIN_ARCHITECTURES.get(architecture)
        if package is not None:
            importlib.import_module(package)
            if architecture in self:
                return self[architecture]
        raise KeyError(
            f"SAE-Lens has no {self.kind} class for architecture {architecture!r} (the 'architecture' field of the "
            f"SAE's cfg.json); registered: {sorted(self)}. An architecture from a plugin is registered by importing "
            "its package: for 'softsae', pip install softsae-plugin and import softsae_plugin"
        )


def make_lazy(registry: ModuleType) -> None:
    """Replace the registries of the (just executed) module `sae_lens.registry` with `LazyRegistry` copies."""
    for name, kind in (("SAE_CLASS_REGISTRY", "inference"), ("SAE_TRAINING_CLASS_REGISTRY", "training")):
        current = getattr(registry, name, None)
        if isinstance(current, dict) and not isinstance(current, LazyRegistry):
            setattr(registry, name, LazyRegistry(current, kind))


class _ThenMakeLazy(importlib.abc.Loader):
    # SAE-Lens' own loader, and make_lazy once the module has run; anything else goes to the wrapped loader.
    def __init__(self, loader: importlib.abc.Loader) -> None:
        self.loader = loader

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self.loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self.loader.exec_module(module)
        make_lazy(module)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.loader, name)


class _RegistryWatcher(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname: str, path: Any, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if fullname != REGISTRY_MODULE:
            return None
        sys.meta_path.remove(self)  # once is enough; also keeps the lookup below from finding this finder
        spec = importlib.util.find_spec(fullname)
        if spec is not None and spec.loader is not None:
            spec.loader = _ThenMakeLazy(spec.loader)
        return spec


def install() -> None:
    """Start watching for SAE-Lens' registry (or wrap it now if it is already imported)."""
    if REGISTRY_MODULE in sys.modules:
        make_lazy(sys.modules[REGISTRY_MODULE])
    elif not any(isinstance(finder, _RegistryWatcher) for finder in sys.meta_path):
        sys.meta_path.insert(0, _RegistryWatcher())


install()
