"""Activation sources for the embedding path: one vector per input, from memory or from a file."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from itertools import islice
from pathlib import Path

import numpy as np
import torch

ActivationSource = torch.Tensor | np.ndarray | Iterable[torch.Tensor] | str | Path


def load_activations(path: str | Path) -> torch.Tensor:
    """Load a (n, d_in) activation matrix from a .npy file, a .safetensors file or a saved HF dataset.

    A .safetensors file must hold exactly one tensor (or one named "activations"); a dataset saved with
    `datasets.Dataset.save_to_disk` must have one column of vectors (or one named "activations").
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"activations: no file or folder at {path}")
    if path.suffix == ".npy":
        array = torch.from_numpy(np.load(path, allow_pickle=False))
    elif path.suffix == ".safetensors":
        from safetensors.torch import load_file

        tensors = load_file(str(path))
        array = _pick(tensors, path)
    elif path.is_dir():
        from datasets import load_from_disk

        dataset = load_from_disk(str(path)).with_format("torch")
        array = _pick({name: dataset[name] for name in dataset.column_names}, path)
    else:
        raise ValueError(
            f"activations: cannot read {path}; expected a .npy file, a .safetensors file or a folder "
            "written by datasets.Dataset.save_to_disk"
        )
    if array.ndim != 2:
        raise ValueError(f"activations: expected a 2-D (n, d_in) matrix in {path}, got shape {tuple(array.shape)}")
    return array.float()


def _pick(tensors: dict[str, torch.Tensor], path: Path) -> torch.Tensor:
    if "activations" in tensors:
        return tensors["activations"]
    if len(tensors) == 1:
        return next(iter(tensors.values()))
    raise ValueError(f"activations: {path} holds {sorted(tensors)}; expected one tensor or one named 'activations'")


def split_heldout(matrix: torch.Tensor, fraction: float, *, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split the rows of `matrix` into (training rows, held-out rows), a random `fraction` held out (seeded)."""
    n_heldout = max(1, round(fraction * matrix.shape[0]))
    order = torch.randperm(matrix.shape[0], generator=torch.Generator().manual_seed(seed))
    return matrix[order[n_heldout:]], matrix[order[:n_heldout]]


def batches(source: ActivationSource, batch_size: int, *, seed: int = 0, start: int = 0) -> Iterator[torch.Tensor]:
    """An endless stream of (batch_size, d_in) batches from `source`, from its `start`-th batch on.

    A matrix (tensor, array or file) is reshuffled every epoch with a generator seeded by `seed`, so a run
    is deterministic and a resumed run continues the same stream from `start` (skipping whole epochs without
    reading them); an iterable of batches is re-chunked to exactly `batch_size` rows and must not run out
    before training ends.
    """
    if isinstance(source, (str, Path)):
        source = load_activations(source)
    if isinstance(source, np.ndarray):
        source = torch.from_numpy(source)
    if isinstance(source, torch.Tensor):
        return _shuffled_epochs(source, batch_size, seed, start)
    return islice(_rechunked(iter(source), batch_size), start, None)


def _shuffled_epochs(matrix: torch.Tensor, batch_size: int, seed: int, start: int) -> Iterator[torch.Tensor]:
    if matrix.ndim != 2 or matrix.shape[0] < batch_size:
        raise ValueError(
            f"activations: expected a (n, d_in) matrix with n >= batch_size={batch_size}, "
            f"got shape {tuple(matrix.shape)}"
        )
    generator = torch.Generator().manual_seed(seed)
    skipped_epochs, offset = divmod(start, matrix.shape[0] // batch_size)
    for _ in range(skipped_epochs):  # each epoch's shuffle advances the generator
        torch.randperm(matrix.shape[0], generator=generator)
    while True:
        order = torch.randperm(matrix.shape[0], generator=generator)
        for row in range(offset * batch_size, matrix.shape[0] - batch_size + 1, batch_size):
            yield matrix[order[row : row + batch_size]]
        offset = 0


def _rechunked(stream: Iterator[torch.Tensor], batch_size: int) -> Iterator[torch.Tensor]:
    pending: list[torch.Tensor] = []
    n_pending = 0
    for batch in stream:
        pending.append(batch.reshape(-1, batch.shape[-1]))
        n_pending += pending[-1].shape[0]
        while n_pending >= batch_size:
            rows = torch.cat(pending)
            yield rows[:batch_size]
            pending, n_pending = [rows[batch_size:]], n_pending - batch_size
    raise ValueError("activations: the batch iterator ran out before training finished; supply more batches")
