"""Each rank's exact data position in SAE-Lens' activation store, saved with a checkpoint and restored on resume.

SAE-Lens' store saves only the number of text rows it has read (`state_dict`: `n_dataset_processed`), and its resume
skips ahead to that row: the shuffle buffer, the sequences already taken from the row it stood in, and the RNG behind
the buffer's permutations are lost, so the resumed run sees other batches. `StoreState` records what is missing, per
rank: the number of token sequences drawn from the store's current pass over the text, the shuffle buffer's rows
(those kept for mixing and the batches cut but not yet served), and torch's RNG state; with SAE-Lens' own
`state_dict`. A resume rebuilds the buffer from these rows and skips the text to the sequence (tokenisation only, no
forward pass of the model), so the run continues with exactly the batches of an uninterrupted run, without replaying
the model over the batches already trained on.

Under torchrun every rank's state is gathered to rank 0, which writes the checkpoint: one file per rank in
`softsae_store_state/` (the ranks must share the checkpoint folder, as they do for the rest of it).
"""

from __future__ import annotations

import io
import logging
import sys
from collections.abc import Iterator
from itertools import islice
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from sae_lens.training.activations_store import ActivationsStore
from sae_lens.training.mixing_buffer import mixing_buffer

from softsae_plugin.collectives import is_main, rank, world_size

STORE_STATE_DIRNAME = "softsae_store_state"

logger = logging.getLogger(__name__)


def store_state_file(checkpoint: str | Path, rank_index: int) -> Path:
    """Where rank `rank_index`'s store state lies in a checkpoint folder."""
    return Path(checkpoint) / STORE_STATE_DIRNAME / f"rank{rank_index}.pt"


class StoreState:
    """Tracks the data position of SAE-Lens' `store` exactly, to save it (`capture`) and continue from it (`restore`).

    Installed right after the store is built, before any batch is drawn: it counts the token sequences taken from
    each pass over the text (the store starts a new pass at the end of the text) and builds the store's shuffled
    stream itself, with SAE-Lens' own `mixing_buffer`, so that the buffer's rows can be read at a checkpoint. For a
    sweep (`multi_hook`) each forward pass's activations at every hook are packed side by side through one buffer,
    as SAE-Lens' `multi_hook_concat_split_iter` does (one permutation for every hook keeps the tokens aligned);
    its own buffer is hidden in a loop of that generator, so the packing is done here.
    """

    def __init__(self, store: ActivationsStore, *, multi_hook: bool = False) -> None:
        self.store, self.multi_hook = store, multi_hook
        self.sequences = 0  # drawn from the store's current pass over the text
        self.buffer: Iterator[torch.Tensor] | None = None  # SAE-Lens' mixing_buffer generator, once started
        self.boundaries: list[int] | None = None  # a sweep's packed columns per hook
        self.resumed: dict[str, Any] | None = None  # the state restored, on resume
        self.to_serve: dict[str, Any] | None = None  # the same, until a stream has started serving its rows
        self.served_saved = 0  # of the restored state's unserved batches
        self.pending: list[bytes] | None = None  # every rank's state, on rank 0 while a checkpoint is written
        new_pass = store._iterate_tokenized_sequences

        def counted_pass() -> Iterator[torch.Tensor]:
            self.sequences = 0
            for sequence in new_pass():
                self.sequences += 1
                yield sequence

        store._iterate_tokenized_sequences = counted_pass  # type: ignore[method-assign]
        store.iterable_sequences = counted_pass()
        if multi_hook:
            store.get_multi_hook_data_loader = self._multi_hook_stream  # type: ignore[method-assign]
        else:
            store._dataloader = self._stream(store._iterate_filtered_activations())

    def _stream(self, loader: Iterator[torch.Tensor]) -> Iterator[torch.Tensor]:
        resumed, self.to_serve = self.to_serve, None  # served once, by the first stream after the restore
        if resumed is not None:
            # The batches already cut when the checkpoint was written, then the rows kept for mixing, which the
            # next forward pass's rows join exactly as in the uninterrupted run.
            unserved = resumed["unserved"].to(self.store.device)
            for batch in unserved.split(self.store.train_batch_size_tokens) if unserved.shape[0] else ():
                self.served_saved += 1
                yield batch
            if resumed["kept"].shape[0]:
                loader = _prepended(resumed["kept"], loader)
        # SAE-Lens' generator itself, not the wrapper its @torch.no_grad() decorator makes (whose frame holds only the
        # generator): `capture` reads the buffer in its frame. Its rows never require grad (the store computes them
        # under no_grad), so the wrapper's grad mode changes nothing.
        self.buffer = getattr(mixing_buffer, "__wrapped__", mixing_buffer)(
            buffer_size=self.store.n_batches_in_buffer * self.store.training_context_size,
            batch_size=self.store.train_batch_size_tokens,
            activations_loader=loader,
            mix_fraction=self.store.activations_mixing_fraction,
        )
        yield from self.buffer

    def _multi_hook_stream(self) -> Iterator[dict[str, torch.Tensor]]:
        hooks = list(self.store._hook_names or [])
        acts = self.store._iterate_filtered_multi_hook_activations()

        def packed() -> Iterator[torch.Tensor]:
            for per_hook in acts:
                if self.boundaries is None:
                    self.boundaries = [0]
                    for hook in hooks:
                        self.boundaries.append(self.boundaries[-1] + per_hook[hook].shape[1])
                yield torch.cat([per_hook[hook] for hook in hooks], dim=1)

        if self.to_serve is not None:
            self.boundaries = self.to_serve["boundaries"]
        for batch in self._stream(packed()):
            assert self.boundaries is not None
            yield {hook: batch[:, self.boundaries[i] : self.boundaries[i + 1]] for i, hook in enumerate(hooks)}

    def capture(self) -> dict[str, Any]:
        """This rank's data position now: SAE-Lens' store state, the sequences drawn from this pass over the text,
        the shuffle buffer's rows and torch's RNG state."""
        kept = unserved = torch.empty(0)
        frame = getattr(self.buffer, "gi_frame", None)
        if frame is not None and "serving_buffer" in frame.f_locals:
            # The generator stands at its `yield` of batch `batch_idx` of the serving buffer (it yields nowhere else
            # while the text lasts, and the store starts the text again at its end).
            local = frame.f_locals
            size = self.store.train_batch_size_tokens
            unserved = local["serving_buffer"][(local["batch_idx"] + 1) * size : local["num_serving_batches"] * size]
            kept = local["storage_buffer"]
        elif self.resumed is not None:  # resumed, and still serving the saved batches: the buffer has not restarted
            unserved = self.resumed["unserved"][self.served_saved * self.store.train_batch_size_tokens :]
            kept = self.resumed["kept"]
        state = {
            "store": {name: int(value) for name, value in self.store.state_dict().items()},
            "sequences": self.sequences,
            "kept": kept.cpu(),
            "unserved": unserved.cpu(),
            "boundaries": self.boundaries,
            "rng": torch.get_rng_state(),
        }
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda_rng"] = torch.cuda.get_rng_state()
        return state

    def around_checkpoints(self, trainer: Any) -> None:
        """Make every checkpoint of `trainer` (SAE-Lens' trainer or multi trainer, already guarded) gather each rank's
        state first, into `pending`, for the runner's checkpoint files (`write_pending`) to write. Not while an
        exception is being handled: SAE-Lens' SIGTERM / Ctrl-C handler saves on ranks that need not all be there for
        a collective, so a data-parallel checkpoint written there has no store state (a resume replays instead)."""
        save = trainer.save_checkpoint

        def save_with_store_states(*args: Any, **kwargs: Any) -> Any:
            interrupted = sys.exc_info()[1] is not None and world_size() > 1
            self.pending = None if interrupted else gather_states(self.capture())
            try:
                return save(*args, **kwargs)
            finally:
                self.pending = None

        trainer.save_checkpoint = save_with_store_states

    def write_pending(self, checkpoint: Path) -> None:
        """Write the states gathered for the checkpoint being written (rank 0, inside its folder)."""
        if self.pending is not None:
            write_states(checkpoint, self.pending)

    def restore(self, state: dict[str, Any]) -> None:
        """Continue from `state` (this rank's `capture` at the checkpoint): skip the text to its sequence without
        running the model, and serve the saved buffer's rows first. Call before any batch is drawn; torch's RNG is
        set by `restore_rng` just before training continues."""
        self.resumed = self.to_serve = state
        store = self.store
        store.iterable_sequences = store._iterate_tokenized_sequences()
        for _ in islice(store.iterable_sequences, state["sequences"]):
            pass
        store.n_dataset_processed = state["store"]["n_dataset_processed"]
        if not self.multi_hook:
            store._dataloader = self._stream(store._iterate_filtered_activations())
        logger.info(
            "resume: rank %d continues its data stream at sequence %d of the text's pass, with %d buffered rows",
            rank(),
            state["sequences"],
            state["kept"].shape[0] + state["unserved"].shape[0],
        )

    def restore_rng(self) -> None:
        """Set torch's RNG to the state saved with the checkpoint (the buffer's next permutation follows from it)."""
        assert self.resumed is not None
        torch.set_rng_state(self.resumed["rng"])
        if "cuda_rng" in self.resumed:
            torch.cuda.set_rng_state(self.resumed["cuda_rng"])


def tracked_store(store: ActivationsStore, cfg: Any, *, multi_hook: bool = False) -> StoreState | None:
    """A `StoreState` tracking `store`, or None where the exact position cannot be taken from the store: a store
    that reads a cache of activations (SAE-Lens' own resume applies), or one that a background thread reads ahead
    of training (`prefetch_llm_batches`: its position is not the trainer's when a checkpoint is written)."""
    if getattr(store, "cached_activation_dataset", None) is not None or cfg.prefetch_llm_batches:
        return None
    return StoreState(store, multi_hook=multi_hook)


def _prepended(rows: torch.Tensor, loader: Iterator[torch.Tensor]) -> Iterator[torch.Tensor]:
    # The kept rows followed by the next forward pass's, as one chunk: the buffer then holds what it held.
    first = next(loader)
    yield torch.cat([rows.to(first.device, first.dtype), first])
    yield from loader


def gather_states(state: dict[str, Any]) -> list[bytes] | None:
    """Every rank's `state`, serialised, on rank 0 (in rank order); None on the other ranks. A collective: every
    rank calls it at the same checkpoint."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    mine = buffer.getvalue()
    if world_size() == 1:
        return [mine]
    gathered: list[bytes] | None = [b""] * world_size() if is_main() else None
    dist.gather_object(mine, gathered, dst=0)
    return gathered


def write_states(checkpoint: Path, states: list[bytes]) -> None:
    """Write each rank's serialised state into the checkpoint folder (`store_state_file`)."""
    for index, state in enumerate(states):
        path = store_state_file(checkpoint, index)
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(state)


def read_state(checkpoint: str | Path) -> dict[str, Any] | None:
    """This rank's saved state in `checkpoint`, or None for a checkpoint written without one (an older version, or
    the interrupt handler of a data-parallel run, which writes from rank 0 alone)."""
    path = store_state_file(checkpoint, rank())
    if not path.is_file():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # any unreadable file gets the same clear error
        raise ValueError(
            f"resume: {path} cannot be read ({type(err).__name__}: {str(err)[:200]}); expected the store state "
            "this rank saved with the checkpoint: resume from an earlier checkpoint"
        ) from None
