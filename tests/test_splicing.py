"""A SoftSAE spliced into the real SmolLM2-135M with SAE-Lens' HookedSAETransformer."""

import pytest
import torch
from sae_lens import HookedSAETransformer

from softsae_plugin import SoftSAE, SoftSAEConfig
from softsae_plugin.offline.smollm2 import load_smollm2

HOOK = "blocks.1.hook_resid_post"


@pytest.mark.slow
def test_run_with_saes_fires_softsae_hooks_with_per_token_k():
    base = load_smollm2(first_n_layers=3)
    model = HookedSAETransformer(base.cfg, tokenizer=base.tokenizer)
    model.load_state_dict(base.state_dict())
    torch.manual_seed(0)
    sae = SoftSAE(SoftSAEConfig(d_in=576, d_sae=1024, k=8))
    with torch.no_grad():
        sae.w_k_out.normal_(0, 0.3)  # spread k_hat so tokens get different k
    sae.cfg.metadata.hook_name = HOOK
    tokens = model.to_tokens("The quick brown fox jumps over the lazy dog near the river bank.")
    clean = model(tokens)
    spliced, cache = model.run_with_cache_with_saes(tokens, saes=[sae])
    assert not torch.allclose(clean, spliced)
    codes = cache[f"{HOOK}.hook_sae_acts_post"]
    resid = cache[f"{HOOK}.hook_sae_input"]
    expected = sae.predict_k(resid).round().clamp(1, sae.cfg.k_max)
    assert codes.shape == (*tokens.shape, 1024)
    assert torch.equal((codes != 0).sum(-1).float(), expected)
    assert expected.unique().numel() > 1
