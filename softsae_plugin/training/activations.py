"""Activation sources for the embedding path: one vector per input, from memory or from a file.

A file is read lazily where its format allows (`map_activations`): a .npy file and a .safetensors file of float16,
float32 or float64 are memory-mapped, and a folder written by `datasets.Dataset.save_to_disk` is read through the
Arrow files that `datasets` maps itself; each batch then reads only its own rows (under torchrun, only this rank's
share of each global batch), so no rank holds the whole file. Other safetensors dtypes (bfloat16, integers) are
loaded whole, as `load_activations` loads every format.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import torch

# safetensors dtypes that numpy can map as they are stored.
_MAPPABLE_SAFETENSORS = {"F16": np.float16, "F32": np.float32, "F64": np.float64}


class MappedRows:
    """A (n, d_in) matrix of activation rows that stay in their file until asked for (`rows`): `array` is a
    memory-mapped numpy array or a `datasets` column, `index` the file rows this matrix holds (all, in order, when
    None; `take` narrows it, e.g. to the training or held-out rows)."""

    def __init__(self, array: Any, shape: tuple[int, int], index: np.ndarray | None = None) -> None:
        self.array, self.index = array, index
        self.shape = (shape[0] if index is None else len(index), shape[1])
        self.ndim = 2

    def take(self, rows: torch.Tensor) -> MappedRows:
        """The rows `rows` of this matrix, still unread."""
        chosen = rows.numpy() if self.index is None else self.index[rows.numpy()]
        return MappedRows(self.array, (self.shape[0], self.shape[1]), chosen)

    def rows(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Read rows `rows` of this matrix (every row when None) from the file, as float32, in the order asked."""
        wanted = np.arange(self.shape[0]) if rows is None else rows.numpy()
        in_file = wanted if self.index is None else self.index[wanted]
        # Read in file order (sequential pages), then put the rows back in the order asked.
        order = np.argsort(in_file, kind="stable")
        read = np.asarray(self.array[in_file[order]])
        out = np.empty_like(read)
        out[order] = read
        return torch.from_numpy(out).float()


ActivationSource = torch.Tensor | np.ndarray | MappedRows | Iterable[torch.Tensor] | str | Path


class _DatasetColumn:
    # One column of vectors of a dataset saved with `save_to_disk`, indexed like a numpy array: `datasets` maps the
    # Arrow files and a lookup reads only the rows asked for.
    def __init__(self, dataset: Any, column: str) -> None:
        self.dataset, self.column = dataset.with_format("numpy"), column

    def __getitem__(self, rows: np.ndarray) -> np.ndarray:
        return np.stack(self.dataset[rows.tolist()][self.column])


def map_activations(path: str | Path) -> MappedRows | torch.Tensor:
    """A (n, d_in) activation matrix from a file, memory-mapped where the format allows (see the module's text):
    a `MappedRows`, or the whole matrix as `load_activations` reads it."""
    path = Path(path)
    if path.suffix == ".npy" and path.is_file():
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    elif path.suffix == ".safetensors" and path.is_file():
        array = _map_safetensors(path)
    elif path.is_dir() and (path / "state.json").is_file():  # one Dataset (not a DatasetDict)
        from datasets import load_from_disk

        dataset = load_from_disk(str(path))
        column = _pick_name(dataset.column_names, path)
        first = np.asarray(dataset.with_format("numpy")[0][column])
        if first.ndim != 1:
            raise ValueError(f"activations: expected a column of vectors in {path}, got rows of shape {first.shape}")
        return MappedRows(_DatasetColumn(dataset, column), (len(dataset), first.shape[0]))
    else:
        array = None
    if array is None:
        return load_activations(path)
    if array.ndim != 2:
        raise ValueError(f"activations: expected a 2-D (n, d_in) matrix in {path}, got shape {tuple(array.shape)}")
    return MappedRows(array, array.shape)


def _map_safetensors(path: Path) -> np.ndarray | None:
    # The format is an 8-byte header length, a JSON header (name -> dtype, shape, data offsets) and the raw data:
    # the chosen tensor's bytes are mapped in place; None for a dtype numpy cannot map (loaded whole instead).
    with open(path, "rb") as handle:
        header_length = int.from_bytes(handle.read(8), "little")
        header = json.loads(handle.read(header_length))
    header.pop("__metadata__", None)
    entry = header[_pick_name(list(header), path)]
    if entry["dtype"] not in _MAPPABLE_SAFETENSORS:
        return None
    start, end = entry["data_offsets"]
    if end == start:
        return None
    return np.memmap(path, dtype=_MAPPABLE_SAFETENSORS[entry["dtype"]], mode="r", offset=8 + header_length + start,
                     shape=tuple(entry["shape"]))  # fmt: skip


def as_tensor(matrix: torch.Tensor | MappedRows) -> torch.Tensor:
    """The rows of `matrix` in memory (read from its file if mapped)."""
    return matrix.rows() if isinstance(matrix, MappedRows) else matrix


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
    return tensors[_pick_name(list(tensors), path)]


def _pick_name(names: list[str], path: Path) -> str:
    if "activations" in names:
        return "activations"
    if len(names) == 1:
        return names[0]
    raise ValueError(f"activations: {path} holds {sorted(names)}; expected one tensor or one named 'activations'")


Matrix = torch.Tensor | MappedRows


def split_heldout(matrix: Matrix, fraction: float, *, seed: int) -> tuple[Matrix, Matrix]:
    """Split the rows of `matrix` into (training rows, held-out rows), a random `fraction` held out (seeded); a
    mapped matrix stays mapped (neither part is read here)."""
    n_heldout = max(1, round(fraction * matrix.shape[0]))
    order = torch.randperm(matrix.shape[0], generator=torch.Generator().manual_seed(seed))
    if isinstance(matrix, MappedRows):
        return matrix.take(order[n_heldout:]), matrix.take(order[:n_heldout])
    return matrix[order[n_heldout:]], matrix[order[:n_heldout]]


def batches(
    source: ActivationSource,
    batch_size: int,
    *,
    seed: int = 0,
    start: int = 0,
    share: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> Iterator[torch.Tensor]:
    """An endless stream of (batch_size, d_in) batches from `source`, from its `start`-th batch on.

    A matrix (tensor, array, mapped file or file) is reshuffled every epoch with a generator seeded by `seed`, so a
    run is deterministic and a resumed run continues the same stream from `start` (skipping whole epochs without
    reading them); an iterable of batches is re-chunked to exactly `batch_size` rows and must not run out
    before training ends. `share` (e.g. `data_parallel.shard`) takes a part of every batch: of a matrix's, before
    its rows are read, so that a mapped file is read only for that part.
    """
    if isinstance(source, (str, Path)):
        source = map_activations(source)
    if isinstance(source, np.ndarray):
        source = torch.from_numpy(source)
    if isinstance(source, (torch.Tensor, MappedRows)):
        return _shuffled_epochs(source, batch_size, seed, start, share or (lambda rows: rows))
    stream = islice(_rechunked(iter(source), batch_size), start, None)
    return stream if share is None else map(share, stream)


def _shuffled_epochs(
    matrix: Matrix, batch_size: int, seed: int, start: int, share: Callable[[torch.Tensor], torch.Tensor]
) -> Iterator[torch.Tensor]:
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
            mine = share(order[row : row + batch_size])
            yield matrix.rows(mine) if isinstance(matrix, MappedRows) else matrix[mine]
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
