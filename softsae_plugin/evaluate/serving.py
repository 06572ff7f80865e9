"""What SAEBench cannot reach offline, served while one of its steps runs: the model built once, local copies of
its datasets, the local held-out text; each a single name patched inside one SAEBench module.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from unittest import mock

import torch

import softsae_plugin  # noqa: F401  (registers softsae, so SoftSAE checkpoints load)
from softsae_plugin.evaluate.evals import EvalError
from softsae_plugin.offline.text import LOCAL_TEXT_ID, english_text


@contextmanager
def working_directory(path: Path) -> Iterator[None]:
    previous = Path.cwd()
    path.mkdir(parents=True, exist_ok=True)
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(previous)


@contextmanager
def serve_model(eval_module: Any, model_name: str, models: dict[str, Any]) -> Iterator[None]:
    """While the block runs, `eval_module`'s `HookedTransformer.from_pretrained_no_processing(model_name, ...)`
    returns the model already built for it (`models`, keyed by dtype name; see `build_model`).

    Only the name `HookedTransformer` inside that one SAEBench module is replaced, by an object with just
    that loader: any other use of the name there fails loudly instead of silently using a stand-in.
    """

    def from_pretrained_no_processing(name: str, *args: Any, **kwargs: Any) -> Any:
        dtype = str(kwargs.get("dtype", torch.float32)).removeprefix("torch.")
        if name != model_name or dtype not in models:
            raise EvalError(f"SAEBench asked for {name} in {dtype}; built: {model_name} in {sorted(models)}")
        return models[dtype]

    stand_in = SimpleNamespace(from_pretrained_no_processing=from_pretrained_no_processing)
    with mock.patch.object(eval_module, "HookedTransformer", stand_in):
        yield


@contextmanager
def serve_datasets(datasets_dir: Path | None, read: dict[str, dict[str, Any]]) -> Iterator[None]:
    """While the block runs, every dataset SAEBench's SCR/TPP/sparse-probing code loads with `load_dataset(name)` is
    recorded in `read` (`dataset_record`: where from, fingerprint, stand-in or not), and with `datasets_dir` it is
    loaded from the local copy `datasets_dir / name` instead of the Hub.

    The two SAEBench modules that call `load_dataset` get a wrapper; with `datasets_dir` it reads only local copies
    (a missing copy is an error naming the folder it expected, never a silent Hub download).
    """
    import datasets
    import sae_bench.evals.scr_and_tpp.dataset_creation as scr_data
    import sae_bench.sae_bench_utils.dataset_utils as tpp_data

    from softsae_plugin.evaluate.provenance import dataset_record

    hub_load = tpp_data.load_dataset

    def load_dataset(path: str, *args: Any, split: str | None = None, **kwargs: Any) -> Any:
        if datasets_dir is None:
            data = hub_load(path, *args, split=split, **kwargs)
            read[path] = dataset_record(path, data, "the Hub (datasets.load_dataset)")
            return data
        if args or kwargs:
            raise EvalError(f"a local copy of {path} cannot serve load_dataset arguments {args} {kwargs}")
        folder = datasets_dir / path
        if not folder.is_dir():
            raise EvalError(f"--datasets-dir has no copy of {path}: expected {folder} (datasets.save_to_disk)")
        data = datasets.load_from_disk(str(folder))
        read[path] = dataset_record(path, data, f"local copy {folder}")
        return data[split] if split is not None else data

    with (
        mock.patch.object(scr_data, "load_dataset", load_dataset),
        mock.patch.object(tpp_data, "load_dataset", load_dataset),
    ):
        yield


@contextmanager
def serve_text(dataset: str, read: dict[str, dict[str, Any]] | None = None) -> Iterator[None]:
    """While the block runs, SAE-Lens' activation store reads the local held-out text (offline/text.py's held-out
    paragraphs) where it asks `load_dataset` for LOCAL_TEXT_ID; any other name goes to `datasets` as usual. Each
    text read is recorded in `read` (`dataset_record`) when given."""
    import sae_lens.training.activations_store as store_module

    from softsae_plugin.evaluate.provenance import dataset_record

    load_dataset = store_module.load_dataset

    def load(path: str, *args: Any, **kwargs: Any) -> Any:
        local = path == LOCAL_TEXT_ID
        data = english_text(split="heldout") if local else load_dataset(path, *args, **kwargs)
        if read is not None:
            source = "local held-out text (offline)" if local else "datasets.load_dataset"
            read[path] = dataset_record(path, data, source)
        return data

    with mock.patch.object(store_module, "load_dataset", load):
        yield
