"""`sae-lens train`: one run or a sweep, on a language model (SAE-Lens' runner) or on a file of activation vectors.

Every option of SAE-Lens' runner CLI (`python -m sae_lens.llm_sae_training_runner`) passes through unchanged; this
command adds `--config FILE.yaml`, the embedding path (`--activations PATH`), checked resumes, offline sources for
the model and text, and the summary every run writes.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

from sae_lens.config import LanguageModelSAERunnerConfig
from sae_lens.llm_sae_training_runner import _parse_cfg_args

from softsae_plugin.collectives import is_main
from softsae_plugin.training import data_parallel
from softsae_plugin.training.activations import map_activations
from softsae_plugin.training.config import (
    OWN_KEYS,
    apply_nulls,
    config_to_args,
    is_sweep_config,
    load_sweep_config,
    load_yaml_config,
)
from softsae_plugin.training.language_model import run_llm_training
from softsae_plugin.training.on_activations import train_with_trainer_config
from softsae_plugin.training.sweep import build_sweep, run_sweep, train_sweep_on_activations

# SAE-Lens logs to W&B unless told otherwise; an offline command should not try.
DEFAULT_ARGS = ["--log_to_wandb", "false"]


def main(argv: Sequence[str]) -> None:
    """Run `sae-lens train` with the arguments after the command name (see `--help`); under torchrun, a failure on
    one rank is named on every rank (`failures_named_on_every_rank`)."""
    with data_parallel.failures_named_on_every_rank():
        _train(argv)


def _train(argv: Sequence[str]) -> None:
    own = argparse.ArgumentParser(prog="sae-lens train", add_help=False)
    own.add_argument("--config", help="a YAML file of runner options (see configs/)")
    own.add_argument("--activations", help="train on a file of activation vectors instead of a language model")
    own.add_argument("--resume", help="continue the run that wrote this checkpoint folder")
    own.add_argument("--exact_resume", action="store_true")
    own.add_argument("--skip_nonfinite_rows", action="store_true")
    known, rest = own.parse_known_args(argv)
    if "-h" in rest or "--help" in rest:
        print(
            "sae-lens train [--config FILE.yaml] [--activations FILE] [--resume CHECKPOINT_DIR]\n"
            "               [--skip_nonfinite_rows] [SAE-Lens runner options]\n"
            "  --config FILE.yaml     options from a YAML file (keys are the option names below); the command\n"
            "                         line overrides them\n"
            "  --activations FILE     the embedding path: train on (n, d_in) vectors from .npy, .safetensors or\n"
            "                         a saved HF dataset; --training_tokens counts vectors, d_in comes from the file\n"
            "  --resume CHECKPOINT_DIR  continue the run that wrote this checkpoint (give the same options);\n"
            "                         SAE-Lens' --resume_from_checkpoint, checked first; exact on the embedding\n"
            "                         path, close on a language model (SAE-Lens skips ahead in the text and does\n"
            "                         not save its shuffle buffer)\n"
            "  --exact_resume         with --resume on a language model: recompute the activation stream up to\n"
            "                         the checkpoint instead of skipping ahead, so the run ends exactly as an\n"
            "                         uninterrupted one (costs the model's forward passes of the steps already done)\n"
            "  --skip_nonfinite_rows  drop activation rows holding NaN or inf and count them, instead of\n"
            "                         stopping with an error\n"
            "Model names that are local ids (e.g. smollm2-135m-instruct-q4_1) and the dataset\n"
            "'local:english-wikipedia' are built offline from installed packages.\n"
        )
    if known.config and is_sweep_config(known.config):
        _train_sweep(known, rest)
        return
    config = load_yaml_config(known.config) if known.config else {}
    # The command line overrides the file, nulls included: apply_nulls would otherwise undo it after parsing.
    given = {arg.split("=")[0].removeprefix("--") for arg in rest if arg.startswith("--")}
    config = {key: value for key, value in config.items() if key not in given}
    activations = known.activations or config.get("activations")
    skip_nonfinite_rows = bool(known.skip_nonfinite_rows or config.get("skip_nonfinite_rows"))
    if known.exact_resume and known.resume is None:
        raise ValueError("--exact_resume needs --resume CHECKPOINT_DIR")
    args = DEFAULT_ARGS + config_to_args(config) + list(rest)
    if known.resume is not None:
        args += ["--resume_from_checkpoint", known.resume]
    if activations is not None:
        _train_on_file(activations, args, config, skip_nonfinite_rows)
        return
    cfg = _parse_cfg_args(args)
    apply_nulls(cfg, config)
    run_llm_training(cfg, skip_nonfinite_rows=skip_nonfinite_rows, exact_resume=known.exact_resume)


def _train_sweep(known: argparse.Namespace, rest: Sequence[str]) -> None:
    shared, saes = load_sweep_config(known.config, rest)
    own = {key: shared.pop(key) for key in list(shared) if key in OWN_KEYS}
    shared.setdefault("log_to_wandb", False)  # as for a single run: an offline command should not try W&B
    if known.resume is not None:
        shared["resume_from_checkpoint"] = known.resume
    skip_nonfinite_rows = bool(known.skip_nonfinite_rows or own.get("skip_nonfinite_rows"))
    activations = known.activations or own.get("activations")
    if activations is not None:
        matrix = map_activations(activations)
        shared.setdefault("d_in", matrix.shape[1])
        shared.setdefault("hook_name", "activations")
        train_sweep_on_activations(matrix, build_sweep(shared, saes), skip_nonfinite_rows=skip_nonfinite_rows)
    else:
        run_sweep(build_sweep(shared, saes), skip_nonfinite_rows=skip_nonfinite_rows)


# Runner options the embedding path cannot honour (they need a language model, or SAE-Lens' runner itself).
NOT_ON_ACTIVATIONS = ("compile_sae", "from_pretrained_path", "compile_llm", "use_cached_activations")


def _train_on_file(path: str, args: list[str], config: dict[str, Any], skip_nonfinite_rows: bool) -> None:
    import wandb

    activations = map_activations(path)
    args = [*args, "--d_in", str(activations.shape[1])]
    cfg = _parse_cfg_args(args)
    apply_nulls(cfg, config)
    data_parallel.init_from_environment(cfg.device)
    cfg.device = data_parallel.local_device(cfg.device)
    defaults = LanguageModelSAERunnerConfig(sae=cfg.sae)
    refused = [name for name in NOT_ON_ACTIVATIONS if getattr(cfg, name) != getattr(defaults, name)]
    if refused:
        raise ValueError(f"--activations cannot honour {', '.join(refused)}; train without them on a file of vectors")
    # Every trainer option of the runner, converted by SAE-Lens itself (training_tokens counts vectors here).
    trainer_cfg = cfg.to_sae_trainer_config()
    if cfg.logger.log_to_wandb and is_main():
        wandb.init(
            project=cfg.logger.wandb_project,
            entity=cfg.logger.wandb_entity,
            config=cfg.to_dict(),
            name=cfg.logger.run_name,
            id=cfg.logger.wandb_id,
        )
    train_with_trainer_config(
        activations,
        cfg.sae,
        trainer_cfg,
        seed=cfg.seed,
        output_path=cfg.output_path,
        skip_nonfinite_rows=skip_nonfinite_rows,
        resume_from=cfg.resume_from_checkpoint,
    )
    if cfg.logger.log_to_wandb and is_main():
        wandb.finish()
