"""The embedding path: `train_on_activations` (and `sae-lens train --activations`) trains any registered
architecture on precomputed activation vectors with SAE-Lens' own `SAETrainer`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sae_lens.config import LoggingConfig, SAETrainerConfig
from sae_lens.constants import SPARSITY_FILENAME
from sae_lens.saes.sae import TrainingSAE, TrainingSAEConfig
from sae_lens.training.sae_trainer import SAETrainer
from safetensors.torch import save_file

from softsae_plugin.checks import check_finite
from softsae_plugin.collectives import is_main
from softsae_plugin.training import data_parallel
from softsae_plugin.training.activations import (
    ActivationSource,
    MappedRows,
    batches,
    map_activations,
    split_heldout,
)
from softsae_plugin.training.guards import (
    FiniteBatches,
    atomic_folder,
    check_checkpoint,
    check_replaceable,
    continue_from_checkpoint,
    guard_trainer,
    sample_share,
)
from softsae_plugin.training.runs import fit_quietly_and_in_order, with_run_length
from softsae_plugin.training.summary import print_summary, summarise_saved, training_statistics, write_summary

# The share of a matrix of activations held out for the summary when no `eval_activations` are given.
HELDOUT_FRACTION = 0.1
# The summary measures at most this many held-out vectors.
SUMMARY_INPUTS = 65_536


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
    heldout_fraction: float = HELDOUT_FRACTION,
    skip_nonfinite_rows: bool = False,
    resume_from: str | Path | None = None,
) -> TrainingSAE[Any]:
    """Train an SAE of any registered architecture on precomputed activations with SAE-Lens' `SAETrainer`.

    `activations` is a (n, d_in) tensor or array, an iterable of batches, or a file (.npy, .safetensors,
    or a folder written by `datasets.Dataset.save_to_disk`). The run is deterministic given `seed`. The
    returned SAE takes raw activations (SAE-Lens folds its normalisation into the weights). With
    `output_path`, the inference SAE and the feature-sparsity file are written there, as one folder that appears
    whole, and then a training summary (FVE, L0, k_hat histogram) measured on held-out data: `eval_activations`,
    or else a random `heldout_fraction` of a matrix's rows, kept out of training for the summary's sake (0 trains
    on every row and measures on training data, labelled so), or the batches that follow training in an
    iterable's stream; without `output_path` every row trains. A batch
    holding NaN or inf stops the run with an error, unless `skip_nonfinite_rows` drops those rows (counted in the
    summary). Checkpoints appear whole, and `resume_from` (a checkpoint folder of a run with the same arguments)
    continues that run exactly where it stopped: same weights as an uninterrupted run of the same seed, also on
    another number of data-parallel ranks (the data position is counted in global batches).
    """
    for name, value in (("batch_size", batch_size), ("training_steps", training_steps)):
        if value <= 0:
            raise ValueError(f"train_on_activations: {name}={value} is invalid; expected a positive integer")
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
    return train_with_trainer_config(
        activations,
        sae_cfg,
        trainer_cfg,
        seed=seed,
        progress=progress,
        output_path=output_path,
        eval_activations=eval_activations,
        heldout_fraction=heldout_fraction,
        skip_nonfinite_rows=skip_nonfinite_rows,
        resume_from=resume_from,
    )


def train_with_trainer_config(
    activations: ActivationSource,
    sae_cfg: TrainingSAEConfig,
    trainer_cfg: SAETrainerConfig,
    *,
    seed: int = 0,
    progress: bool = True,
    output_path: str | Path | None = None,
    eval_activations: ActivationSource | None = None,
    heldout_fraction: float = HELDOUT_FRACTION,
    skip_nonfinite_rows: bool = False,
    resume_from: str | Path | None = None,
) -> TrainingSAE[Any]:
    """`train_on_activations` with every trainer option in SAE-Lens' own `SAETrainerConfig` (what the runner's
    `to_sae_trainer_config()` gives `sae-lens train --activations`)."""
    if not 0 <= heldout_fraction < 1:
        raise ValueError(f"heldout_fraction={heldout_fraction} is invalid; expected a fraction in [0, 1)")
    activations = _as_matrix(activations)
    eval_activations = None if eval_activations is None else _as_matrix(eval_activations)
    batch_size = trainer_cfg.train_batch_size_samples
    is_matrix = isinstance(activations, (torch.Tensor, MappedRows))
    holding_out = output_path is not None and eval_activations is None and heldout_fraction > 0
    if holding_out and is_matrix:
        activations, eval_activations = split_heldout(activations, heldout_fraction, seed=seed)
        eval_data = f"held out: a random {heldout_fraction:.0%} of the activation rows, never trained on"
    elif eval_activations is not None:
        eval_data = "held out: the eval_activations given"
    elif is_matrix:
        eval_data = "training data (heldout_fraction=0: no rows were held out)"
    else:
        eval_data = "held out: the batches that follow training in the activation stream"
    torch.manual_seed(seed)
    sae_cfg = with_run_length(sae_cfg, trainer_cfg.total_training_steps)
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
    sae = TrainingSAE.from_dict(dataclasses.replace(sae_cfg, device=trainer_cfg.device).to_dict())
    # Data-parallel: every rank draws the same global batches and trains on its own slice of each (of a matrix, it
    # reads only the rows of its slice from a mapped file).
    share = data_parallel.shard if is_matrix else None
    data = batches(activations, batch_size, seed=seed, start=guard_state.get("batches_drawn", 0), share=share)
    trainer = SAETrainer(
        cfg=data_parallel.per_rank(trainer_cfg, skip_nonfinite_rows),
        sae=sae,
        data_provider=data if is_matrix else map(data_parallel.shard, data),
    )
    if resume_from is not None:
        # What SAE-Lens' runner does for resume_from_checkpoint; the data position is restored above.
        trainer.load_trainer_state(resume_from)
        sae.load_weights_from_checkpoint(resume_from)
        continue_from_checkpoint(trainer, saved_share=sample_share(guard_state))
    guard = guard_trainer(trainer, skip_nonfinite_rows=skip_nonfinite_rows, guard_state=guard_state)
    data_parallel.data_parallel(trainer)
    with fit_quietly_and_in_order(trainer, progress=progress):
        sae = trainer.fit()
    if not is_main():
        return sae
    if output_path is None:
        return sae
    check_finite(sae.state_dict(), f"refusing to save the trained SAE to {output_path}")
    with atomic_folder(output_path) as staged:  # the SAE first: a summary that fails cannot lose it
        sae.save_inference_model(staged)
        save_file({"sparsity": trainer.log_feature_sparsity}, staged / SPARSITY_FILENAME)
    if isinstance(eval_activations, MappedRows):  # read now, on the rank that measures
        eval_activations = eval_activations.take(torch.arange(min(SUMMARY_INPUTS, eval_activations.shape[0]))).rows()
    if isinstance(eval_activations, torch.Tensor):  # every held-out row once, in order
        eval_source: Iterator[torch.Tensor] = iter(eval_activations[:SUMMARY_INPUTS].split(batch_size))
    else:
        if eval_activations is None and is_matrix:  # the whole batches that follow training (not this rank's share)
            eval_source = batches(activations, batch_size, seed=seed, start=guard.batches_drawn)
        elif eval_activations is None:
            eval_source = iter(data)
        else:
            eval_source = batches(eval_activations, batch_size, seed=seed + 1)
        # Every stream here is endless (or as long as the caller's): the summary reads SUMMARY_INPUTS rows of it.
        eval_source = islice(eval_source, max(1, SUMMARY_INPUTS // batch_size))
    eval_batches = FiniteBatches(eval_source, lambda: "the evaluation after training", skip_rows=skip_nonfinite_rows)
    try:
        summary, k_hat = summarise_saved(output_path, eval_batches, trainer, eval_data=eval_data)
    except ValueError as err:  # a one-shot stream that ended with training: the SAE is saved, the summary is not
        summary, k_hat = {"eval_data": f"none ({err})", **training_statistics(trainer)}, None
        print(f"train_on_activations: saved the SAE to {output_path}, but measured no held-out data: {err}")
    summary["nonfinite_rows_skipped"] = guard.rows_skipped
    summary.update(data_parallel.global_scale(trainer.cfg.train_batch_size_samples, trainer.cfg.total_training_samples))
    write_summary(summary, k_hat, output_path)
    if progress and "fve" in summary:
        print_summary(summary)
    return sae


def _as_matrix(source: ActivationSource) -> ActivationSource:
    # Files become mapped matrices where their format allows (tensors otherwise), arrays become tensors; an iterable
    # of batches stays what it is.
    if isinstance(source, (str, Path)):
        return map_activations(source)
    return torch.from_numpy(source) if isinstance(source, np.ndarray) else source
