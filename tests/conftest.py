"""Helpers shared by the test modules."""

import json
import math
from pathlib import Path

import pytest
import torch
from sae_lens.constants import SAE_CFG_FILENAME, SAE_WEIGHTS_FILENAME
from safetensors.torch import load_file, save_file


def damage_sae_files(folder: Path, how: str) -> bool:
    """Damage the cfg.json or weights of the SAE folder `folder` in place, as `how` says; False for an unknown `how`."""
    weights, cfg = folder / SAE_WEIGHTS_FILENAME, folder / SAE_CFG_FILENAME
    if how == "truncated weights":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif how == "nan weights":
        tensors = load_file(weights)
        tensors["W_dec"][0, 0] = math.nan
        save_file(tensors, weights)
    elif how == "no weights":
        weights.unlink()
    elif how == "cfg not json":
        cfg.write_text(cfg.read_text()[:20])
    elif how.startswith("architecture "):
        cfg.write_text(json.dumps({**json.loads(cfg.read_text()), "architecture": how.split()[1]}))
    else:
        return False
    return True


@pytest.fixture
def damage_sae():
    """`damage_sae_files`, for tests that break an SAE folder on purpose."""
    return damage_sae_files


@pytest.fixture(scope="module")
def single_thread():
    """One intra-op thread for a module of many small ops, which extra threads slow down on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
