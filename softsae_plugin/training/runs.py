"""What every training run shares, whatever feeds it (a language model, a file of vectors, a sweep): the run length
recorded in the SAE config, SAE-Lens' warnings that do not hold for the local model and text turned off, and
`fit_quietly_and_in_order`, the one place where a trainer starts.
"""

from __future__ import annotations

import dataclasses
import logging
import warnings
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from functools import partial
from typing import Any
from unittest import mock

from sae_lens.saes.sae import TrainingSAEConfig
from sae_lens.training.sae_trainer import SAETrainer
from tqdm.auto import tqdm

from softsae_plugin.collectives import is_main, world_size
from softsae_plugin.offline.smollm2 import is_local_model, load_local_model
from softsae_plugin.offline.text import LOCAL_TEXT_ID, tokenized_english_text
from softsae_plugin.training.data_parallel import global_batches, load_shard, main_rank_first, shard_dataset


def with_run_length(sae_cfg: TrainingSAEConfig, total_training_steps: int) -> TrainingSAEConfig:
    """Record the run's length in a config whose schedules need it (softsae); others pass unchanged."""
    if not hasattr(sae_cfg, "total_training_steps"):
        return sae_cfg
    return dataclasses.replace(sae_cfg, total_training_steps=total_training_steps)


@contextmanager
def local_sources_quietly(local_model: bool, local_text: bool) -> Iterator[None]:
    """While the block runs, SAE-Lens' warnings that do not hold for this package's local model and text are off:
    that an override model or dataset makes a run irreproducible from its configuration (the configuration names
    them), that a dataset of fewer rows than training tokens means several epochs (it compares rows with tokens;
    the caller states the passes over the text), and that copying its own token tensors with torch.tensor is slow
    (SAE-Lens sets the pretokenized text's format to torch itself, then copies each row)."""
    messages = [
        *(["a model which will override", "override_model overrides"] if local_model else []),
        *(["a dataset which will override", "override_dataset overrides"] if local_text else []),
    ]
    quiet = logging.Filter()
    quiet.filter = lambda record: not any(m in record.getMessage() for m in messages)  # type: ignore[method-assign]
    sae_lens_logger = logging.getLogger("sae_lens")
    sae_lens_logger.addFilter(quiet)
    try:
        with warnings.catch_warnings():
            if local_text:
                warnings.filterwarnings("ignore", message="The training dataset contains fewer samples")
                warnings.filterwarnings("ignore", message="To copy construct from a tensor")
            yield
    finally:
        sae_lens_logger.removeFilter(quiet)


@contextmanager
def _quiet_bars() -> Iterator[None]:
    # tqdm reads TQDM_DISABLE when it is imported, not when a bar starts: SAE-Lens' trainer and activation scaler
    # get a tqdm whose bars are off instead, for as long as the block runs.
    import sae_lens.training.activation_scaler as activation_scaler
    import sae_lens.training.sae_trainer as sae_trainer

    quiet = partial(tqdm, disable=True)
    with mock.patch.object(sae_trainer, "tqdm", quiet), mock.patch.object(activation_scaler, "tqdm", quiet):
        yield


@contextmanager
def fit_quietly_and_in_order(trainer: SAETrainer[Any, Any], *, progress: bool = True) -> Iterator[None]:
    """Prepare `trainer` for its `fit()`, run inside the block: the activation scale or whitening is estimated first
    (SAE-Lens' own estimate, on the same batches `fit` would take, so results are unchanged; the global batches under
    data-parallel training), so that its progress bar does not nest inside the training bar; with `progress=False`
    (and on every rank but the first) neither bar is drawn."""
    with ExitStack() as stack:
        if not progress or not is_main():
            stack.enter_context(_quiet_bars())
        scaler, normalisation = trainer.activation_scaler, trainer.sae.cfg.normalize_activations
        estimate = None
        if normalisation == "expected_average_only_in" and scaler.scaling_factor is None:
            estimate = scaler.estimate_scaling_factor
        elif normalisation == "covariance_whitening" and scaler.whitening is None:
            estimate = scaler.estimate_whitening
        if estimate is not None:  # every rank on the global batches: every rank trains and folds the same statistics
            with global_batches(trainer):
                estimate(
                    d_in=trainer.sae.cfg.d_in,
                    data_provider=trainer.data_provider,
                    n_batches_for_norm_estimate=trainer.cfg.n_batches_for_norm_estimate,
                )
        yield


def model_and_text(cfg: Any, first_n_layers: int | None) -> tuple[Any, Any]:
    """The language model and training text a runner config names, where this package provides them rather than
    SAE-Lens' runner: the offline model (its first `first_n_layers` blocks, where the hooks are) for a local model id,
    the offline text's training split (tokenized, this rank's share) for LOCAL_TEXT_ID, and under torchrun this rank's
    shard of a Hub dataset; None for what the runner loads itself. Rank 0 loads first and the other ranks after it."""
    model = text = None
    with main_rank_first():
        if is_local_model(cfg.model_name):
            model = load_local_model(cfg.model_name, first_n_layers=first_n_layers, device=cfg.llm_device)
        if cfg.dataset_path == LOCAL_TEXT_ID:
            if model is None:
                raise ValueError(
                    f"dataset_path={LOCAL_TEXT_ID!r} needs a local model_name (e.g. smollm2-135m-instruct-q4_1)"
                )
            text = tokenized_english_text(model.tokenizer, cfg.context_size, prepend_bos=cfg.prepend_bos, split="train")
            cfg.is_dataset_tokenized = True
            text = shard_dataset(text)
        elif world_size() > 1 and not getattr(cfg, "use_cached_activations", False):  # each rank its own shard
            text = load_shard(
                cfg.dataset_path, streaming=cfg.streaming, trust_remote_code=cfg.dataset_trust_remote_code
            )
    return model, text
