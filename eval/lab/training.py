"""Training SAEs for the experiments: one SAE on activations in memory, loaded back as users load it, and a set of
SAEs, every architecture at the learning rate its own sweep picks."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from softsae_plugin import train_on_activations

from .saes import ARCHITECTURES, load_inference


def train_and_load(
    x: torch.Tensor,
    cfg: Any,
    folder: Path,
    *,
    steps: int,
    batch: int,
    lr: float,
    seed: int,
    window: int,
    norm_batches: int,
) -> tuple[Any, float]:
    """Train `cfg` on `x` through `train_on_activations` (SAE-Lens' SAETrainer; Adam, warm-up 5%, linear decay over
    the last 20%, dead-feature window `window` steps) and return SAE-Lens' inference model of it, saved to `folder`
    and loaded back, with the training's wall seconds."""
    start = time.perf_counter()
    sae = train_on_activations(
        x,
        cfg,
        batch_size=batch,
        training_steps=steps,
        lr=lr,
        lr_warm_up_steps=steps // 20,
        lr_decay_steps=steps // 5,
        seed=seed,
        progress=False,
        dead_feature_window=window,
        feature_sampling_window=window,
        n_batches_for_norm_estimate=norm_batches,
    )
    seconds = time.perf_counter() - start
    return load_inference(sae, folder), seconds


def learning_rate_then_k_sweep(
    train: Callable[[str, int, float], dict[str, Any]],
    lrs: Sequence[float],
    sweep_k: int,
    ks: Sequence[int],
    bar: tqdm,
    label: str,
) -> tuple[list[dict[str, Any]], dict[str, float], dict[tuple[str, int], dict[str, Any]]]:
    """Every architecture's learning-rate sweep at `sweep_k`, then its other `ks` at the rate whose run scored the
    best held-out FVE. `train(arch, k, lr)` trains and measures one SAE (a dict with its "arch", "k", "lr" and
    "summary"). Returns the sweep's runs, each architecture's rate, and (architecture, k) -> the run at that rate."""
    runs: list[dict[str, Any]] = []
    best_lr: dict[str, float] = {}
    for arch in ARCHITECTURES:
        sweep = []
        for lr in lrs:
            bar.set_postfix_str(f"{label} LR sweep {arch} lr={lr:g}")
            sweep.append(train(arch, sweep_k, lr))
            bar.update()
        best_lr[arch] = max(sweep, key=lambda r: r["summary"]["fve"])["lr"]
        runs += sweep
    main = {(r["arch"], r["k"]): r for r in runs if r["lr"] == best_lr[r["arch"]]}
    for arch in ARCHITECTURES:
        for k in ks:
            if (arch, k) not in main:
                bar.set_postfix_str(f"{label} {arch} k={k}")
                main[(arch, k)] = train(arch, k, best_lr[arch])
                bar.update()
    return runs, best_lr, main
