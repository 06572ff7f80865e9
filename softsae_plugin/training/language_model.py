"""Language-model training: SAE-Lens' own runner, with the guards, offline sources, data-parallel split and summary
that `sae-lens train` adds to every run.
"""

from __future__ import annotations

from itertools import islice
from pathlib import Path
from typing import Any

import torch
from sae_lens.config import LanguageModelSAERunnerConfig
from sae_lens.llm_sae_training_runner import LanguageModelSAETrainingRunner
from sae_lens.saes.sae import TrainingSAE
from sae_lens.training.activations_store import ActivationsStore
from sae_lens.training.sae_trainer import SAETrainer
from sae_lens.util import extract_stop_at_layer_from_tlens_hook_name
from tqdm.auto import tqdm
from typing_extensions import override

from softsae_plugin.checks import check_finite
from softsae_plugin.collectives import is_main, world_size
from softsae_plugin.offline.text import HELDOUT_EVERY, LOCAL_TEXT_ID, tokenized_english_text
from softsae_plugin.training import data_parallel
from softsae_plugin.training.guards import (
    FiniteBatches,
    atomic_folder,
    check_checkpoint,
    check_replaceable,
    continue_from_checkpoint,
    guard_trainer,
)
from softsae_plugin.training.runs import (
    fit_quietly_and_in_order,
    local_sources_quietly,
    model_and_text,
    with_run_length,
)
from softsae_plugin.training.store_state import read_state, tracked_store
from softsae_plugin.training.summary import print_summary, summarise_saved, write_summary

# Batches of held-out activations the summary measures (32 batches of the quickstart's 1,024 tokens: enough that
# the mean L0 of an input-dependent k is within about a percent of its value on the whole held-out text).
SUMMARY_BATCHES = 32


class _GuardedRunner(LanguageModelSAETrainingRunner):
    """SAE-Lens' runner with the guards of `guard_trainer` on its trainer and a final folder that appears whole.

    A subclass because the runner builds its `SAETrainer` inside `run()`: the one seam that sees the trainer
    before training is `run_trainer_with_interruption_handling`, and the final save is `save_final_sae`.
    Both call SAE-Lens' own methods.

    Every checkpoint holds each rank's exact data position (`StoreState`: the text position, the shuffle buffer's
    rows, the RNG), and a resume continues from it on every rank: the same batches as the uninterrupted run, with no
    forward pass replayed. A checkpoint without it (an older version, or a data-parallel run's interrupt handler)
    falls back to SAE-Lens' skip ahead in the text, or with `exact_resume` (forced under torchrun, where SAE-Lens
    saves rank 0's position only) to a replay: the store, built and seeded as in the uninterrupted run, yields the
    batches the run drew before its checkpoint (the count saved with it), which are discarded.
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
        data_parallel.shard_cached_activations(self.activations_store)
        self.skip_nonfinite_rows, self.guard_state = skip_nonfinite_rows, guard_state
        self.store_state = tracked_store(self.activations_store, cfg)
        resuming = cfg.resume_from_checkpoint is not None
        self.saved_store_state = read_state(cfg.resume_from_checkpoint) if resuming and self.store_state else None
        self.exact_resume = exact_resume and resuming and self.saved_store_state is None
        self.guard: FiniteBatches | None = None
        self.trainer: SAETrainer[Any, Any] | None = None
        if self.saved_store_state is not None:
            # run() would skip the text ahead to the checkpoint's row; the store state restores the exact position.
            self.activations_store.load_from_checkpoint = lambda checkpoint_path: None  # type: ignore[method-assign]
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
        if self.store_state is not None and self.saved_store_state is not None:
            self.store_state.restore(self.saved_store_state)
        if self.exact_resume:
            for _ in tqdm(range(self.guard_state["batches_drawn"]), desc="Replaying the activation stream"):
                next(trainer.data_provider)
        self.guard = guard_trainer(trainer, skip_nonfinite_rows=self.skip_nonfinite_rows, guard_state=self.guard_state)
        if self.store_state is not None:
            self.store_state.around_checkpoints(trainer)
        data_parallel.data_parallel(trainer)
        self.trainer = trainer
        if self.store_state is not None and self.saved_store_state is not None:
            self.store_state.restore_rng()  # last: nothing before training may draw from it
        with fit_quietly_and_in_order(trainer):
            return super().run_trainer_with_interruption_handling(trainer=trainer)

    @override
    def save_checkpoint(self, checkpoint_path: Path | None) -> None:
        """SAE-Lens' runner files (the store's position, the runner config) inside a checkpoint folder the trainer is
        writing; called by SAE-Lens' SIGTERM / Ctrl-C handler with a new folder instead, it writes one whole
        resumable checkpoint (weights, trainer state, data position) from rank 0, and nothing from the other ranks
        (SAE-Lens' own would be a folder without weights on every rank)."""
        if checkpoint_path is None or checkpoint_path.exists() or self.trainer is None:
            super().save_checkpoint(checkpoint_path)
            if checkpoint_path is not None and self.store_state is not None:
                self.store_state.write_pending(checkpoint_path)
        elif is_main():
            self.trainer.save_checkpoint(checkpoint_name=checkpoint_path.name)

    @override
    def save_final_sae(
        self, sae: TrainingSAE[Any], output_path: str, log_feature_sparsity: torch.Tensor | None = None
    ) -> None:
        if not is_main():
            return
        check_finite(sae.state_dict(), f"refusing to save the trained SAE to {output_path}")
        with atomic_folder(output_path) as staged:
            super().save_final_sae(sae=sae, output_path=str(staged), log_feature_sparsity=log_feature_sparsity)
            data_parallel.write_runner_config(self.cfg, staged)


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
    cfg.sae = with_run_length(cfg.sae, cfg.total_training_steps)
    if data_parallel.split_over_ranks(cfg, skip_nonfinite_rows):
        # A checkpoint without the ranks' store states (`StoreState`) holds rank 0's text position only: a resume
        # from one replays each rank's stream.
        exact_resume = exact_resume or cfg.resume_from_checkpoint is not None
    if cfg.output_path is not None:
        check_replaceable(cfg.output_path)
    guard_state: dict[str, int] = {}
    if cfg.resume_from_checkpoint is not None:
        guard_state = check_checkpoint(cfg.resume_from_checkpoint, cfg.sae, has_activations_store=True)
    # Only the blocks up to the hook: SAE-Lens' activation store stops there too.
    override_model, override_dataset = model_and_text(cfg, extract_stop_at_layer_from_tlens_hook_name(cfg.hook_name))
    if cfg.dataset_path == LOCAL_TEXT_ID:
        text_tokens = len(override_dataset) * cfg.context_size
        passes = cfg.training_tokens / text_tokens
        print(
            f"{LOCAL_TEXT_ID}: {text_tokens:,} tokens of training text (every {HELDOUT_EVERY}th paragraph held out) "
            f"for {cfg.training_tokens:,} training tokens" + (f" ({passes:.1f} passes over it)" if passes > 1 else "")
        )
    # SAE-Lens' runner never seeds torch: its SAE initialisation and its shuffle buffer's permutations would follow
    # whatever ran before in the process. Seeded here, after the model is built, a run is the same for the same
    # --seed, and a resumed run's replay (exact_resume) draws the same permutations.
    torch.manual_seed(cfg.seed)
    with local_sources_quietly(override_model is not None, override_dataset is not None):
        with data_parallel.main_rank_first():  # SAE-Lens' runner loads what the overrides do not give it
            runner = _GuardedRunner(
                cfg,
                skip_nonfinite_rows=skip_nonfinite_rows,
                guard_state=guard_state,
                exact_resume=exact_resume,
                override_dataset=override_dataset,
                override_model=override_model,
            )
        sae = runner.run()
        if cfg.output_path is None or not is_main():
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
        n_eval = SUMMARY_BATCHES * world_size()
        summary, k_hat = summarise_saved(cfg.output_path, islice(eval_batches, n_eval), runner.trainer,
                                         eval_data=eval_data)  # fmt: skip
    summary.update(data_parallel.global_scale(cfg.train_batch_size_tokens, cfg.training_tokens))
    summary["nonfinite_rows_skipped"] = runner.guard.rows_skipped if runner.guard else 0
    write_summary(summary, k_hat, cfg.output_path)
    print_summary(summary)
    return sae
