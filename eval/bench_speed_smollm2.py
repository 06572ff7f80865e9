"""bench_speed.py's sections on SmolLM2-135M activations: the k head's quality (paper head, cheap head, TopK) and
how often soft_topk's fast path falls back to the full sort."""

from __future__ import annotations

import json
import math
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from bench_speed_settings import CHEAP_HEAD, LABELS, write_csv
from lab.activations import smollm2_activations
from lab.timing import load_average
from sae_lens.saes.sae import TrainingSAEConfig
from sae_lens.saes.topk_sae import TopKTrainingSAEConfig
from tqdm.auto import tqdm

from softsae_plugin import lapsum
from softsae_plugin.softsae import SoftTrainingSAEConfig

SMOLLM2_HOOK = "blocks.6.hook_resid_post"  # configs/quickstart.yaml's hook
QUALITY_D_SAE, QUALITY_K, QUALITY_K_MAX = 2304, 32, 64  # configs/quickstart.yaml's SAE


class FallbackCounter:
    """Counts, while active, the rows lapsum's fast path solved and the rows it handed to the full sort."""

    def __init__(self) -> None:
        self.rows = 0
        self.fallback_rows = 0
        self.calls = 0
        self._solve = lapsum._solve

    def _spy(self, x: torch.Tensor, k: torch.Tensor, tau: torch.Tensor, *args: Any) -> Any:
        weights, anchor, fallback = self._solve(x, k, tau, *args)
        self.calls += 1
        self.rows += x.shape[0]
        self.fallback_rows += fallback.numel()
        return weights, anchor, fallback

    def __enter__(self) -> FallbackCounter:
        lapsum._solve = self._spy
        return self

    def __exit__(self, *exc: object) -> None:
        lapsum._solve = self._solve


def quality_configs() -> dict[str, TrainingSAEConfig]:
    """The quickstart's SAE (d_in 576, d_sae 2304, k 32) with the paper head, the cheap head and as TopK."""
    common: dict[str, Any] = {"d_in": 576, "d_sae": QUALITY_D_SAE}
    return {
        "softsae_paper": SoftTrainingSAEConfig(**common, k=QUALITY_K, k_max=QUALITY_K_MAX),
        "softsae_cheap": SoftTrainingSAEConfig(**common, k=QUALITY_K, k_max=QUALITY_K_MAX, k_head_hidden=CHEAP_HEAD),
        "topk": TopKTrainingSAEConfig(**common, k=QUALITY_K),
    }


def bench_smollm2(
    quick: bool, out_dir: Path, run_dir: Path | None
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Sections 3-4: train the paper head, the cheap head and TopK on SmolLM2 activations (embedding path),
    compare quality, and count the fast path's fallbacks in training and on held-out codes vs Gaussian scores."""
    from sae_lens import SAE

    from softsae_plugin import train_on_activations

    n_tokens, steps, batch = (4096, 30, 128) if quick else (32768, 200, 256)
    load_start = load_average()
    acts = smollm2_activations(n_tokens, SMOLLM2_HOOK)
    n_eval = max(512, acts.shape[0] // 8)
    train_acts, eval_acts = acts[:-n_eval], acts[-n_eval:]
    quality: list[dict[str, Any]] = []
    fallback: list[dict[str, Any]] = []
    trained: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, cfg in tqdm(quality_configs().items(), desc="quality runs (embedding path)", unit="SAE"):
            with FallbackCounter() as counter:
                start = time.perf_counter()
                sae = train_on_activations(
                    train_acts,
                    cfg,
                    batch_size=batch,
                    training_steps=steps,
                    lr=1e-3,
                    lr_warm_up_steps=steps // 20,
                    seed=0,
                    progress=False,
                    n_batches_for_norm_estimate=8,
                    dead_feature_window=steps // 3,
                    feature_sampling_window=steps // 3,
                    output_path=Path(tmp) / name,
                    eval_activations=eval_acts,
                )
                seconds = time.perf_counter() - start
            trained[name] = sae
            summary = json.loads((Path(tmp) / name / "training_summary.json").read_text())
            k_hat = summary.get("k_hat", {})
            quality.append(
                {
                    "model": name,
                    "label": LABELS[name],
                    "k_head_hidden": getattr(cfg, "k_head_hidden", None) or (QUALITY_D_SAE if "soft" in name else ""),
                    "train_tokens": int(train_acts.shape[0]),
                    "eval_tokens": int(eval_acts.shape[0]),
                    "steps": steps,
                    "batch": batch,
                    "fve": summary["fve"],
                    "mean_l0": summary["mean_l0"],
                    "k_hat_mean": k_hat.get("mean", ""),
                    "k_hat_std": k_hat.get("std", ""),
                    "k_hat_iqr_over_k": k_hat.get("iqr_over_k", ""),
                    "k_hat_near_k_max": k_hat.get("share_near_k_max", ""),
                    "dead_fraction": summary.get("dead_fraction", ""),
                    "train_seconds": seconds,
                }
            )
            if counter.rows:
                fallback.append(
                    {
                        "scores": f"{LABELS[name]}: codes during training (soft phase, tau annealed)",
                        "tau": "schedule",
                        "rows": counter.rows,
                        "fallback_rows": counter.fallback_rows,
                        "rate": counter.fallback_rows / counter.rows,
                    }
                )
        if run_dir is not None:
            source, sae = f"SoftSAE from {run_dir}", SAE.load_from_disk(str(run_dir))
        else:
            source, sae = LABELS["softsae_paper"] + " trained above", trained["softsae_paper"]
        fallback += held_out_fallback(sae, eval_acts, source)
    for row in quality:
        row["load_start"] = load_start
    write_csv("quality", quality, out_dir)
    write_csv("fallback", fallback, out_dir)
    return quality, fallback


@torch.no_grad()
def held_out_fallback(sae: Any, x: torch.Tensor, source: str) -> list[dict[str, Any]]:
    """Fallback rates of the fast path (k_max + 16 candidates) on a SoftSAE's ReLU codes of held-out inputs, at
    k = its own k_hat, against Gaussian scores of the same shape and k, at the schedule's temperatures."""
    x = x.to(sae.device, sae.dtype)
    codes = torch.relu(sae.process_sae_in(x) @ sae.W_enc + sae.b_enc).float()
    k_hat = sae.predict_k(x).float()
    gaussian = torch.randn(codes.shape, generator=torch.Generator(device=codes.device).manual_seed(0))
    defaults = SoftTrainingSAEConfig(d_in=2, d_sae=4, k=1)
    paper_tau = 1e-4 * math.sqrt(sae.cfg.d_in)  # the paper's 1e-4 on unit-norm inputs, in SAE-Lens' units
    out = []
    for label, scores in ((f"{source}: held-out codes", codes), ("Gaussian scores, same shape and k", gaussian)):
        for tau in (defaults.tau_start, defaults.tau, paper_tau):
            _, _, fallback = lapsum._solve(scores, k_hat, torch.tensor(float(tau)), "auto", 16)
            out.append(
                {
                    "scores": label,
                    "tau": tau,
                    "rows": scores.shape[0],
                    "fallback_rows": fallback.numel(),
                    "rate": fallback.numel() / scores.shape[0],
                    "zeros_per_row": float((scores == 0).float().sum(-1).mean()),
                }
            )
    return out
