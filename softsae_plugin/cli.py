"""The `sae-lens` command: `sae-lens train` runs SAE-Lens' own training runner for any registered architecture.

Every option of SAE-Lens' runner CLI (`python -m sae_lens.llm_sae_training_runner`) passes through
unchanged; this command adds `--config FILE.yaml`, the embedding path (`--activations PATH`), offline
sources for the model and text, and the summary every run writes.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import re
import sys
import types
import typing
from collections.abc import Sequence
from dataclasses import fields
from itertools import islice
from pathlib import Path
from typing import Annotated, Any

import pydantic
import torch
import yaml
from sae_lens.config import LanguageModelSAERunnerConfig, LoggingConfig
from sae_lens.llm_sae_training_runner import LanguageModelSAETrainingRunner, _parse_cfg_args
from sae_lens.registry import SAE_TRAINING_CLASS_REGISTRY
from sae_lens.saes.sae import TrainingSAE
from sae_lens.training.activations_store import ActivationsStore
from sae_lens.training.sae_trainer import SAETrainer
from sae_lens.util import extract_stop_at_layer_from_tlens_hook_name
from tqdm.auto import tqdm
from typing_extensions import override

import softsae_plugin  # noqa: F401  (registers softsae before the runner reads the registry)
from softsae_plugin import distributed
from softsae_plugin.reliability import (
    FiniteBatches,
    atomic_folder,
    check_checkpoint,
    check_finite,
    check_replaceable,
    continue_from_checkpoint,
    guard_trainer,
)
from softsae_plugin.summary import print_summary, summarise_saved, write_summary
from softsae_plugin.train import (
    fit_quietly_and_in_order,
    local_sources_quietly,
    train_with_trainer_config,
    with_run_length,
)

# YAML keys this command reads itself rather than passing to SAE-Lens' runner.
OWN_KEYS: dict[str, type] = {"activations": str, "skip_nonfinite_rows": bool}
# SAE-Lens logs to W&B unless told otherwise; an offline command should not try.
DEFAULT_ARGS = ["--log_to_wandb", "false"]
# Batches of held-out activations the summary measures (32 batches of the quickstart's 1,024 tokens: enough that
# the mean L0 of an input-dependent k is within about a percent of its value on the whole held-out text).
SUMMARY_BATCHES = 32


def _config_fields(architecture: str) -> dict[str, Any]:
    """Every key a YAML config may hold for `architecture`, with its type: the runner CLI's flags."""
    sae_cfg_cls = SAE_TRAINING_CLASS_REGISTRY[architecture][1]
    field_types: dict[str, Any] = {"architecture": str, **OWN_KEYS}
    for cls in (LanguageModelSAERunnerConfig, LoggingConfig):
        hints = typing.get_type_hints(cls)
        field_types.update({f.name: hints[f.name] for f in fields(cls) if f.name not in ("sae", "logger")})
    hints = typing.get_type_hints(sae_cfg_cls)
    for f in fields(sae_cfg_cls):
        if f.name == "metadata":
            continue
        # The runner CLI names SAE fields that clash with runner fields "sae.<name>".
        field_types[f"sae.{f.name}" if f.name in field_types else f.name] = hints[f.name]
    return field_types


class _YamlLoader(yaml.SafeLoader):
    """PyYAML follows YAML 1.1, which reads 1e-4 (no dot) as a string; read it as the number users mean."""


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)[eE][-+]?\d+$"), list("-+.0123456789")
)


def _strict_if_scalar(tp: Any) -> Any:
    # Scalars must have their own type (no "8" for k, 1.5 or true for a step count: the runner CLI would
    # choke on them later); composite fields stay lax, since YAML has lists where SAE-Lens has tuples.
    options = typing.get_args(tp) if isinstance(tp, types.UnionType) else (tp,)
    if all(option in (int, float, bool, str, type(None)) for option in options):
        strict = [Annotated[option, pydantic.Strict()] for option in options if option is not type(None)]
        return typing.Union[(*strict, None)]
    return tp | None


def load_yaml_config(path: str | Path) -> dict[str, Any]:
    """Read and validate a YAML training config; keys are the runner CLI's option names.

    Unknown keys are an error that names the key and the nearest valid one; values are type-checked
    with pydantic against SAE-Lens' and softsae's config dataclasses (scalars strictly, numbers finite).
    Limits that depend on the run's length (hard_topk_steps) are checked when the run starts.
    """
    data = yaml.load(Path(path).read_text(), Loader=_YamlLoader) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of option names to values, got {type(data).__name__}")
    architecture = data.get("architecture", "standard")
    if architecture not in SAE_TRAINING_CLASS_REGISTRY:
        raise ValueError(
            f"{path}: architecture={architecture!r} is not registered; "
            f"expected one of {sorted(SAE_TRAINING_CLASS_REGISTRY)}"
        )
    return validate_options(data, _config_fields(architecture), f"{path}", f"architecture {architecture!r}")


def validate_options(data: dict[str, Any], valid: dict[str, Any], where: str, what: str) -> dict[str, Any]:
    """Check `data` against `valid` (option name -> type): an unknown key names the nearest valid one, and values
    are type-checked with pydantic (scalars strictly, numbers finite). Returns `data`."""
    for key in data:
        if key not in valid:
            near = difflib.get_close_matches(key, valid, n=1)
            hint = f"; did you mean {near[0]!r}?" if near else ""
            raise ValueError(f"{where}: unknown key {key!r} for {what}{hint}")
    model = pydantic.create_model(  # type: ignore[call-overload]
        "TrainConfig",
        __config__=pydantic.ConfigDict(extra="forbid", arbitrary_types_allowed=True, strict=False, allow_inf_nan=False),
        **{name.replace(".", "__"): (_strict_if_scalar(tp), None) for name, tp in valid.items()},
    )
    try:
        model.model_validate({k.replace(".", "__"): v for k, v in data.items()})
    except pydantic.ValidationError as err:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']).replace('__', '.')}={e.get('input')!r}: {e['msg']}"
            for e in err.errors()
        )
        raise ValueError(f"{where}: {problems}") from None
    return data


def load_sweep_config(path: str | Path, overrides: Sequence[str] = ()) -> tuple[dict[str, Any], dict[str, Any]]:
    """Read and validate a sweep config (a `saes:` mapping beside shared runner options), with `--key value`
    command-line overrides of the shared options; returns (shared options, name -> the SAE's options)."""
    from softsae_plugin.sweep import SWEEP_KEY, per_sae_fields, shared_fields

    data = yaml.load(Path(path).read_text(), Loader=_YamlLoader) or {}
    saes = data.pop(SWEEP_KEY)
    if not isinstance(saes, dict) or not saes or not all(isinstance(v, dict) for v in saes.values()):
        raise ValueError(f"{path}: {SWEEP_KEY} must map each SAE's name to its options (architecture, k, lr, ...)")
    if len(overrides) % 2 or not all(key.startswith("--") for key in overrides[::2]):
        raise ValueError(f"a sweep takes shared options as --name value pairs; got {list(overrides)}")
    for key, value in zip(overrides[::2], overrides[1::2], strict=True):
        data[key.removeprefix("--")] = yaml.load(value, Loader=_YamlLoader)
    validate_options(data, {**shared_fields(), **OWN_KEYS}, f"{path}", "a sweep's shared options")
    for name, options in saes.items():
        architecture = options.get("architecture", "standard")
        if architecture not in SAE_TRAINING_CLASS_REGISTRY:
            raise ValueError(
                f"{path}: saes.{name}.architecture={architecture!r} is not registered; "
                f"expected one of {sorted(SAE_TRAINING_CLASS_REGISTRY)}"
            )
        validate_options(
            options, per_sae_fields(architecture), f"{path}: saes.{name}", f"architecture {architecture!r}"
        )
    return data, saes


def config_to_args(config: dict[str, Any]) -> list[str]:
    """Turn a validated config mapping into runner CLI arguments (null values are set by `apply_nulls`)."""
    args: list[str] = []
    for key, value in config.items():
        if key in OWN_KEYS or value is None:
            continue
        if isinstance(value, bool):
            args += [f"--{key}", str(value).lower()]
        elif isinstance(value, dict):
            args += [f"--{key}", json.dumps(value)]
        elif isinstance(value, (list, tuple)):
            args += [f"--{key}", *map(str, value)]
        else:
            args += [f"--{key}", str(value)]
    return args


def apply_nulls(cfg: LanguageModelSAERunnerConfig[Any], config: dict[str, Any]) -> None:
    """Set the config's null values, which the runner CLI cannot express (it has no spelling for None)."""
    sae_fields = {f.name for f in fields(cfg.sae)}
    for key, value in config.items():
        if value is not None or key == "architecture" or key in OWN_KEYS:
            continue
        name = key.removeprefix("sae.")
        if key.startswith("sae.") or (name in sae_fields and not hasattr(cfg, name)):
            cfg.sae = dataclasses.replace(cfg.sae, **{name: None})
        elif hasattr(cfg.logger, name):
            setattr(cfg.logger, name, None)
        else:
            setattr(cfg, name, None)


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
    if known.config and _is_sweep(known.config):
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


def _is_sweep(path: str) -> bool:
    from softsae_plugin.sweep import SWEEP_KEY

    data = yaml.load(Path(path).read_text(), Loader=_YamlLoader)
    return isinstance(data, dict) and SWEEP_KEY in data


def _train_sweep(known: argparse.Namespace, rest: Sequence[str]) -> None:
    from softsae_plugin.activations import load_activations
    from softsae_plugin.sweep import build_sweep, run_sweep, train_sweep_on_activations

    shared, saes = load_sweep_config(known.config, rest)
    own = {key: shared.pop(key) for key in list(shared) if key in OWN_KEYS}
    shared.setdefault("log_to_wandb", False)  # as for a single run: an offline command should not try W&B
    if known.resume is not None:
        shared["resume_from_checkpoint"] = known.resume
    skip_nonfinite_rows = bool(known.skip_nonfinite_rows or own.get("skip_nonfinite_rows"))
    activations = known.activations or own.get("activations")
    if activations is not None:
        matrix = load_activations(activations)
        shared.setdefault("d_in", matrix.shape[1])
        shared.setdefault("hook_name", "activations")
        train_sweep_on_activations(matrix, build_sweep(shared, saes), skip_nonfinite_rows=skip_nonfinite_rows)
    else:
        run_sweep(build_sweep(shared, saes), skip_nonfinite_rows=skip_nonfinite_rows)


class _GuardedRunner(LanguageModelSAETrainingRunner):
    """SAE-Lens' runner with the guards of `guard_trainer` on its trainer and a final folder that appears whole.

    A subclass because the runner builds its `SAETrainer` inside `run()`: the one seam that sees the trainer
    before training is `run_trainer_with_interruption_handling`, and the final save is `save_final_sae`.
    Both call SAE-Lens' own methods.

    With `exact_resume`, SAE-Lens' skip to the checkpoint's text position is turned off and the trainer's data
    stream is replayed instead: the store, built and seeded as in the uninterrupted run, yields the batches
    the run drew before its checkpoint (the count saved with it), which are discarded. The shuffle buffer and
    the RNG behind its permutations then stand where they stood, so every later batch is the same.
    """

    def __init__(
        self,
        cfg: LanguageModelSAERunnerConfig[Any],
        *,
        skip_nonfinite_rows: bool,
        guard_state: dict[str, int],
        exact_resume: bool = False,
        **kwargs: Any,
    ):
        super().__init__(cfg, **kwargs)
        self.skip_nonfinite_rows, self.guard_state = skip_nonfinite_rows, guard_state
        self.exact_resume = exact_resume and cfg.resume_from_checkpoint is not None
        self.guard: FiniteBatches | None = None
        self.trainer: SAETrainer[Any, Any] | None = None
        if self.exact_resume:
            if "batches_drawn" not in guard_state:
                raise ValueError(
                    f"--exact_resume: {cfg.resume_from_checkpoint} does not record how many batches its run drew "
                    "(it was not written by `sae-lens train`); resume without --exact_resume"
                )
            # run() would skip the text ahead to the checkpoint's position; the replay below gets there instead.
            self.activations_store.load_from_checkpoint = lambda checkpoint_path: None  # type: ignore[method-assign]

    @override
    def run_trainer_with_interruption_handling(self, trainer: SAETrainer[Any, Any]) -> TrainingSAE[Any]:
        if self.cfg.resume_from_checkpoint is not None:
            continue_from_checkpoint(trainer)
        if self.exact_resume:
            for _ in tqdm(range(self.guard_state["batches_drawn"]), desc="Replaying the activation stream"):
                next(trainer.data_provider)
        self.guard = guard_trainer(trainer, skip_nonfinite_rows=self.skip_nonfinite_rows, guard_state=self.guard_state)
        distributed.data_parallel(trainer)
        self.trainer = trainer
        with fit_quietly_and_in_order(trainer):
            return super().run_trainer_with_interruption_handling(trainer=trainer)

    @override
    def save_final_sae(
        self, sae: TrainingSAE[Any], output_path: str, log_feature_sparsity: torch.Tensor | None = None
    ) -> None:
        if not distributed.is_main():
            return
        check_finite(sae.state_dict(), f"refusing to save the trained SAE to {output_path}")
        with atomic_folder(output_path) as staged:
            super().save_final_sae(sae=sae, output_path=str(staged), log_feature_sparsity=log_feature_sparsity)


def _split_over_ranks(cfg: LanguageModelSAERunnerConfig[Any], skip_nonfinite_rows: bool) -> bool:
    """Set `cfg` up for this data-parallel rank: its own device, its share of the batch and of the tokens (the
    configured ones are global), W&B only on rank 0. Returns whether a resume must replay the activation stream
    (each rank's store position is not saved, only the number of batches drawn)."""
    cfg.device = distributed.local_device(cfg.device)
    cfg.llm_device = distributed.local_device(cfg.llm_device or cfg.device)
    cfg.act_store_device = distributed.local_device(cfg.act_store_device or cfg.device)
    trainer_cfg = distributed.per_rank(cfg.to_sae_trainer_config(), skip_nonfinite_rows)
    cfg.train_batch_size_tokens = trainer_cfg.train_batch_size_samples
    cfg.training_tokens = trainer_cfg.total_training_samples
    if not distributed.is_main():
        cfg.logger.log_to_wandb = False
    return cfg.resume_from_checkpoint is not None


def run_llm_training(
    cfg: LanguageModelSAERunnerConfig[Any], *, skip_nonfinite_rows: bool = False, exact_resume: bool = False
) -> Any:
    """Run SAE-Lens' runner on `cfg`, with offline model and text sources where the names ask for them.

    Records the run length in the SAE config; checks every batch for NaN and inf (stopping with an error, or
    dropping and counting the rows with `skip_nonfinite_rows`); writes checkpoints and the output folder so
    that each appears whole; checks a `cfg.resume_from_checkpoint` before SAE-Lens loads it, and corrects
    the step count after (`exact_resume`: replays the activation stream, see `_GuardedRunner`); writes the
    training summary (FVE, L0, k_hat) into the output folder.
    """
    from softsae_plugin.smollm2 import is_local_model, load_local_model
    from softsae_plugin.text import HELDOUT_EVERY, LOCAL_TEXT_ID, tokenized_english_text

    cfg.sae = with_run_length(cfg.sae, cfg.total_training_steps)
    if distributed.init_from_environment(cfg.device) > 1:
        exact_resume = _split_over_ranks(cfg, skip_nonfinite_rows) or exact_resume
    if cfg.output_path is not None:
        check_replaceable(cfg.output_path)
    guard_state: dict[str, int] = {}
    if cfg.resume_from_checkpoint is not None:
        guard_state = check_checkpoint(cfg.resume_from_checkpoint, cfg.sae, has_activations_store=True)
    override_model = None
    if is_local_model(cfg.model_name):
        # Build only the blocks up to the hook: SAE-Lens' activation store stops there too.
        override_model = load_local_model(
            cfg.model_name,
            first_n_layers=extract_stop_at_layer_from_tlens_hook_name(cfg.hook_name),
            device=cfg.llm_device,
        )
    override_dataset = None
    if cfg.dataset_path == LOCAL_TEXT_ID:
        if override_model is None:
            raise ValueError(
                f"dataset_path={LOCAL_TEXT_ID!r} needs a local model_name (e.g. smollm2-135m-instruct-q4_1)"
            )
        override_dataset = tokenized_english_text(
            override_model.tokenizer, cfg.context_size, prepend_bos=cfg.prepend_bos, split="train"
        )
        cfg.is_dataset_tokenized = True
        override_dataset = distributed.shard_dataset(override_dataset)
        text_tokens = len(override_dataset) * cfg.context_size
        print(
            f"{LOCAL_TEXT_ID}: {text_tokens:,} tokens of training text (every {HELDOUT_EVERY}th paragraph held out) "
            f"for {cfg.training_tokens:,} training tokens"
            + (
                f" ({cfg.training_tokens / text_tokens:.1f} passes over it)"
                if cfg.training_tokens > text_tokens
                else ""
            )
        )
    # SAE-Lens' runner never seeds torch: its SAE initialisation and its shuffle buffer's permutations would follow
    # whatever ran before in the process. Seeded here, after the model is built, a run is the same for the same
    # --seed, and a resumed run's replay (exact_resume) draws the same permutations.
    if override_dataset is None and distributed.world_size() > 1:  # each rank streams its own shard of the text
        override_dataset = distributed.load_shard(
            cfg.dataset_path, streaming=cfg.streaming, trust_remote_code=cfg.dataset_trust_remote_code
        )
    torch.manual_seed(cfg.seed)
    with local_sources_quietly(override_model is not None, override_dataset is not None):
        runner = _GuardedRunner(
            cfg,
            skip_nonfinite_rows=skip_nonfinite_rows,
            guard_state=guard_state,
            exact_resume=exact_resume,
            override_dataset=override_dataset,
            override_model=override_model,
        )
        sae = runner.run()
        if cfg.output_path is None or not distributed.is_main():
            return sae
        # Written after the whole folder appeared: the summary needs the activation store, which a prefetching
        # runner reads from another thread until run() returns.
        if override_dataset is not None:
            heldout = tokenized_english_text(
                runner.model.tokenizer, cfg.context_size, prepend_bos=cfg.prepend_bos, split="heldout"
            )
            source = ActivationsStore.from_config(runner.model, cfg, override_dataset=heldout)
            eval_data = f"held-out text: every {HELDOUT_EVERY}th paragraph of {LOCAL_TEXT_ID}, never trained on"
        else:
            source = runner.activations_store
            eval_data = f"held-out text: the {cfg.dataset_path} tokens that follow the training stream"
        eval_batches = FiniteBatches(source, lambda: "the evaluation after training", skip_rows=skip_nonfinite_rows)
        # As many held-out tokens as a one-process run measures (each rank's batch is a share of the global one).
        n_eval = SUMMARY_BATCHES * distributed.world_size()
        summary, k_hat = summarise_saved(cfg.output_path, islice(eval_batches, n_eval), runner.trainer,
                                         eval_data=eval_data)  # fmt: skip
    summary["training_tokens"] = cfg.training_tokens
    summary["nonfinite_rows_skipped"] = runner.guard.rows_skipped if runner.guard else 0
    write_summary(summary, k_hat, cfg.output_path)
    print_summary(summary)
    return sae


# Runner options the embedding path cannot honour (they need a language model, or SAE-Lens' runner itself).
NOT_ON_ACTIVATIONS = ("compile_sae", "from_pretrained_path", "compile_llm", "use_cached_activations")


def _train_on_file(path: str, args: list[str], config: dict[str, Any], skip_nonfinite_rows: bool) -> None:
    import wandb

    from softsae_plugin.activations import load_activations

    activations = load_activations(path)
    args = [*args, "--d_in", str(activations.shape[1])]
    cfg = _parse_cfg_args(args)
    apply_nulls(cfg, config)
    distributed.init_from_environment(cfg.device)
    cfg.device = distributed.local_device(cfg.device)
    defaults = LanguageModelSAERunnerConfig(sae=cfg.sae)
    refused = [name for name in NOT_ON_ACTIVATIONS if getattr(cfg, name) != getattr(defaults, name)]
    if refused:
        raise ValueError(f"--activations cannot honour {', '.join(refused)}; train without them on a file of vectors")
    # Every trainer option of the runner, converted by SAE-Lens itself (training_tokens counts vectors here).
    trainer_cfg = cfg.to_sae_trainer_config()
    if cfg.logger.log_to_wandb and distributed.is_main():
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
    if cfg.logger.log_to_wandb and distributed.is_main():
        wandb.finish()


def _eval(argv: Sequence[str]) -> None:
    from softsae_plugin.evaluate import main as eval_main

    eval_main(argv)


def _push(argv: Sequence[str]) -> None:
    from softsae_plugin.push import main as push_main

    push_main(argv)


def _show(argv: Sequence[str]) -> None:
    from softsae_plugin.show import main as show_main

    show_main(argv)


COMMANDS = {
    "train": (_train, "train an SAE with SAE-Lens' runner (sae-lens train --help)"),
    "eval": (_eval, "run SAEBench's evaluations on SAEs (sae-lens eval --help)"),
    "push": (_push, "publish a checkpoint to the Hugging Face Hub (sae-lens push --help)"),
    "show": (_show, "write an HTML page of text shaded by k_hat or L0 (sae-lens show --help)"),
}


# What a user's mistake raises (a bad option, value, file or checkpoint): reported in one line, like argparse does.
USER_ERRORS = (ValueError, TypeError, FileNotFoundError, FileExistsError, NotADirectoryError, argparse.ArgumentError)


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the `sae-lens` console script.

    A user's mistake ends the command with `sae-lens <command>: error: ...` and exit status 2; `--debug` shows
    the traceback instead, and any other exception (a real fault) always does.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        print(f"usage: sae-lens {{{','.join(COMMANDS)}}} ... [--debug]")
        for name, (_, help_text) in COMMANDS.items():
            print(f"  {name:6s} {help_text}")
        raise SystemExit(0 if not argv or argv[0] in ("-h", "--help") else 2)
    debug = "--debug" in argv
    command, args = argv[0], [arg for arg in argv[1:] if arg != "--debug"]
    try:
        COMMANDS[command][0](args)
    except USER_ERRORS as err:
        if debug:
            raise
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        print(f"sae-lens {command}: error: {message} (--debug shows the traceback)", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
