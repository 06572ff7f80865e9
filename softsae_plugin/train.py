"""Training entry points built on SAE-Lens: the embedding path and the schedule bookkeeping they share."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator
from contextlib import contextmanager
from itertools import islice
from pathlib import Path
from typing import Any

import torch
from sae_lens.config import LoggingConfig, SAETrainerConfig
from sae_lens.constants import SPARSITY_FILENAME
from sae_lens.saes.sae import TrainingSAE, TrainingSAEConfig
from sae_lens.training.sae_trainer import SAETrainer
from safetensors.torch import save_file

from softsae_plugin.activations import ActivationSource, batches, load_activations
from softsae_plugin.reliability import (
    FiniteBatches,
    atomic_folder,
    check_checkpoint,
    check_finite,
    check_replaceable,
    continue_from_checkpoint,
    guard_trainer,
)
from softsae_plugin.summary import print_summary, summarise, write_summary


def with_run_length(sae_cfg: TrainingSAEConfig, total_training_steps: int) -> TrainingSAEConfig:
    """Record the run's length in a config whose schedules need it (softsae); others pass unchanged."""
    if not hasattr(sae_cfg, "total_training_steps"):
        return sae_cfg
    return dataclasses.replace(sae_cfg, total_training_steps=total_training_steps)


@contextmanager
def _progress_bars(enabled: bool) -> Iterator[None]:
    # SAETrainer always draws its tqdm bar; tqdm honours TQDM_DISABLE, so a quiet run sets it briefly.
    previous = os.environ.get("TQDM_DISABLE")
    if not enabled:
        os.environ["TQDM_DISABLE"] = "1"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("TQDM_DISABLE", None)
        else:
            os.environ["TQDM_DISABLE"] = previous


def train_on_activations(
    activations: ActivationSource,
    sae_cfg: TrainingSAEConfig,
    *,
    batch_size: int,
    training_steps: int,
    lr: float = 3e-4,
    lr_warm_up_steps: int = 0,
    lr_decay_steps: int = 0,
    seed: int = 0,
    progress: bool = True,
    device: str = "cpu",
    autocast: bool = False,
    dead_feature_window: int = 1000,
    feature_sampling_window: int = 2000,
    n_batches_for_norm_estimate: int = 100,
    checkpoint_path: str | None = None,
    n_checkpoints: int = 0,
    output_path: str | Path | None = None,
    eval_activations: ActivationSource | None = None,
    skip_nonfinite_rows: bool = False,
    resume_from: str | Path | None = None,
) -> TrainingSAE[Any]:
    """Train an SAE of any registered architecture on precomputed activations with SAE-Lens' `SAETrainer`.

    `activations` is a (n, d_in) tensor or array, an iterable of batches, or a file (.npy, .safetensors,
    or a folder written by `datasets.Dataset.save_to_disk`). The run is deterministic given `seed`. The
    returned SAE takes raw activations (SAE-Lens folds its normalisation into the weights). With
    `output_path`, the inference SAE, the feature-sparsity file and a training summary (FVE, L0, k_hat
    histogram) measured on `eval_activations` (default: a fresh pass over `activations`) are written there,
    as one folder that appears whole. A batch holding NaN or inf stops the run with an error, unless
    `skip_nonfinite_rows` drops those rows (counted in the summary). Checkpoints appear whole, and
    `resume_from` (a checkpoint folder of a run with the same arguments) continues that run exactly where it
    stopped: same weights as an uninterrupted run of the same seed.
    """
    for name, value in (("batch_size", batch_size), ("training_steps", training_steps)):
        if value <= 0:
            raise ValueError(f"train_on_activations: {name}={value} is invalid; expected a positive integer")
    if isinstance(activations, (str, Path)):
        activations = load_activations(activations)
    torch.manual_seed(seed)
    sae_cfg = with_run_length(sae_cfg, training_steps)
    if output_path is not None:
        check_replaceable(output_path)
    guard_state: dict[str, int] = {}
    if resume_from is not None:
        guard_state = check_checkpoint(resume_from, sae_cfg, has_activations_store=False)
        if "batches_drawn" not in guard_state:
            raise ValueError(
                f"resume: {resume_from} was not written by train_on_activations (it has no data position); "
                "expected a checkpoint of this function or of `sae-lens train --activations`"
            )
    sae = TrainingSAE.from_dict(dataclasses.replace(sae_cfg, device=device).to_dict())
    trainer_cfg = SAETrainerConfig(
        total_training_samples=training_steps * batch_size,
        train_batch_size_samples=batch_size,
        lr=lr,
        lr_warm_up_steps=lr_warm_up_steps,
        lr_decay_steps=lr_decay_steps,
        lr_end=lr,
        device=device,
        autocast=autocast,
        dead_feature_window=dead_feature_window,
        feature_sampling_window=feature_sampling_window,
        n_checkpoints=n_checkpoints,
        checkpoint_path=checkpoint_path,
        logger=LoggingConfig(log_to_wandb=False),
        n_batches_for_norm_estimate=n_batches_for_norm_estimate,
    )
    data = batches(activations, batch_size, seed=seed, start=guard_state.get("batches_drawn", 0))
    trainer = SAETrainer(cfg=trainer_cfg, sae=sae, data_provider=data)
    if resume_from is not None:
        # What SAE-Lens' runner does for resume_from_checkpoint; the data position is restored above.
        trainer.load_trainer_state(resume_from)
        sae.load_weights_from_checkpoint(resume_from)
        continue_from_checkpoint(trainer)
    guard = guard_trainer(trainer, skip_nonfinite_rows=skip_nonfinite_rows, guard_state=guard_state)
    with _progress_bars(progress):
        sae = trainer.fit()
    if output_path is not None:
        check_finite(sae.state_dict(), f"refusing to save the trained SAE to {output_path}")
        with atomic_folder(output_path) as staged:
            sae.save_inference_model(staged)
            save_file({"sparsity": trainer.log_feature_sparsity}, staged / SPARSITY_FILENAME)
            eval_source = activations if eval_activations is None else eval_activations
            eval_batches = FiniteBatches(
                batches(eval_source, batch_size, seed=seed + 1),
                lambda: "the evaluation after training",
                skip_rows=skip_nonfinite_rows,
            )
            n_eval = max(1, min(50, 65_536 // batch_size))
            summary, k_hat = summarise(sae, islice(eval_batches, n_eval), trainer)
            summary["nonfinite_rows_skipped"] = guard.rows_skipped
            write_summary(summary, k_hat, staged)
        if progress:
            print_summary(summary)
    return sae
