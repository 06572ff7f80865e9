"""bench_speed.py's steps section: one SAETrainer step of every architecture and SoftSAE phase, interleaved, with
the matmul floor and peak memory; inference and a whole short run beside it."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import gc
import math
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from bench_speed_settings import CHEAP_HEAD, CPU_BATCH, GOALS, K_MAX, PREFIX, SHAPES, SOFTSAE_PHASES, K, write_csv
from lab.plots import pyplot
from lab.timing import load_average, median, peak_memory_delta, quartiles, synchronize, tensor_bytes, timed
from sae_lens.config import LoggingConfig, SAETrainerConfig
from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAEConfig
from sae_lens.saes.matryoshka_batchtopk_sae import MatryoshkaBatchTopKTrainingSAEConfig
from sae_lens.saes.sae import TrainingSAE, TrainingSAEConfig
from sae_lens.saes.topk_sae import TopKTrainingSAEConfig
from sae_lens.training.sae_trainer import SAETrainer
from torch.utils.flop_counter import FlopCounterMode
from tqdm.auto import tqdm

from softsae_plugin import lapsum
from softsae_plugin.softsae import SoftTrainingSAE, SoftTrainingSAEConfig

# The steps of the short run whose average step time the summary reports beside the phases.
SHORT_RUN_STEPS = 50
MODELS = ("softsae_paper", "softsae_cheap", "topk", "batchtopk", "matryoshka_batchtopk")


def make_config(model: str, d_in: int, d_sae: int, total_steps: int, device: torch.device) -> TrainingSAEConfig:
    """The training config of one benchmarked architecture at k = 64 (SoftSAE: k_max = 128)."""
    common: dict[str, Any] = {"d_in": d_in, "d_sae": d_sae, "device": str(device)}
    if model.startswith("softsae"):
        head = None if model == "softsae_paper" else CHEAP_HEAD
        return SoftTrainingSAEConfig(**common, k=K, k_max=K_MAX, k_head_hidden=head, total_training_steps=total_steps)
    if model == "topk":
        return TopKTrainingSAEConfig(**common, k=K)
    if model == "batchtopk":
        return BatchTopKTrainingSAEConfig(**common, k=K)
    if model == "matryoshka_batchtopk":
        widths = [d_sae // 16, d_sae // 4, d_sae]
        return MatryoshkaBatchTopKTrainingSAEConfig(**common, k=K, matryoshka_widths=widths)
    raise ValueError(model)


def make_trainer(sae: TrainingSAE[Any], batch: int, total_steps: int, device: torch.device) -> SAETrainer[Any, Any]:
    """SAE-Lens' own SAETrainer around `sae` (its Adam, clipping and counters); batches are handed in directly."""
    cfg = SAETrainerConfig(
        total_training_samples=total_steps * batch,
        train_batch_size_samples=batch,
        lr=3e-4,
        lr_end=3e-4,
        device=str(device),
        logger=LoggingConfig(log_to_wandb=False),
    )
    return SAETrainer(cfg=cfg, sae=sae, data_provider=iter(()))


@dataclasses.dataclass
class StepCase:
    """One benchmarked step: an architecture (and SoftSAE phase) with its trainer, run on a given batch."""

    model: str
    phase: str
    run: Callable[[torch.Tensor], object]
    flops: float = math.nan
    persistent: float = math.nan
    times: list[float] = dataclasses.field(default_factory=list)
    peak_delta: float = math.nan

    @property
    def key(self) -> str:
        """A short name: model, plus the phase for SoftSAE."""
        return f"{self.phase}_{self.model.removeprefix('softsae_')}" if self.phase != "-" else self.model


def _unfreeze_k_head(sae: SoftTrainingSAE) -> None:
    # One model serves every phase: a hard-phase step froze the k head, so a soft-phase step unfreezes it
    # (its Adam state, allocated in the soft phase, stays, as in a real run's hard phase).
    if bool(sae.k_head_frozen):
        sae.k_head_frozen.fill_(False)
        sae._k_head_frozen = False  # the step reads the buffer's Python mirror
        for p in sae._k_head_params():
            p.requires_grad_(True)


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> Iterator[torch.Tensor]:
    for state in optimizer.state.values():
        yield from (v for v in state.values() if isinstance(v, torch.Tensor))


@contextlib.contextmanager
def _unfused_soft_topk() -> Iterator[None]:
    """Run soft_topk's fused passes uncompiled for a while (same results): no compilation for a one-off shape."""
    previous = lapsum._FUSION_FAILED
    lapsum._FUSION_FAILED = True
    try:
        yield
    finally:
        lapsum._FUSION_FAILED = previous


@contextlib.contextmanager
def _old_flush_floor() -> Iterator[None]:
    """soft_topk's float32 flush floor as it was before issue 13 (e^-80): weights down to 1e-35, whose products with
    codes and gradients are subnormal. A diagnostic: the summary shows the stall it caused."""
    previous = lapsum._EXP_FLOOR_FLOAT32
    lapsum._EXP_FLOOR_FLOAT32 = -80.0
    try:
        yield
    finally:
        lapsum._EXP_FLOOR_FLOAT32 = previous


def schedule_step(phase: str, total_steps: int) -> int:
    """The training step of `phase` (SOFTSAE_PHASES) in a run of `total_steps`."""
    return min(total_steps - 1, round(SOFTSAE_PHASES[phase] * total_steps))


def step_cases(shape: str, x: torch.Tensor, device: torch.device, seed: int = 0) -> list[StepCase]:
    """Every architecture and SoftSAE phase at one shape, each a closure running one SAETrainer step on a batch.

    SoftSAE is measured at the points of a real schedule (SOFTSAE_PHASES; the paper head also mid-anneal with the
    old flush floor, as a diagnostic). Each case runs once here (Adam allocates its state; SoftSAE initialises b_dec
    and compiles its fused soft top-k where that is on), and once more on 8 rows under FlopCounterMode: every matmul
    of a step scales with the batch, so its FLOPs at the full batch are those times batch / 8.
    """
    d_in, d_sae, _, total_steps = SHAPES[shape]
    cases: list[StepCase] = []
    for model in MODELS:
        torch.manual_seed(seed)
        sae = TrainingSAE.from_dict(make_config(model, d_in, d_sae, total_steps, device).to_dict())
        trainer = make_trainer(sae, x.shape[0], total_steps, device)
        if model.startswith("softsae"):
            phases = [(phase, schedule_step(phase, total_steps), False) for phase in SOFTSAE_PHASES]
            if model == "softsae_paper":
                phases.append(("mid_floor80", schedule_step("mid", total_steps), True))
        else:
            phases = [("-", 0, False)]
        for phase, step, old_floor in phases:

            def run(
                batch: torch.Tensor,
                sae: TrainingSAE[Any] = sae,
                trainer: SAETrainer[Any, Any] = trainer,
                phase: str = phase,
                step: int = step,
                old_floor: bool = old_floor,
            ) -> None:
                if phase != "hard" and isinstance(sae, SoftTrainingSAE):
                    _unfreeze_k_head(sae)
                trainer.n_training_steps = step
                with _old_flush_floor() if old_floor else contextlib.nullcontext():
                    trainer._train_step(sae, batch)

            cases.append(StepCase(model, phase, run))
            cases[-1].run(x)
        state = [*sae.parameters(), *sae.buffers(), *_optimizer_tensors(trainer.optimizer)]
        for case in cases[-len(phases) :]:
            case.persistent = tensor_bytes(iter(state))
    cases.append(gemm_case(d_in, d_sae, device))
    for case in cases:
        with _unfused_soft_topk(), FlopCounterMode(display=False) as counter:
            case.run(x[:8])
        case.flops = float(counter.get_total_flops()) * x.shape[0] / 8
    return cases


def gemm_case(d_in: int, d_sae: int, device: torch.device) -> StepCase:
    """The GEMMs of one dense TopK step (encoder and decoder, forward and backward) and nothing else."""
    gen = torch.Generator(device=device).manual_seed(1)
    w_enc = torch.randn(d_in, d_sae, generator=gen, device=device)
    w_dec = torch.randn(d_sae, d_in, generator=gen, device=device)

    def run(x: torch.Tensor) -> None:
        pre = x @ w_enc  # encoder forward
        _ = pre @ w_dec  # decoder forward
        g_acts = x @ w_dec.T  # decoder backward: the codes' gradient (x stands in for the output gradient)
        _ = pre.T @ x  # decoder backward: W_dec's gradient
        _ = x.T @ g_acts  # encoder backward: W_enc's gradient
        _ = g_acts @ w_enc.T  # encoder backward: the input's gradient (b_dec is subtracted from the input)

    return StepCase("gemm", "-", run)


def bench_steps(device: torch.device, quick: bool, out_dir: Path) -> list[dict[str, Any]]:
    """Section 1: interleaved training steps of every architecture and SoftSAE phase, with the matmul floor and peak
    memory; each ratio to TopK is the median over rounds of that round's ratio (and its interquartile range)."""
    rows: list[dict[str, Any]] = []
    for shape in SHAPES:
        d_in, d_sae, gpu_batch, _ = SHAPES[shape]
        batch = gpu_batch if device.type == "cuda" else CPU_BATCH[shape]
        if quick and device.type != "cuda":
            batch //= 4
        reps = 2 if quick else (11 if shape == "clip" or device.type == "cuda" else 7)
        load_start = load_average()
        # Inputs at SAE-Lens' normalisation (mean norm sqrt(d_in)): a coordinate is O(1).
        x = torch.randn(batch, d_in, generator=torch.Generator(device=device).manual_seed(0), device=device)
        cases = step_cases(shape, x, device)
        for _ in tqdm(range(reps), desc=f"steps {d_in}x{d_sae} batch {batch}", unit="round"):
            for case in cases:  # interleaved: A B C D, A B C D, ...
                case.times.append(timed(functools.partial(case.run, x), device))
        for case in cases:
            case.peak_delta = peak_memory_delta(functools.partial(case.run, x), device)
        load_end = load_average()
        gemm = next(c for c in cases if c.model == "gemm")
        gemm_flops_per_s = gemm.flops / median(gemm.times)
        topk = next(c for c in cases if c.model == "topk")
        topk_peak = topk.persistent + topk.peak_delta
        for case in cases:
            q1, q3 = quartiles(case.times)
            ratios = [t / t_topk for t, t_topk in zip(case.times, topk.times, strict=True)]
            peak = case.persistent + case.peak_delta
            rows.append(
                {
                    "device": device.type,
                    "shape": shape,
                    "d_in": d_in,
                    "d_sae": d_sae,
                    "batch": batch,
                    "model": case.model,
                    "phase": case.phase,
                    "key": case.key,
                    "median_ms": 1e3 * median(case.times),
                    "q1_ms": 1e3 * q1,
                    "q3_ms": 1e3 * q3,
                    "n_rounds": len(case.times),
                    "ratio_vs_topk": median(ratios),
                    "ratio_q1": quartiles(ratios)[0],
                    "ratio_q3": quartiles(ratios)[1],
                    "matmul_gflop": case.flops / 1e9,
                    "floor_ms": 1e3 * case.flops / gemm_flops_per_s,
                    "floor_ratio_vs_topk": case.flops / topk.flops,
                    "gemm_gflops_per_s": gemm_flops_per_s / 1e9,
                    "persistent_mb": case.persistent / 2**20,
                    "step_peak_delta_mb": case.peak_delta / 2**20,
                    "peak_mb": peak / 2**20,
                    "peak_ratio_vs_topk": peak / topk_peak,
                    "load_start": load_start,
                    "load_end": load_end,
                }
            )
        rows += bench_inference(shape, x, device, reps)
        del cases
        gc.collect()
    rows += bench_short_run(device, quick)
    write_csv("steps", rows, out_dir)
    plot_steps([r for r in rows if r["phase"] not in ("inference", "short run")], out_dir)
    return rows


def bench_inference(shape: str, x: torch.Tensor, device: torch.device, reps: int) -> list[dict[str, Any]]:
    """Inference, decode(encode(x)) without gradients: SoftSAE (paper head and narrow head) against SAE-Lens' TopK,
    interleaved; SoftSAE decodes from the kept codes where its shape makes that pay (`sparse_decode`)."""
    from sae_lens.saes.topk_sae import TopKSAE, TopKSAEConfig

    from softsae_plugin import SoftSAE, SoftSAEConfig

    d_in, d_sae, _, _ = SHAPES[shape]
    common = {"d_in": d_in, "d_sae": d_sae, "device": str(device)}
    torch.manual_seed(0)
    saes = {
        "topk": TopKSAE(TopKSAEConfig(**common, k=K)),
        "softsae_paper": SoftSAE(SoftSAEConfig(**common, k=K, k_max=K_MAX)),
        "softsae_cheap": SoftSAE(SoftSAEConfig(**common, k=K, k_max=K_MAX, k_head_hidden=CHEAP_HEAD)),
    }
    times: dict[str, list[float]] = {name: [] for name in saes}
    with torch.no_grad():
        for sae in saes.values():
            sae.decode(sae.encode(x))
        for _ in range(reps):
            for name, sae in saes.items():
                times[name].append(timed(lambda sae=sae: sae.decode(sae.encode(x)), device))
    rows = []
    for name, ts in times.items():
        ratios = [t / t_topk for t, t_topk in zip(ts, times["topk"], strict=True)]
        rows.append(
            {
                "device": device.type,
                "shape": shape,
                "d_in": d_in,
                "d_sae": d_sae,
                "batch": x.shape[0],
                "model": name,
                "phase": "inference",
                "key": f"infer_{name.removeprefix('softsae_')}",
                "median_ms": 1e3 * median(ts),
                "n_rounds": len(ts),
                "ratio_vs_topk": median(ratios),
                "ratio_q1": quartiles(ratios)[0],
                "ratio_q3": quartiles(ratios)[1],
            }
        )
    return rows


def bench_short_run(device: torch.device, quick: bool) -> list[dict[str, Any]]:
    """The average step of a whole short run (SHORT_RUN_STEPS steps of SAETrainer with its real schedule: tau anneal,
    target anneal, soft phase, hard phase) at the CLIP shape, every architecture, from one seed."""
    d_in, d_sae, gpu_batch, _ = SHAPES["clip"]
    batch = gpu_batch if device.type == "cuda" else CPU_BATCH["clip"] // (4 if quick else 1)
    steps = 10 if quick else SHORT_RUN_STEPS
    gen = torch.Generator(device=device).manual_seed(1)
    data = [torch.randn(batch, d_in, generator=gen, device=device) for _ in range(8)]
    seconds: dict[str, float] = {}
    for model in MODELS:
        torch.manual_seed(0)
        sae = TrainingSAE.from_dict(make_config(model, d_in, d_sae, steps, device).to_dict())
        trainer = make_trainer(sae, batch, steps, device)
        synchronize(device)
        start = time.perf_counter()
        for step in range(steps):
            trainer.n_training_steps = step
            trainer._train_step(sae, data[step % len(data)])
        synchronize(device)
        seconds[model] = time.perf_counter() - start
    return [
        {
            "device": device.type,
            "shape": "clip",
            "d_in": d_in,
            "d_sae": d_sae,
            "batch": batch,
            "model": model,
            "phase": "short run",
            "key": f"run_{model}",
            "median_ms": 1e3 * s / steps,
            "n_rounds": steps,
            "ratio_vs_topk": s / seconds["topk"],
        }
        for model, s in seconds.items()
    ]


def plot_steps(rows: list[dict[str, Any]], out_dir: Path) -> None:
    """Bar charts of the step-time and peak-memory ratios to TopK, with the matmul floor and the goals."""
    plt = pyplot()
    shapes = sorted({(r["d_in"], r["d_sae"], r["batch"]) for r in rows})
    fig, axes = plt.subplots(2, len(shapes), figsize=(6 * len(shapes), 7), squeeze=False)
    for col, (d_in, d_sae, batch) in enumerate(shapes):
        sub = [r for r in rows if (r["d_in"], r["d_sae"], r["batch"]) == (d_in, d_sae, batch) and r["model"] != "gemm"]
        names = [r["key"] for r in sub]
        xs = range(len(sub))
        ax = axes[0][col]
        ax.bar(
            xs,
            [r["ratio_vs_topk"] for r in sub],
            yerr=[[r["ratio_vs_topk"] - r["ratio_q1"] for r in sub], [r["ratio_q3"] - r["ratio_vs_topk"] for r in sub]],
            color="tab:blue",
            label="measured step (IQR over rounds)",
        )
        ax.scatter(
            xs,
            [r["floor_ratio_vs_topk"] for r in sub],
            color="black",
            marker="_",
            s=400,
            zorder=3,
            label="matmul floor",
        )
        for goal, style in ((GOALS["soft_paper"], "--"), (GOALS["soft_cheap"], ":"), (GOALS["hard_paper"], "-.")):
            ax.axhline(goal, color="tab:red", linestyle=style, linewidth=1, label=f"goal {goal}x")
        ax.set_xticks(list(xs), names, rotation=35, ha="right", fontsize=8)
        ax.set_ylabel("step time / TopK")
        ax.set_title(f"d_in {d_in} / d_sae {d_sae}, batch {batch} ({sub[0]['device']})", fontsize=10)
        ax.legend(fontsize=7)
        ax = axes[1][col]
        ax.bar(xs, [r["peak_ratio_vs_topk"] for r in sub], color="tab:green")
        ax.axhline(GOALS["memory"], color="tab:red", linestyle="--", linewidth=1, label="goal 1.7x")
        ax.set_xticks(list(xs), names, rotation=35, ha="right", fontsize=8)
        ax.set_ylabel("peak memory / TopK")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_dir / f"{PREFIX}_steps.png", dpi=110)
    plt.close(fig)
