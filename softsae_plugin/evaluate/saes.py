"""The SAEs to evaluate: loaded from checkpoint folders or SAE-Lens releases, checked, given unit-norm decoder rows
as SAEBench expects, and the language model they read.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from sae_bench.sae_bench_utils.general_utils import get_results_filepath  # bound before `saebench_outputs` wraps it
from sae_lens import SAE

import softsae_plugin  # noqa: F401  (registers softsae, so SoftSAE checkpoints load)
from softsae_plugin.evaluate.evals import UNIT_NORM_ATOL, UNIT_ROWS, EvalError
from softsae_plugin.offline.smollm2 import is_local_model, load_local_model
from softsae_plugin.training.guards import check_sae_folder
from softsae_plugin.training.summary import SUMMARY_FILENAME


@dataclasses.dataclass
class SAESpec:
    """One SAE to evaluate: a checkpoint folder, or an SAE-Lens release and SAE id (`RELEASE:SAE_ID`)."""

    name: str
    checkpoint: Path | None = None
    release: str | None = None
    sae_id: str | None = None
    sae: SAE[Any] | None = None
    training_summary: dict[str, Any] = dataclasses.field(default_factory=dict)
    decoder: str = ""  # what SAEBench is given: unit rows, rows folded to unit norm, or a warning (prepare_decoder)

    def selection(self) -> tuple[str, SAE[Any] | str]:
        """The (name, SAE object) or (release, SAE id) pair SAEBench's `run_eval` takes."""
        if self.sae is not None:
            return self.name, self.sae
        assert self.release is not None and self.sae_id is not None
        return self.release, self.sae_id

    def result_path(self, eval_dir: Path, seed_offset: int) -> Path:
        """Where SAEBench writes this SAE's result of the `seed_offset`-th seed in `eval_dir` (SAEBench names custom
        SAEs 'custom_sae'; `sae-lens eval` adds the seed, see `seeded_results_filepath`)."""
        release, sae_id = (self.name, "custom_sae") if self.sae is not None else self.selection()
        return Path(seeded_results_filepath(str(eval_dir), release, str(sae_id), seed_offset))


def seeded_results_filepath(output_path: str, sae_release: str, sae_id: str, seed_offset: int) -> str:
    """SAEBench's result file name with the seed in it (`<release>_<sae id>_seed-N_eval_results.json`).

    SAEBench's graphing code keys each result by its file name: without the seed, the seeds' files of one SAE
    would share a key and be merged into one point.
    """
    return get_results_filepath(output_path, sae_release, f"{sae_id}_seed-{seed_offset}")


def _sae_names(paths: Sequence[Path]) -> list[str]:
    # Names must be unique (they name SAEBench's result files): the path below the folders they share.
    if len(paths) <= 1:
        return [path.name for path in paths]
    common = Path(os.path.commonpath([str(p) for p in paths]))
    return [str(p.relative_to(common)).replace(os.sep, "-") or p.name for p in paths]


def load_saes(specs: Sequence[str], device: str) -> list[SAESpec]:
    """Resolve `--sae` values: existing folders load as SAE objects, `RELEASE:SAE_ID` stays a Hub reference.

    Hub references are passed to SAEBench as (release, SAE id) so that SAEBench loads them its own way; a
    checkpoint's `training_summary.json` (written by `sae-lens train`) supplies its L0 and FVE.
    """
    local = [Path(s).resolve() for s in specs if Path(s).is_dir()]
    names = iter(_sae_names(local))
    out = []
    for spec in specs:
        if Path(spec).is_dir():
            path = Path(spec).resolve()
            summary_path = path / SUMMARY_FILENAME
            summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
            try:
                check_sae_folder(path, "--sae")
            except ValueError as err:
                raise EvalError(str(err)) from None
            sae = SAE.load_from_disk(str(path), device=device)
            out.append(SAESpec(name=next(names), checkpoint=path, sae=sae, training_summary=summary))
        elif ":" in spec and not Path(spec.split(":", 1)[0]).exists():
            release, sae_id = spec.split(":", 1)
            out.append(SAESpec(name=f"{release}_{sae_id}".replace("/", "_"), release=release, sae_id=sae_id))
        elif Path(spec).exists():
            raise EvalError(f"--sae {spec}: is a file; expected an SAE folder (cfg.json, sae_weights.safetensors)")
        else:
            raise EvalError(f"--sae {spec}: no such folder; expected an SAE folder or an SAE-Lens RELEASE:SAE_ID")
    for spec_ in out:
        prepare_decoder(spec_)
    return out


def prepare_decoder(spec: SAESpec) -> None:
    """Give SAEBench unit-norm decoder rows, which its absorption, SCR and TPP metrics assume, and record what was
    done in `spec.decoder`.

    Rows already of unit norm pass. Otherwise the SAE's own `fold_W_dec_norm` (SAE-Lens') moves the norms into the
    encoder, as SAEBench does for its releases; an architecture that refuses (SAE-Lens' TopK) is folded anyway
    when every row has the same norm, since scaling every code alike changes no selection. An SAE that cannot be
    folded is evaluated as it is, with a loud warning that travels with its numbers. Release SAEs are folded by
    SAEBench's own loader.
    """
    from softsae_plugin.softsae import shared_row_norm

    if spec.sae is None:
        spec.decoder = "folded by SAEBench's loader (release)"
        return
    W_dec = spec.sae.W_dec
    norms = W_dec.detach().float().norm(dim=-1)
    if bool(torch.allclose(norms, torch.ones_like(norms), atol=UNIT_NORM_ATOL)):
        spec.decoder = UNIT_ROWS
        return
    shared = shared_row_norm(W_dec)
    found = f"rows of norm {shared:.4g}" if shared is not None else f"row norms {norms.min():.4g} to {norms.max():.4g}"
    try:
        spec.sae.fold_W_dec_norm()
    except NotImplementedError:
        if shared is None:
            spec.decoder = (
                f"WARNING: decoder {found}, which {spec.sae.cfg.architecture()} cannot fold: SAEBench's absorption, "
                "SCR and TPP are measured off-scale for this SAE"
            )
            print(f"sae-lens eval: {spec.name}: {spec.decoder}", file=sys.stderr)
            return
        SAE.fold_W_dec_norm(spec.sae)  # the base class's fold, which the architecture's override refuses
    spec.decoder = f"folded to unit-norm rows before SAEBench ({found})"


def resolve_model(saes: Sequence[SAESpec], model: str | None) -> str:
    names = {s.name: s.sae.cfg.metadata.model_name for s in saes if s.sae is not None}
    if model is None:
        found = set(names.values())
        if len(found) != 1 or None in found:
            raise EvalError(f"pass --model: the checkpoints name the models {names}")
        return found.pop()
    wrong = {name: m for name, m in names.items() if m not in (None, model)}
    if wrong:
        raise EvalError(f"--model {model!r}, but these SAEs were trained on other models: {wrong}")
    return model


def hook_layer(sae: SAE[Any]) -> int:
    match = re.fullmatch(r"blocks\.(\d+)\.hook_resid_post", str(sae.cfg.metadata.hook_name))
    if match is None:
        raise EvalError(
            f"absorption reads SAEBench's first-letter probe at blocks.L.hook_resid_post; this SAE reads "
            f"{sae.cfg.metadata.hook_name!r}"
        )
    return int(match.group(1))


def build_model(model_name: str, saes: Sequence[SAESpec], dtype: str, device: str, *, logits: bool = False) -> Any:
    """The model the evals get, built once for all of them (and before seeding, so that every eval starts from the
    same RNG state whichever evals run together).

    A local id (e.g. smollm2-135m-instruct-q4_1) is built offline, with only the blocks up to the deepest hook
    unless `logits` are needed (the core and saelens evals splice the SAE in and compare the model's losses). Any
    other name is loaded exactly as SAEBench loads it, with TransformerLens' `from_pretrained_no_processing`.
    """
    if not is_local_model(model_name):
        from transformer_lens import HookedTransformer

        return HookedTransformer.from_pretrained_no_processing(model_name, device=device, dtype=getattr(torch, dtype))
    hooks = [str(s.sae.cfg.metadata.hook_name) if s.sae is not None else "" for s in saes]
    layers = [int(m.group(1)) for hook in hooks if (m := re.match(r"blocks\.(\d+)\.", hook))]
    first_n_layers = max(layers) + 1 if len(layers) == len(saes) and not logits else None
    return load_local_model(model_name, first_n_layers=first_n_layers, device=device, dtype=getattr(torch, dtype))
