"""Loading SAE folders: a SoftSAE checkpoint loads in any script (softsae_plugin_autoload), and a damaged folder or
an unregistered architecture is a clear error in every command that reads SAEs, before anything else runs."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from sae_lens import SAE
from sae_lens.saes.sae import SAEMetadata

from softsae_plugin import SoftSAE, SoftSAEConfig
from softsae_plugin.evaluate import main as eval_main
from softsae_plugin.hub.push import main as push_main
from softsae_plugin.training.guards import check_sae_folder

LOAD_WITHOUT_IMPORT = """
import sys
import torch
from sae_lens import SAE, TrainingSAE
folder, x_path, out = sys.argv[1:]
assert "softsae_plugin" not in sys.modules
sae = SAE.load_from_disk(folder)
assert "softsae_plugin" in sys.modules  # imported by the registry lookup, not by this script
training = TrainingSAE.load_from_disk(folder)
torch.save({"type": type(sae).__name__, "training_type": type(training).__name__,
            "codes": sae.encode(torch.load(x_path))}, out)
"""


@pytest.fixture
def softsae_folder(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    cfg = SoftSAEConfig(
        d_in=16, d_sae=64, k=4, metadata=SAEMetadata(model_name="m", hook_name="blocks.0.hook_resid_post")
    )
    sae = SoftSAE(cfg)
    with torch.no_grad():
        for p in sae.parameters():
            p.normal_()
    sae.save_model(tmp_path / "soft")
    return tmp_path / "soft"


def test_softsae_checkpoint_loads_without_importing_the_plugin(softsae_folder: Path, tmp_path: Path) -> None:
    x = torch.randn(8, 16)
    torch.save(x, tmp_path / "x.pt")
    result = subprocess.run(
        [sys.executable, "-c", LOAD_WITHOUT_IMPORT, str(softsae_folder), str(tmp_path / "x.pt"),
         str(tmp_path / "o.pt")],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    loaded = torch.load(tmp_path / "o.pt", weights_only=True)
    assert loaded["type"] == "SoftSAE" and loaded["training_type"] == "SoftTrainingSAE"
    assert torch.equal(loaded["codes"], SAE.load_from_disk(softsae_folder).encode(x))


DAMAGE = [
    ("truncated weights", r"sae_weights.safetensors cannot be read safely \(SafetensorError"),
    ("nan weights", r"sae_weights.safetensors is unusable: W_dec has 1 of 1024 values NaN"),
    ("cfg not json", r"cfg.json cannot be read safely \(JSONDecodeError"),
    ("architecture adaptive_magic", r"architecture='adaptive_magic', which SAE-Lens has not registered; expected one"),
    ("no weights", r"has no sae_weights.safetensors; expected an SAE folder"),
]


@pytest.mark.parametrize(("how", "message"), DAMAGE)
def test_a_damaged_sae_folder_is_a_clear_error(softsae_folder: Path, damage_sae, how: str, message: str) -> None:
    damage_sae(softsae_folder, how)
    with pytest.raises(ValueError, match=message):
        check_sae_folder(softsae_folder, "loading")


@pytest.mark.parametrize(("how", "message"), DAMAGE[:2])
def test_eval_and_push_refuse_a_damaged_sae_first(softsae_folder, damage_sae, tmp_path, capsys, how, message) -> None:
    damage_sae(softsae_folder, how)
    with pytest.raises(SystemExit) as exit_info:
        eval_main(["--sae", str(softsae_folder), "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert re.search("sae-lens eval: error: --sae: .*" + message, capsys.readouterr().err)
    assert not (tmp_path / "out").exists()
    with pytest.raises(SystemExit):
        push_main([str(softsae_folder), "--repo-id", "user/name"])
    assert re.search("sae-lens push: error: checkpoint: .*" + message, capsys.readouterr().err)


def test_sae_lens_names_an_unregistered_architecture(softsae_folder: Path, damage_sae) -> None:
    damage_sae(softsae_folder, "architecture adaptive_magic")
    with pytest.raises(KeyError, match=r"no inference class for architecture 'adaptive_magic'.*registered: \["):
        SAE.load_from_disk(softsae_folder)


@pytest.mark.parametrize("hard_phase", [False, True])
def test_a_training_checkpoint_loads_back_as_the_training_sae(tmp_path: Path, hard_phase: bool) -> None:
    # SAE-Lens' disk loader casts every tensor to the SAE's dtype; the training flags must come back as booleans
    # (a float k_head_frozen made every encode fail) and the loaded SAE must encode as the saved one did.
    from sae_lens.saes.sae import TrainingSAE

    from softsae_plugin import SoftTrainingSAE, SoftTrainingSAEConfig

    torch.manual_seed(0)
    sae = SoftTrainingSAE(SoftTrainingSAEConfig(d_in=16, d_sae=64, k=4, total_training_steps=100))
    with torch.no_grad():
        sae.b_dec.normal_()
    if hard_phase:
        sae._freeze_k_head()
        with torch.no_grad():
            sae.b_dec.add_(1.0)  # the frozen k head keeps reading its snapshot, not the moved b_dec
    sae.save_model(tmp_path / "checkpoint")
    loaded = TrainingSAE.load_from_disk(tmp_path / "checkpoint")
    assert loaded.k_head_frozen.dtype == torch.bool and bool(loaded.k_head_frozen) == hard_phase
    x = torch.randn(8, 16)
    sae.eval()
    loaded.eval()
    assert torch.equal(loaded.encode(x), sae.encode(x))
    assert torch.equal(loaded.predict_k(x), sae.predict_k(x))
