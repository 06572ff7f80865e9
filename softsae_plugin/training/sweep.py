"""Sweeps: many SAEs, of any architectures, trained from one language-model pass (or one file of activations).

`sae-lens train --config sweep.yaml`, where the YAML has a `saes:` mapping beside the shared runner options, runs
SAE-Lens' `MultiSAETrainingRunner` (one forward pass of the model feeds every SAE), or SAE-Lens' `MultiSAETrainer`
on a file of activations. Each SAE may have its own learning rate (SAE-Lens' multi trainer has one for all: its
per-SAE trainers are rebuilt with their own), and gets what a single run writes: its folder, training summary,
k_hat histogram, checkpoints and resume, the NaN guard, atomic saves. The whole sweep gets a table and an
FVE-vs-L0 plot. Under torchrun a sweep is split by SAE across the ranks (`sweep_parallel: sae`, see by_sae.py) or
trained data-parallel (`sweep_parallel: data`).

    saes:
      softsae-k32: {architecture: softsae, k: 32, lr: 0.001}
      topk-k32: {architecture: topk, k: 32, lr: 0.003}
"""

from __future__ import annotations

import dataclasses
import json
import logging
import typing
from collections.abc import Mapping, Sequence
from functools import partial
from itertools import islice
from pathlib import Path
from typing import Any
from unittest import mock

import torch
from sae_lens.config import LoggingConfig
from sae_lens.constants import SPARSITY_FILENAME
from sae_lens.multi_sae_training_runner import MultiSAETrainingRunner, MultiSAETrainingRunnerConfig
from sae_lens.registry import SAE_TRAINING_CLASS_REGISTRY
from sae_lens.saes.sae import TrainingSAE, TrainingSAEConfig, TrainStepOutput
from sae_lens.training.multi_sae_trainer import MultiSAETrainer
from sae_lens.training.sae_trainer import SAETrainer
from safetensors.torch import save_file

from softsae_plugin.checks import check_finite
from softsae_plugin.collectives import batch_ranks, is_main, sum_over_ranks, world_size
from softsae_plugin.training.activations import MappedRows
from softsae_plugin.training.by_sae import (
    BY_SAE,
    SWEEP_PARALLEL_KEY,
    check_mode,
    choose_mode,
    collect_on_main,
    forget_optimizers_not_owned,
    gathered_on_main,
    train_own_saes_only,
)
from softsae_plugin.training.data_parallel import (
    GlobalBatches,
    data_parallel,
    global_batches,
    global_scale,
    init_from_environment,
    local_device,
    main_rank_first,
    per_rank,
    shard,
    split_over_ranks,
    whole_batch,
    write_runner_config,
)
from softsae_plugin.training.guards import (
    GUARD_STATE_FILENAME,
    FiniteBatches,
    atomic_folder,
    check_checkpoint,
    check_replaceable,
    check_world_size,
    continue_from_checkpoint,
    guard_batches,
    rank_zero_writes,
    sample_share,
    write_guard_state,
)
from softsae_plugin.training.runs import local_sources_quietly, model_and_text, with_run_length
from softsae_plugin.training.store_state import read_state, tracked_store
from softsae_plugin.training.summary import summarise_saved, write_summary, write_sweep_table

SWEEP_KEY = "saes"
# The guard state's record of the SAEs that diverged (name -> step and cause): a resume leaves them out.
DIVERGED_KEY = "diverged"
# Per-SAE options that belong to the trainer rather than to the SAE's config.
PER_SAE_TRAINER_KEYS: dict[str, Any] = {"lr": float}

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class Sweep:
    """A parsed sweep: the runner's shared options, each SAE's config, its learning rate (None: the shared) and how
    it uses the ranks of a torchrun launch (`sweep_parallel`; None: chosen at launch, see `by_sae.choose_mode`)."""

    runner: MultiSAETrainingRunnerConfig
    lrs: dict[str, float | None]
    parallel: str | None = None


def per_sae_fields(architecture: str) -> dict[str, Any]:
    """Every key one SAE of a sweep may set for `architecture`, with its type: its config's fields and `lr`."""
    cls = SAE_TRAINING_CLASS_REGISTRY[architecture][1]
    hints = typing.get_type_hints(cls)
    fields = {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.name != "metadata"}
    return {"architecture": str, **fields, **PER_SAE_TRAINER_KEYS}


def shared_fields() -> dict[str, Any]:
    """Every key a sweep's shared options may hold: SAE-Lens' multi runner's and logging options, `hook_name` (one
    hook for every SAE) and the SAE sizes every SAE inherits unless it sets its own."""
    hints = typing.get_type_hints(MultiSAETrainingRunnerConfig)
    skip = {"saes", "hook_names", "logger", "evaluator", "_hook_names_per_sae", "_hook_head_indices_per_sae"}
    fields = {f.name: hints[f.name] for f in dataclasses.fields(MultiSAETrainingRunnerConfig) if f.name not in skip}
    logger_hints = typing.get_type_hints(LoggingConfig)
    fields.update({f.name: logger_hints[f.name] for f in dataclasses.fields(LoggingConfig)})
    return {**fields, "hook_name": str, "hook_names": dict[str, str] | str, "d_in": int, "d_sae": int,
            SWEEP_PARALLEL_KEY: str}  # fmt: skip


def build_sweep(shared: Mapping[str, Any], saes: Mapping[str, Mapping[str, Any]]) -> Sweep:
    """The runner config and learning rates of a sweep whose options were validated (see `cli.load_yaml_config`).

    Each SAE's run length is recorded in its config (softsae's schedules need it), and `d_in` / `d_sae` default to
    the shared values.
    """
    shared = dict(shared)
    sizes = {key: shared.pop(key) for key in ("d_in", "d_sae") if key in shared}
    parallel = check_mode(shared.pop(SWEEP_PARALLEL_KEY, None))
    logger = LoggingConfig(**{key: shared.pop(key) for key in list(shared) if key in _logging_keys()})
    hook_names = shared.pop("hook_names", None) or shared.pop("hook_name", None)
    if hook_names is None:
        raise ValueError("a sweep needs hook_name (one hook for every SAE) or hook_names (name -> hook)")
    configs: dict[str, TrainingSAEConfig] = {}
    lrs: dict[str, float | None] = {}
    for name, options in saes.items():
        options = {**sizes, **options}
        architecture = options.pop("architecture", "standard")
        lrs[name] = options.pop("lr", None)
        missing = [key for key in ("d_in", "d_sae") if key not in options]
        if missing:
            raise ValueError(f"saes.{name}: no {' or '.join(missing)}; set it for this SAE or beside saes")
        configs[name] = SAE_TRAINING_CLASS_REGISTRY[architecture][1](**options)
    runner = MultiSAETrainingRunnerConfig(saes=configs, hook_names=hook_names, logger=logger, **shared)
    runner.saes = {name: with_run_length(cfg, runner.total_training_steps) for name, cfg in configs.items()}
    return Sweep(runner, lrs, parallel)


def _logging_keys() -> set[str]:
    return {f.name for f in dataclasses.fields(LoggingConfig)}


class PerSAETrainer(MultiSAETrainer):
    """SAE-Lens' multi trainer, each SAE's `SAETrainer` rebuilt with its own learning rate (the end of the schedule
    keeps the shared lr_end / lr ratio) before anything is loaded or trained, and each SAE isolated from the others'
    divergence: an SAE whose loss is not finite stops training (recorded in `diverged` with the step and the cause)
    while the rest of the sweep goes on, and it is left out of checkpoints and of the saved sweep. With `by_sae`
    (under torchrun), `cfg` is one rank's share and the sweep is split by SAE (by_sae.py): the batches drawn are
    gathered into the global batch, on which each rank trains its own SAEs."""

    def __init__(
        self, cfg: Any, *args: Any, lrs: Mapping[str, float | None], by_sae: bool = False, **kwargs: Any
    ) -> None:
        super().__init__(whole_batch(cfg) if by_sae else cfg, *args, **kwargs)
        self.by_sae = by_sae
        for name, lr in lrs.items():
            if lr is None or name not in self.trainers:
                continue
            cfg = self.trainers[name].cfg
            assert cfg.lr_end is not None  # set by SAE-Lens' config
            own = dataclasses.replace(cfg, lr=lr, lr_end=lr * cfg.lr_end / cfg.lr)
            self.trainers[name] = SAETrainer(cfg=own, sae=self.saes[name], data_provider=iter(()))
        self.diverged: dict[str, dict[str, Any]] = {}
        for name, per_sae in self.trainers.items():
            per_sae.step = self._isolated_step(name, per_sae)  # type: ignore[method-assign]
        if by_sae:
            self.data_provider = GlobalBatches(self.data_provider, active=True)
            train_own_saes_only(self)

    def load_checkpoint(self, path: str | Path) -> None:
        """SAE-Lens' `load_checkpoint`; split by SAE, this rank then forgets the optimizer state of the SAEs it does
        not train."""
        super().load_checkpoint(path)
        if self.by_sae:
            forget_optimizers_not_owned(self)

    def _isolated_step(self, name: str, per_sae: SAETrainer[Any, Any]) -> Any:
        step = per_sae.step
        last: dict[str, TrainStepOutput] = {}

        def isolated(batch: torch.Tensor) -> TrainStepOutput:
            if name in self.diverged:  # stopped: SAE-Lens' loop still reads its sample count (the sweep's clock)
                per_sae.n_training_samples += batch.shape[0]
                return last["output"]
            output = last["output"] = step(batch)
            # Data-parallel, every rank agrees (the SAE's weights are shared): one rank's non-finite loss stops it
            # everywhere. Split by SAE, the owner alone decides (the others learn it before anything is saved).
            finite = sum_over_ranks(torch.isfinite(output.loss.detach()).float()) == batch_ranks()
            if not bool(finite):
                self.diverged[name] = {
                    "step": per_sae.n_training_steps,
                    "cause": f"the loss is {float(output.loss.detach()):g} (not finite)",
                    "architecture": per_sae.sae.cfg.architecture(),
                    "k": getattr(per_sae.sae.cfg, "k", None),
                }
                # SAE-Lens' loop still asks every trainer for its firing statistics: a stopped SAE has none to give.
                per_sae.maybe_reset_sparsity = per_sae.full_sparsity_window_log = dict  # type: ignore[method-assign]
                logger.warning("sweep: %s diverged at step %d (%s); the other SAEs go on", name,
                               per_sae.n_training_steps, self.diverged[name]["cause"])  # fmt: skip
            return output

        return isolated

    def live_trainers(self) -> dict[str, SAETrainer[Any, Any]]:
        """The per-SAE trainers of the SAEs that have not diverged."""
        return {name: per_sae for name, per_sae in self.trainers.items() if name not in self.diverged}


def guard_multi_trainer(
    trainer: MultiSAETrainer, *, skip_nonfinite_rows: bool, guard_state: Mapping[str, Any]
) -> FiniteBatches:
    """The multi trainer's `guard_trainer`: every multi-hook batch checked for NaN and inf, checkpoints written
    whole, with finite weights and the data position (see `reliability.guard_trainer`)."""
    guard = guard_batches(trainer, skip_nonfinite_rows=skip_nonfinite_rows, guard_state=guard_state)
    save = trainer.save_checkpoint

    def save_whole_finite_checkpoint(checkpoint_name: str, wandb_aliases: list[str] | None = None) -> None:
        with gathered_on_main(trainer), rank_zero_writes():
            if is_main():
                write(checkpoint_name, wandb_aliases)

    def write(checkpoint_name: str, wandb_aliases: list[str] | None) -> None:
        live = trainer.live_trainers() if isinstance(trainer, PerSAETrainer) else trainer.trainers
        for name, per_sae in live.items():
            check_finite(per_sae.sae.state_dict(), f"refusing to save checkpoint {checkpoint_name!r} of {name}")
        base = trainer.cfg.checkpoint_path
        every = trainer.trainers
        trainer.trainers = live  # SAE-Lens saves one folder per trainer: a diverged SAE gets none
        try:
            if base is None:
                save(checkpoint_name=checkpoint_name, wandb_aliases=wandb_aliases)
                return
            with atomic_folder(Path(base) / checkpoint_name) as staged:
                trainer.cfg = dataclasses.replace(trainer.cfg, checkpoint_path=str(staged.parent))
                try:
                    save(checkpoint_name=checkpoint_name, wandb_aliases=wandb_aliases)
                finally:
                    trainer.cfg = dataclasses.replace(trainer.cfg, checkpoint_path=base)
                diverged = {DIVERGED_KEY: getattr(trainer, "diverged", {})}
                write_guard_state(staged, guard, sample_share=_sample_share(trainer), **diverged)
        finally:
            trainer.trainers = every

    trainer.save_checkpoint = save_whole_finite_checkpoint  # type: ignore[method-assign]
    return guard


def _sample_share(trainer: MultiSAETrainer) -> int:
    # How many ranks divide each SAE's sample count: none in a sweep split by SAE (each SAE sees the global batch).
    return 1 if getattr(trainer, "by_sae", False) else world_size()


def continue_sweep_from_checkpoint(trainer: MultiSAETrainer, saved_share: int | None = None) -> None:
    """`continue_from_checkpoint` for every SAE of a sweep (`saved_share`: the checkpoint's `sample_share`), and the
    coordinator's own counters to match."""
    for per_sae in trainer.trainers.values():
        continue_from_checkpoint(per_sae, saved_share, _sample_share(trainer))
    any_trainer = next(iter(trainer.trainers.values()))
    trainer.n_training_steps, trainer.n_training_samples = any_trainer.n_training_steps, any_trainer.n_training_samples
    trainer.checkpoint_thresholds = [t for t in trainer.checkpoint_thresholds if t >= trainer.n_training_samples]


def check_sweep_checkpoint(
    path: str | Path, runner_cfg: MultiSAETrainingRunnerConfig, *, language_model: bool = True
) -> dict[str, Any]:
    """`check_checkpoint` for a sweep's checkpoint: one folder per SAE, each of the SAE configured here, but for the
    SAEs that had diverged by then (the guard state's `diverged`: they are not resumed). A language-model sweep
    resumes on its number of ranks only; a sweep on a file of activations (`language_model=False`) on any."""
    path = Path(path)
    guard_file = path / GUARD_STATE_FILENAME
    guard_state = json.loads(guard_file.read_text()) if guard_file.exists() else {}
    if language_model:
        check_world_size(guard_state, path)
    for name, sae_cfg in runner_cfg.saes.items():
        if name not in guard_state.get(DIVERGED_KEY, {}):
            check_checkpoint(path / name, sae_cfg, has_activations_store=False)
    return guard_state


def without_diverged(cfg: MultiSAETrainingRunnerConfig, guard_state: Mapping[str, Any]) -> dict[str, Any]:
    """Drop from `cfg` the SAEs that a resumed checkpoint records as diverged; returns them (name -> step, cause)."""
    diverged = dict(guard_state.get(DIVERGED_KEY, {}))
    if diverged and len(diverged) == len(cfg.saes):
        raise ValueError(f"every SAE of this sweep had diverged by the checkpoint ({diverged}); nothing to resume")
    cfg.saes = {name: sae_cfg for name, sae_cfg in cfg.saes.items() if name not in diverged}
    return diverged


def prepare_data_parallel(trainer: MultiSAETrainer) -> None:
    """Each SAE's trainer data-parallel (see `distributed.data_parallel`), unless the sweep is split by SAE, and the
    norm-scaling estimates drawn now, on the global batches, before fit draws its progress bar (so that theirs do
    not nest in it)."""
    if getattr(trainer, "by_sae", False):  # its batches are global already, and each SAE is trained by one rank
        trainer._estimate_scaling_factors()
        return
    for per_sae in trainer.trainers.values():
        data_parallel(per_sae)
    with global_batches(trainer):
        trainer._estimate_scaling_factors()


class SweepRunner(MultiSAETrainingRunner):
    """SAE-Lens' multi runner with per-SAE learning rates, the NaN guard, whole checkpoints, an exact step count
    after a resume, quiet norm estimates and a sweep folder that appears whole."""

    def __init__(
        self,
        cfg: MultiSAETrainingRunnerConfig,
        *,
        lrs: Mapping[str, float | None],
        skip_nonfinite_rows: bool = False,
        guard_state: Mapping[str, int] | None = None,
        by_sae: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(cfg, **kwargs)
        self.lrs, self.skip_nonfinite_rows, self.guard_state = lrs, skip_nonfinite_rows, dict(guard_state or {})
        self.by_sae = by_sae
        self.trainer: MultiSAETrainer | None = None
        self.guard: FiniteBatches | None = None
        # Each rank's exact data position is saved with every checkpoint and restored on resume (see
        # `language_model._GuardedRunner`). A data-parallel checkpoint without it holds rank 0's text position only:
        # a resumed run replays its own stream up to the checkpoint's number of batches instead.
        self.store_state = tracked_store(self.activations_store, cfg, multi_hook=True)
        resuming = cfg.resume_from_checkpoint is not None
        self.saved_store_state = read_state(cfg.resume_from_checkpoint) if resuming and self.store_state else None
        self.replay = world_size() > 1 and resuming and self.saved_store_state is None
        if self.replay or self.saved_store_state is not None:
            self.activations_store.load_from_checkpoint = lambda checkpoint_path: None  # type: ignore[method-assign]

    def run(self) -> dict[str, TrainingSAE[Any]]:
        """SAE-Lens' `run`, building `PerSAETrainer` where it builds its multi trainer."""
        import sae_lens.multi_sae_training_runner as runner_module

        trainer = partial(PerSAETrainer, lrs=self.lrs, by_sae=self.by_sae)
        with mock.patch.object(runner_module, "MultiSAETrainer", trainer):
            return super().run()

    @property
    def diverged(self) -> dict[str, dict[str, Any]]:
        """The SAEs that diverged (name -> step and cause), in this run or before the checkpoint it resumed."""
        now = self.trainer.diverged if isinstance(self.trainer, PerSAETrainer) else {}
        return {**self.guard_state.get(DIVERGED_KEY, {}), **now}

    def _run_with_interruption_handling(self, trainer: MultiSAETrainer) -> dict[str, TrainingSAE[Any]]:
        if self.cfg.resume_from_checkpoint is not None:
            continue_sweep_from_checkpoint(trainer)
        if self.store_state is not None and self.saved_store_state is not None:
            self.store_state.restore(self.saved_store_state)
        if self.replay:
            for _ in range(self.guard_state.get("batches_drawn", 0)):
                next(trainer.data_provider)
        self.guard = guard_multi_trainer(
            trainer, skip_nonfinite_rows=self.skip_nonfinite_rows, guard_state=self.guard_state
        )
        if self.store_state is not None:
            self.store_state.around_checkpoints(trainer)
        self.trainer = trainer
        prepare_data_parallel(trainer)
        if self.store_state is not None and self.saved_store_state is not None:
            self.store_state.restore_rng()  # last: nothing before training may draw from it
        return super()._run_with_interruption_handling(trainer)

    def _save_runner_checkpoint_files(self, checkpoint_path: Path | None) -> None:
        """SAE-Lens' runner files in a checkpoint folder, and every rank's store state (rank 0 writes it)."""
        super()._save_runner_checkpoint_files(checkpoint_path)
        if checkpoint_path is not None and self.store_state is not None:
            self.store_state.write_pending(checkpoint_path)

    def _save_final_outputs(self, saes: dict[str, TrainingSAE[Any]], trainer: MultiSAETrainer) -> None:
        assert self.cfg.output_path is not None
        if self.by_sae:
            collect_on_main(trainer)
        if not is_main():
            return
        saes = trained_saes(saes, self.diverged)
        for name, sae in saes.items():
            check_finite(sae.state_dict(), f"refusing to save the trained SAE {name}")
        output_path = self.cfg.output_path
        with atomic_folder(output_path) as staged:
            self.cfg.output_path = str(staged)
            try:
                super()._save_final_outputs(saes, trainer)
            finally:
                self.cfg.output_path = output_path
            write_runner_config(self.cfg, staged)  # the real output path, and the run's global numbers


def trained_saes(saes: Mapping[str, TrainingSAE[Any]], diverged: Mapping[str, Any]) -> dict[str, TrainingSAE[Any]]:
    """The SAEs of a sweep that did not diverge; an error naming each cause when none is left."""
    kept = {name: sae for name, sae in saes.items() if name not in diverged}
    if not kept:
        raise ValueError(f"every SAE of the sweep diverged: {dict(diverged)}; lower their learning rates")
    return kept


def heldout_batches_per_hook(
    model: Any, rows: Any, hooks: Sequence[str], *, batch_tokens: int, n_batches: int, special: Sequence[int]
) -> dict[str, list[torch.Tensor]]:
    """Activations of held-out token `rows` at each hook, special tokens left out, in batches of `batch_tokens`.

    One forward pass (to the deepest hook) per group of rows serves every hook, as in training.
    """
    from sae_lens.util import extract_stop_at_layer_from_tlens_hook_name

    stop = max(extract_stop_at_layer_from_tlens_hook_name(hook) or 0 for hook in hooks) or None
    tokens = torch.tensor(rows["input_ids"])
    per_hook: dict[str, list[torch.Tensor]] = {hook: [] for hook in hooks}
    wanted = batch_tokens * n_batches
    taken = 0
    for start in range(0, len(tokens), 8):
        chunk = tokens[start : start + 8]
        keep = ~torch.isin(chunk, torch.tensor(list(special)))
        with torch.no_grad():
            _, cache = model.run_with_cache(chunk, names_filter=list(hooks), stop_at_layer=stop)
        for hook in hooks:
            per_hook[hook].append(cache[hook][keep].float().cpu())
        taken += int(keep.sum())
        if taken >= wanted:
            break
    return {hook: list(torch.cat(acts)[:wanted].split(batch_tokens)) for hook, acts in per_hook.items()}


def _seeded_saes(cfg: MultiSAETrainingRunnerConfig) -> dict[str, TrainingSAE[Any]]:
    # Every SAE starts from the run's seed, as its own single run would, whatever its place in the sweep.
    saes = {}
    for name, sae_cfg in cfg.saes.items():
        torch.manual_seed(cfg.seed)
        saes[name] = TrainingSAE.from_dict(dataclasses.replace(sae_cfg, device=cfg.device).to_dict())
    return saes


def run_sweep(sweep: Sweep, *, skip_nonfinite_rows: bool = False, summary_batches: int = 32) -> dict[str, Any]:
    """Train a language-model sweep with `SweepRunner`: offline model and text where the names ask for them, the
    checkpoint checked before SAE-Lens resumes from it, then each SAE's training summary (on held-out text) in its
    folder and the sweep's table and plot beside them."""
    from sae_lens.util import extract_stop_at_layer_from_tlens_hook_name, get_special_token_ids

    from softsae_plugin.offline.text import HELDOUT_EVERY, LOCAL_TEXT_ID, tokenized_english_text

    cfg = sweep.runner
    split_over_ranks(cfg, skip_nonfinite_rows)
    if cfg.output_path is not None:
        check_replaceable(cfg.output_path)
    guard_state = check_sweep_checkpoint(cfg.resume_from_checkpoint, cfg) if cfg.resume_from_checkpoint else {}
    without_diverged(cfg, guard_state)
    by_sae = choose_mode(sweep.parallel, len(cfg.saes)) == BY_SAE
    hooks = sorted(set(cfg.hook_names_per_sae.values()))
    deepest = max(extract_stop_at_layer_from_tlens_hook_name(hook) or 0 for hook in hooks)
    model, dataset = model_and_text(cfg, deepest or None)
    with local_sources_quietly(model is not None, dataset is not None):
        with main_rank_first():  # SAE-Lens' runner loads what the overrides do not give it
            runner = SweepRunner(
                cfg,
                lrs=sweep.lrs,
                skip_nonfinite_rows=skip_nonfinite_rows,
                guard_state=guard_state,
                override_model=model,
                override_dataset=dataset,
                override_saes=_seeded_saes(cfg),
                by_sae=by_sae,
            )
        saes = trained_saes(runner.run(), runner.diverged)
    if cfg.output_path is None or not is_main():
        return saes
    assert runner.trainer is not None
    if dataset is not None:
        heldout = tokenized_english_text(
            runner.model.tokenizer, cfg.context_size, prepend_bos=cfg.prepend_bos, split="heldout"
        )
        special = get_special_token_ids(runner.model.tokenizer) if cfg.exclude_special_tokens else []
        per_hook = heldout_batches_per_hook(
            runner.model,
            heldout.with_format(None),
            hooks,
            batch_tokens=cfg.train_batch_size_tokens,
            n_batches=summary_batches * world_size(),
            special=special,
        )
        eval_data = f"held-out text: every {HELDOUT_EVERY}th paragraph of {LOCAL_TEXT_ID}, never trained on"
    else:
        stream = runner.activations_store.get_multi_hook_data_loader()
        batches = list(islice(stream, summary_batches * world_size()))
        per_hook = {hook: [b[hook] for b in batches] for hook in hooks}
        eval_data = f"held-out text: the {cfg.dataset_path} tokens that follow the training stream"
    for name in saes:
        summary, k_hat = summarise_saved(Path(cfg.output_path) / name, per_hook[cfg.hook_names_per_sae[name]],
                                         runner.trainer.trainers[name], eval_data=eval_data)  # fmt: skip
        summary.update(global_scale(cfg.train_batch_size_tokens, cfg.training_tokens))
        summary["nonfinite_rows_skipped"] = runner.guard.rows_skipped if runner.guard else 0
        write_summary(summary, k_hat, Path(cfg.output_path) / name)
    table = write_sweep_table(cfg.output_path, list(saes), runner.diverged)
    print(table.read_text())
    return saes


def train_sweep_on_activations(
    activations: torch.Tensor | MappedRows,
    sweep: Sweep,
    *,
    skip_nonfinite_rows: bool = False,
    eval_activations: torch.Tensor | None = None,
    eval_data: str = "held-out activations",
) -> dict[str, TrainingSAE[Any]]:
    """A sweep on a file of activation vectors: SAE-Lens' multi trainer (`PerSAETrainer`) fed the same batches for
    every SAE, each SAE seeded and checkpointed as its single run (`train_on_activations`) would be, so that it ends
    with the same weights; then each SAE's folder (whole), summary and the table. The summaries are measured on
    `eval_activations` (described by `eval_data`) or else on a random 10% of the rows, kept out of training."""
    from softsae_plugin.training.activations import as_tensor, batches, split_heldout
    from softsae_plugin.training.on_activations import HELDOUT_FRACTION

    cfg = sweep.runner
    init_from_environment(cfg.device)
    cfg.device = local_device(cfg.device)
    if cfg.output_path is not None:
        check_replaceable(cfg.output_path)
    eval_rows = eval_activations
    if cfg.output_path is not None and eval_rows is None:
        activations, eval_rows = split_heldout(activations, HELDOUT_FRACTION, seed=cfg.seed)
        eval_data = "held out: a random 10% of the activation rows, never trained on"
    guard_state = {}
    if cfg.resume_from_checkpoint:
        guard_state = check_sweep_checkpoint(cfg.resume_from_checkpoint, cfg, language_model=False)
    diverged_before = without_diverged(cfg, guard_state)
    by_sae = choose_mode(sweep.parallel, len(cfg.saes)) == BY_SAE
    rank_cfg = per_rank(cfg.to_sae_trainer_config(), skip_nonfinite_rows)
    saes = _seeded_saes(cfg)
    # Each rank its slice of each global batch (read from a mapped file for that slice only).
    stream = batches(activations, cfg.train_batch_size_tokens, seed=cfg.seed, start=guard_state.get("batches_drawn", 0),
                     share=shard)  # fmt: skip
    hook = "activations"
    trainer = PerSAETrainer(
        cfg=rank_cfg,
        saes=saes,
        hook_names=dict.fromkeys(saes, hook),
        data_provider=({hook: batch} for batch in stream),
        lrs=sweep.lrs,
        by_sae=by_sae,
    )
    if cfg.resume_from_checkpoint is not None:
        trainer.load_checkpoint(cfg.resume_from_checkpoint)
        continue_sweep_from_checkpoint(trainer, saved_share=sample_share(guard_state))
    guard = guard_multi_trainer(trainer, skip_nonfinite_rows=skip_nonfinite_rows, guard_state=guard_state)
    prepare_data_parallel(trainer)
    saes = trainer.fit()
    if by_sae:
        collect_on_main(trainer)
    diverged = {**diverged_before, **trainer.diverged}
    saes = trained_saes(saes, diverged)
    if cfg.output_path is None or not is_main():
        return saes
    with atomic_folder(cfg.output_path) as staged:
        for name, sae in saes.items():
            check_finite(sae.state_dict(), f"refusing to save the trained SAE {name}")
            sae.save_inference_model(staged / name)
            save_file({"sparsity": trainer.trainers[name].log_feature_sparsity}, staged / name / SPARSITY_FILENAME)
    assert eval_rows is not None
    eval_rows = as_tensor(eval_rows)
    for name in saes:
        summary, k_hat = summarise_saved(Path(cfg.output_path) / name, eval_rows.split(cfg.train_batch_size_tokens),
                                         trainer.trainers[name], eval_data=eval_data)  # fmt: skip
        summary["nonfinite_rows_skipped"] = guard.rows_skipped
        summary.update(global_scale(rank_cfg.train_batch_size_samples, rank_cfg.total_training_samples))
        write_summary(summary, k_hat, Path(cfg.output_path) / name)
    print(write_sweep_table(cfg.output_path, list(saes), diverged).read_text())
    return saes
