"""What `sae-lens show` reads off the SAEs: per token (or per input) k_hat or L0, the kept features and their
activations, and each feature's top tokens, gathered into the page's plain data (`page.PageData`).

Every number comes from the SAE's own inference API: `sae.encode` for the codes and, for SoftSAE,
`sae.predict_k` for k_hat, applied to the model's activations at the SAE's hook.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from sae_lens import SAE
from sae_lens.load_model import load_model
from sae_lens.util import extract_stop_at_layer_from_tlens_hook_name
from tqdm.auto import tqdm

import softsae_plugin  # noqa: F401  (registers softsae, so SAE.load_from_disk reads its folders)
from softsae_plugin.show.page import PageData, Row
from softsae_plugin.training.guards import check_sae_folder

# Features listed per token: a SoftSAE keeps at most k_max, but a ReLU SAE may keep hundreds; the page lists the
# largest and says how many there are.
MAX_FEATURES = 64
# Tokens listed per feature as its top activations in the text.
TOP_PER_FEATURE = 5
# Rows of an activation file encoded at once.
ACTIVATION_CHUNK = 4096


def load_sae(folder: str | Path, device: str = "cpu") -> SAE[Any]:
    """Load the inference SAE of a run folder (cfg.json and weights, as `sae-lens train` writes them), checked."""
    check_sae_folder(Path(folder), "RUN_DIR")
    return SAE.load_from_disk(str(folder), device=device).eval()


def sae_name(sae: SAE[Any], folder: str | Path) -> str:
    """A row's label: the architecture, its k (and k_max) when it has one, and the folder."""
    cfg = sae.cfg
    parts = [cfg.architecture()]
    if getattr(cfg, "k", None) is not None:
        parts.append(f"k={cfg.k:g}")
    if getattr(cfg, "k_max", None) is not None:
        parts.append(f"k_max={cfg.k_max}")
    return f"{' '.join(parts)} ({Path(folder).name})"


class Reading:
    """One SAE's reading of a stream of activations, added chunk by chunk, then turned into a page `Row`.

    For each input: the shaded value (k_hat from `predict_k` where the SAE has one, else L0), L0 (non-zero codes
    of `encode`), and the `max_features` largest codes; for each feature, its `top_per_feature` largest
    activations over every chunk.
    """

    def __init__(
        self, sae: SAE[Any], name: str, *, max_features: int = MAX_FEATURES, top_per_feature: int = TOP_PER_FEATURE
    ) -> None:
        self.sae, self.name = sae, name
        self.max_features, self.top_per_feature = max_features, top_per_feature
        self.has_k_hat = callable(getattr(sae, "predict_k", None))
        self.values: list[float] = []
        self.l0: list[int] = []
        self.features: list[list[int]] = []
        self.acts: list[list[float]] = []
        self._top_values: list[torch.Tensor] = []
        self._top_indices: list[torch.Tensor] = []

    @torch.no_grad()
    def add(self, activations: torch.Tensor) -> None:
        """Encode a (n, d_in) chunk of activations, the inputs that follow those added before."""
        offset = len(self.values)
        codes = self.sae.encode(activations)
        l0 = (codes != 0).sum(-1)
        values = self.sae.predict_k(activations) if self.has_k_hat else l0.float()
        kept = min(self.max_features, codes.shape[-1])
        # Largest by magnitude: the built-in architectures' codes are non-negative, but nothing promises it.
        magnitudes, order = codes.abs().topk(kept, dim=-1)
        kept_acts = codes.gather(-1, order)
        for row_mags, row_order, row_acts in zip(magnitudes.tolist(), order.tolist(), kept_acts.tolist(), strict=True):
            n_kept = sum(m > 0 for m in row_mags)
            self.features.append(row_order[:n_kept])
            self.acts.append(row_acts[:n_kept])
        self.values += values.float().tolist()
        self.l0 += l0.tolist()
        top = min(self.top_per_feature, codes.shape[0])
        top_values, top_indices = codes.topk(top, dim=0)
        self._top_values.append(top_values)
        self._top_indices.append(top_indices + offset)

    def row(self) -> Row:
        """The page row of everything added: each feature kept by some input gets its top activations."""
        values = torch.cat(self._top_values)
        indices = torch.cat(self._top_indices)
        top_values, where = values.topk(min(self.top_per_feature, values.shape[0]), dim=0)
        top_indices = indices.gather(0, where)
        listed = sorted({f for features in self.features for f in features})
        top: dict[int, list[tuple[int, float]]] = {}
        for f in listed:
            pairs = zip(top_indices[:, f].tolist(), top_values[:, f].tolist(), strict=True)
            top[f] = [(i, a) for i, a in pairs if a > 0]
        return Row(
            name=self.name,
            measure="k_hat" if self.has_k_hat else "L0",
            values=self.values,
            l0=self.l0,
            features=self.features,
            acts=self.acts,
            top=top,
            k_max=getattr(self.sae.cfg, "k_max", None),
        )


def _metadata(sae: SAE[Any], folder: str | Path, field: str) -> Any:
    value = sae.cfg.metadata.get(field)
    if value is None:
        raise ValueError(
            f"{Path(folder) / 'cfg.json'}: metadata.{field} is missing, so the model the SAE reads is unknown; "
            "an SAE trained on a file of activations is shown with --activations FILE"
        )
    return value


def _stop_layer(hooks: Sequence[str]) -> int | None:
    # The model runs only up to the deepest hook (all of it when a hook is not a block's).
    stops = [extract_stop_at_layer_from_tlens_hook_name(hook) for hook in hooks]
    return None if any(stop is None for stop in stops) else max(stop for stop in stops if stop is not None)


def _readings(saes: Sequence[SAE[Any]], folders: Sequence[str | Path], max_features: int) -> list[Reading]:
    return [Reading(sae, sae_name(sae, f), max_features=max_features) for sae, f in zip(saes, folders, strict=True)]


def load_model_for(saes: Sequence[SAE[Any]], folders: Sequence[str | Path], device: str = "cpu") -> Any:
    """Build the language model the SAEs read (one model for all, from their cfg.json metadata), up to the deepest
    hook: offline for the models this package builds locally (`is_local_model`), else through SAE-Lens' loader."""
    from softsae_plugin.offline.smollm2 import is_local_model, load_local_model

    names = {_metadata(sae, folder, "model_name") for sae, folder in zip(saes, folders, strict=True)}
    if len(names) > 1:
        raise ValueError(f"the SAEs read different models ({sorted(names)}); a page shows SAEs of one model")
    name = names.pop()
    if is_local_model(name):
        hooks = [_metadata(sae, folder, "hook_name") for sae, folder in zip(saes, folders, strict=True)]
        return load_local_model(name, first_n_layers=_stop_layer(hooks), device=device)
    metadata = saes[0].cfg.metadata
    return load_model(
        metadata.get("model_class_name") or "HookedTransformer",
        name,
        device=device,
        model_from_pretrained_kwargs=metadata.get("model_from_pretrained_kwargs") or {},
    )


def token_chunks(model: Any, texts: Iterable[str], context_size: int, prepend_bos: bool) -> list[list[int]]:
    """Each text's token ids, split into pieces that fit `context_size` with the BOS token the SAE was trained
    behind (when `prepend_bos`); a piece does not see the text of the piece before it."""
    room = context_size - 1 if prepend_bos else context_size
    chunks = []
    for text in texts:
        ids = model.tokenizer(text, add_special_tokens=False)["input_ids"]
        chunks += [ids[start : start + room] for start in range(0, len(ids), room)]
    return chunks


@torch.no_grad()
def collect_text(
    folders: Sequence[str | Path],
    texts: Sequence[str],
    *,
    device: str = "cpu",
    max_features: int = MAX_FEATURES,
    model: Any = None,
    title: str | None = None,
) -> PageData:
    """Run the SAEs' model over `texts` and read every SAE at its hook: the page data of the text, one row per SAE.

    The model and hooks come from each SAE's cfg.json metadata (`model` may be given to reuse one already built).
    Each text is one paragraph of the page; texts longer than the SAE's context_size are split. The BOS token
    (prepended when the SAE was trained with it) feeds the model but is not shown: SAEs are usually trained
    without it, and its activations are far from the text's.
    """
    if not texts or not any(text.strip() for text in texts):
        raise ValueError("show: no text to show (the texts given are empty)")
    saes = [load_sae(folder, device) for folder in folders]
    model = model if model is not None else load_model_for(saes, folders, device)
    metadata = saes[0].cfg.metadata
    hooks = [_metadata(sae, folder, "hook_name") for sae, folder in zip(saes, folders, strict=True)]
    prepend_bos = metadata.get("prepend_bos", True) is not False
    context_size = int(metadata.get("context_size") or 128)
    stop = _stop_layer(hooks)
    readings = _readings(saes, folders, max_features)
    tokens: list[str] = []
    doc_starts: list[int] = []
    bos = model.tokenizer.bos_token_id
    for ids in tqdm(token_chunks(model, [t for t in texts if t.strip()], context_size, prepend_bos), desc="show"):
        if not ids:
            continue
        doc_starts.append(len(tokens))
        inputs = torch.tensor([[bos, *ids] if prepend_bos else ids], device=device)
        _, cache = model.run_with_cache(inputs, names_filter=hooks, stop_at_layer=stop)
        for reading, hook in zip(readings, hooks, strict=True):
            reading.add(cache[hook][0, 1:] if prepend_bos else cache[hook][0])
        tokens += [model.tokenizer.decode([i]) for i in ids]
    hook_text = ", ".join(sorted(set(hooks)))
    return PageData(
        title=title or f"{metadata.get('model_name')} at {hook_text}: features per token",
        tokens=tokens,
        rows=[reading.row() for reading in readings],
        doc_starts=doc_starts,
        notes=[f"Activations of {metadata.get('model_name')} at {hook_text}; the BOS token is not shown."]
        if prepend_bos
        else [],
    )


@torch.no_grad()
def collect_activations(
    folders: Sequence[str | Path],
    activations: torch.Tensor,
    texts: Sequence[str],
    *,
    device: str = "cpu",
    max_features: int = MAX_FEATURES,
    title: str | None = None,
) -> PageData:
    """Read the SAEs on a (n, d_in) matrix of activations, one input per row, labelled by `texts` (one per row):
    the page data of the inputs, listed in order of the first SAE's k_hat (or L0), lowest first."""
    if activations.ndim != 2:
        raise ValueError(f"--activations: expected a (rows, d_in) matrix, got shape {tuple(activations.shape)}")
    if len(texts) != activations.shape[0]:
        raise ValueError(
            f"--text has {len(texts)} lines for {activations.shape[0]} activation rows; expected one text per row"
        )
    saes = [load_sae(folder, device) for folder in folders]
    for sae, folder in zip(saes, folders, strict=True):
        if sae.cfg.d_in != activations.shape[1]:
            raise ValueError(
                f"{folder}: the SAE reads d_in={sae.cfg.d_in}, "
                f"but the activation rows have {activations.shape[1]} values"
            )
    readings = _readings(saes, folders, max_features)
    for start in tqdm(range(0, activations.shape[0], ACTIVATION_CHUNK), desc="show"):
        chunk = activations[start : start + ACTIVATION_CHUNK].to(device=device, dtype=torch.float32)
        for reading in readings:
            reading.add(chunk)
    rows = [reading.row() for reading in readings]
    first = rows[0].values
    return PageData(
        title=title or f"{len(texts):,} inputs by {rows[0].measure}",
        tokens=list(texts),
        rows=rows,
        doc_starts=list(range(len(texts))),
        mode="inputs",
        order=sorted(range(len(texts)), key=lambda i: (first[i], i)),
    )
