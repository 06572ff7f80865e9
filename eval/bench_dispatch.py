"""What a GPU would launch per SoftSAE training step: ATen operators and host syncs (issue 21).

A training step is SAE-Lens' own `SAETrainer._train_step` (forward, SAE-Lens' firing counters, backward, gradient
clipping, Adam, zero_grad) with Adam switched to its multi-tensor (foreach) implementation, the one PyTorch picks on
CUDA; inference is `decode(encode(x))` without gradients. Every ATen operator that reaches the dispatcher is counted
(`TorchDispatchMode`), as the issue did; "kernels" leaves out the operators that launch nothing on a GPU (views,
`empty`, the host-sync reads themselves). Host syncs are the operators that make the host wait for the device:
`aten._local_scalar_dense` (`.item()`, `bool(t)`, `int(t)`, `float(t)`), and operators whose output size depends on
the data (`nonzero`, `masked_select`, indexing with a boolean mask); Adam's reads of its step counters are left out
(they live on the host on CUDA too). A sync is "own" when softsae_plugin's code is on the Python stack at that moment,
"trainer" otherwise (SAE-Lens: its trainer's firing counters, and the baselines' own code).

The counts are measured on CPU with real data: an operator count depends on the data only through the branches that
syncs decide, so the batch is kept small (`--batch`, 64 by default) and the Gemma shape costs seconds (batch 64 and
256 give the same counts at 512/4096). A compiled region (soft top-k's `fuse_soft_topk` loops) counts as the kernels
inductor generated for it: its calls are run uncompiled with the dispatch counter paused and counted as
`torch._inductor.metrics.generated_kernel_count` of its compilation (CPU codegen; Triton's fusion is similar).

Phases at total_training_steps = 1000 (tau anneals over 20 steps, the target k over 10, the hard phase is the last
100): start (step 0, target k = k_max), mid (step 5), final (step 500), hard (step 950); each is run once unmeasured
(b_dec's initialisation, the hard phase's freeze) and then counted.

    python eval/bench_dispatch.py count [--out eval/results/dispatch] [--tag after]
    python eval/bench_dispatch.py time --base /work/wt-base [--reps 5]   # interleaved CPU step times
    python eval/bench_dispatch.py compiled --batch 512                     # compile_sae's step beside eager
    python eval/bench_dispatch.py summary                                 # summary.md from the CSVs
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import functools
import os
import statistics
import subprocess
import sys
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

SHAPES = {"512/4096": (512, 4096), "2304/16384": (2304, 16384)}
K, K_MAX, TOTAL_STEPS = 32, 64, 1000
PHASES = {"start": 0, "mid": 5, "final": 500, "hard": 950}
# SoftSAE variants: config options over the defaults (the paper's head, the constraint control, eager).
SOFT_MODELS: dict[str, dict[str, Any]] = {
    "softsae_paper": {},
    "softsae_h256": {"k_head_hidden": 256},
    "softsae_paper_fused": {"fuse_soft_topk": True},
    # The paper's softplus budget in the soft phase (no shift to solve), the hard phase calibrated (issue 23).
    "softsae_paper_softplus": {"sparsity_control": "softplus", "calibrate_hard_l0": True},
}
BASELINES = ("topk", "batchtopk", "matryoshka")
NO_LAUNCH = {aten.empty.memory_format, aten.empty_like.default, aten.empty_strided.default, aten.detach.default}
SYNC_OPS = {aten._local_scalar_dense.default, aten.nonzero.default, aten.masked_select.default}
PACKAGE = "softsae_plugin"
HOST_STATE = "torch/optim/"


class DispatchCounter(TorchDispatchMode):
    """Counts ATen operators, kernels and host syncs (own vs trainer) while active; `paused` stops counting."""

    def __init__(self) -> None:
        super().__init__()
        self.ops = self.kernels = self.own_syncs = self.other_syncs = 0
        self.paused = False
        self.by_op: Counter[str] = Counter()
        self.sync_sites: Counter[str] = Counter()
        self.other_sites: Counter[str] = Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if not self.paused:
            self.ops += 1
            self.by_op[str(func)] += 1
            if func not in NO_LAUNCH and func not in SYNC_OPS and not func.is_view:
                self.kernels += 1
            if _is_sync(func, args):
                self._record_sync()
        return func(*args, **(kwargs or {}))

    def _record_sync(self) -> None:
        stack = traceback.extract_stack()
        if any(HOST_STATE in f.filename for f in stack):
            return  # Adam reads its step counters, which live on the host on CUDA too
        frames = [f for f in stack if PACKAGE in f.filename]
        if frames:
            self.own_syncs += 1
            self.sync_sites[f"{Path(frames[-1].filename).name}:{frames[-1].lineno}"] += 1
        else:
            self.other_syncs += 1
            frame = [f for f in stack if "bench_dispatch" not in f.filename and "/torch/" not in f.filename][-1]
            self.other_sites[f"{Path(frame.filename).name}:{frame.lineno}"] += 1


def _is_sync(func: Any, args: Any) -> bool:
    if func in SYNC_OPS:
        return True
    if func in (aten.index.Tensor, aten.index_put_.default, aten.index_put.default):
        indices = args[1]
        return any(i is not None and i.dtype == torch.bool for i in indices)
    return False


@contextlib.contextmanager
def compiled_regions_as_kernels(counter: DispatchCounter) -> Iterator[dict[str, int]]:
    """Count each call of soft top-k's fused regions as the kernels inductor generated for it (see the module)."""
    from softsae_plugin import lapsum

    sizes: dict[str, int] = {}
    original = lapsum._call_fused

    def call(fn: Callable[..., Any], *args: torch.Tensor) -> Any:
        if fn.__name__ not in sizes:
            from torch._inductor import metrics

            with _paused(counter):
                before = metrics.generated_kernel_count
                torch._dynamo.reset()
                torch.compile(fn)(*args)
                sizes[fn.__name__] = metrics.generated_kernel_count - before
        with _paused(counter):
            result = fn(*args)
        counter.ops += sizes[fn.__name__]
        counter.kernels += sizes[fn.__name__]
        return result

    lapsum._call_fused = call
    try:
        yield sizes
    finally:
        lapsum._call_fused = original


@contextlib.contextmanager
def _paused(counter: DispatchCounter) -> Iterator[None]:
    previous, counter.paused = counter.paused, True
    try:
        yield
    finally:
        counter.paused = previous


def make_sae(model: str, d_in: int, d_sae: int, device: str = "cpu") -> Any:
    """The training SAE of one benchmarked architecture at k = 32 (SoftSAE: k_max = 64)."""
    from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAEConfig
    from sae_lens.saes.matryoshka_batchtopk_sae import MatryoshkaBatchTopKTrainingSAEConfig
    from sae_lens.saes.sae import TrainingSAE
    from sae_lens.saes.topk_sae import TopKTrainingSAEConfig

    from softsae_plugin import SoftTrainingSAEConfig

    common: dict[str, Any] = {"d_in": d_in, "d_sae": d_sae, "device": device}
    if model.startswith("softsae"):
        cfg: Any = SoftTrainingSAEConfig(
            **common, k=K, k_max=K_MAX, total_training_steps=TOTAL_STEPS, **SOFT_MODELS[model]
        )
    elif model == "topk":
        cfg = TopKTrainingSAEConfig(**common, k=K)
    elif model == "batchtopk":
        cfg = BatchTopKTrainingSAEConfig(**common, k=K)
    else:
        cfg = MatryoshkaBatchTopKTrainingSAEConfig(**common, k=K, matryoshka_widths=[d_sae // 16, d_sae // 4, d_sae])
    return TrainingSAE.from_dict(cfg.to_dict())


def make_trainer(sae: Any, batch: int, device: str = "cpu") -> Any:
    """SAE-Lens' SAETrainer around `sae`, its Adam on the multi-tensor path that CUDA would take."""
    from sae_lens.config import LoggingConfig
    from sae_lens.training.sae_trainer import SAETrainer, SAETrainerConfig

    cfg = SAETrainerConfig(
        total_training_samples=TOTAL_STEPS * batch,
        train_batch_size_samples=batch,
        lr=3e-4,
        lr_end=3e-4,
        device=device,
        logger=LoggingConfig(log_to_wandb=False),
    )
    trainer = SAETrainer(cfg=cfg, sae=sae, data_provider=iter(()))
    for group in trainer.optimizer.param_groups:
        group["foreach"] = True
    return trainer


def step_runner(
    model: str, d_in: int, d_sae: int, batch: int, device: str = "cpu"
) -> tuple[Callable[[int, torch.Tensor], Any], Any]:
    """A function running one trainer step of `model` at a given step number, and its SAE."""
    torch.manual_seed(0)
    sae = make_sae(model, d_in, d_sae, device)
    trainer = make_trainer(sae, batch, device)

    def run(step: int, x: torch.Tensor) -> Any:
        trainer.n_training_steps = step
        return trainer._train_step(sae, x)

    return run, sae


def inference_runner(model: str, d_in: int, d_sae: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """decode(encode(x)) of the inference SAE of `model` (SoftSAE or TopK)."""
    from sae_lens.saes.topk_sae import TopKSAE, TopKSAEConfig

    from softsae_plugin.softsae import SoftSAE, SoftSAEConfig

    torch.manual_seed(0)
    common: dict[str, Any] = {"d_in": d_in, "d_sae": d_sae, "device": "cpu"}
    if model == "topk":
        sae: Any = TopKSAE(TopKSAEConfig(**common, k=K))
    else:
        sae = SoftSAE(SoftSAEConfig(**common, k=K, k_max=K_MAX, k_head_hidden=SOFT_MODELS[model].get("k_head_hidden")))
        with torch.no_grad():  # a trained-like head: k_hat spread around k rather than all at k_max / 2
            sae.w_k_out.normal_(0, 1 / (sae.w_k_out.numel() ** 0.5))

    @torch.no_grad()
    def run(x: torch.Tensor) -> torch.Tensor:
        return sae.decode(sae.encode(x))

    return run


def activations(d_in: int, batch: int, seed: int = 0) -> torch.Tensor:
    """Synthetic activations: mean norm about sqrt(d_in), as SAE-Lens' normalisation makes them."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, d_in, generator=gen) * (1 + torch.rand(batch, 1, generator=gen))


def count(fn: Callable[[], Any], fused: bool) -> DispatchCounter:
    """Operators, kernels and syncs of one call of `fn`, with SoftSAE on its accelerator path (static top-k bounds,
    which it takes on CPU only when compiling) where this tree has one."""
    from softsae_plugin import softsae

    counter = DispatchCounter()
    previous = getattr(softsae, "STATIC_BOUNDS_ON_CPU", None)
    softsae.STATIC_BOUNDS_ON_CPU = True
    try:
        with compiled_regions_as_kernels(counter) if fused else contextlib.nullcontext(), counter:
            fn()
    finally:
        softsae.STATIC_BOUNDS_ON_CPU = previous
    return counter


def count_shape(shape: str, batch: int) -> list[dict[str, Any]]:
    """Counts of every architecture and SoftSAE phase, and of inference, at one shape."""
    d_in, d_sae = SHAPES[shape]
    x = activations(d_in, batch)
    rows: list[dict[str, Any]] = []
    for model in (*SOFT_MODELS, *BASELINES):
        run, _ = step_runner(model, d_in, d_sae, batch)
        phases = PHASES if model.startswith("softsae") else {"step": 0}
        for phase, step in phases.items():
            run(step, x)  # unmeasured: b_dec's initialisation, the hard phase's freeze, Adam's state
            counter = count(
                lambda run=run, step=step: run(step, x), fused=SOFT_MODELS.get(model, {}).get("fuse_soft_topk", False)
            )
            rows.append(_row(shape, model, phase, batch, counter))
            print(_describe(rows[-1]), flush=True)
    for model in ("softsae_paper", "softsae_h256", "topk"):
        infer = inference_runner(model, d_in, d_sae)
        infer(x)
        rows.append(_row(shape, model, "inference", batch, count(lambda infer=infer: infer(x), fused=False)))
        print(_describe(rows[-1]), flush=True)
    return rows


def _row(shape: str, model: str, phase: str, batch: int, counter: DispatchCounter) -> dict[str, Any]:
    return {
        "shape": shape,
        "model": model,
        "phase": phase,
        "batch": batch,
        "ops": counter.ops,
        "kernels": counter.kernels,
        "own_syncs": counter.own_syncs,
        "trainer_syncs": counter.other_syncs,
        "own_sync_sites": " ".join(f"{site}x{n}" for site, n in sorted(counter.sync_sites.items())),
        "trainer_sync_sites": " ".join(f"{site}x{n}" for site, n in sorted(counter.other_sites.items())),
    }


def _describe(row: dict[str, Any]) -> str:
    return (
        f"{row['shape']:>10} {row['model']:>20} {row['phase']:>9}: {row['ops']:5d} ops {row['kernels']:5d} kernels "
        f"{row['own_syncs']:3d} own syncs {row['trainer_syncs']:2d} trainer syncs {row['own_sync_sites']} "
        f"| {row['trainer_sync_sites']}"
    )


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    """Write `rows` (dicts of one set of keys) to `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def time_worker(batch: int) -> None:
    """Serve timing requests on stdin ("MODEL PHASE REPS" per line): the median seconds of one step (or inference)."""
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    d_in, d_sae = SHAPES["512/4096"]
    x = activations(d_in, batch)
    runners: dict[str, Callable[[int, torch.Tensor], Any]] = {}
    for line in sys.stdin:
        model, phase, reps = line.split()
        if phase == "inference":
            once: Callable[[], Any] = functools.partial(inference_runner(model, d_in, d_sae), x)
        else:
            if model not in runners:
                runners[model] = step_runner(model, d_in, d_sae, batch)[0]
            once = functools.partial(runners[model], PHASES.get(phase, 0), x)
        once()
        times = []
        for _ in range(int(reps)):
            start = time.perf_counter()
            once()
            times.append(time.perf_counter() - start)
        print(statistics.median(times), flush=True)


def time_compare(base: Path, reps: int, batch: int, rounds: int) -> list[dict[str, Any]]:
    """Step times of the baseline tree and this one, in two worker processes asked in turn (interleaved)."""
    here = Path(__file__).resolve().parents[1]
    workers = {}
    for label, root in (("before", base), ("after", here)):
        env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
        workers[label] = subprocess.Popen(
            [sys.executable, str(here / "eval" / "bench_dispatch.py"), "time-worker", "--batch", str(batch)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
    cases = [(m, p) for m in ("softsae_paper", "softsae_h256") for p in PHASES]
    cases += [("topk", "step"), ("softsae_paper", "inference"), ("topk", "inference")]
    samples: dict[tuple[str, str, str], list[float]] = {}
    for index in range(rounds):
        for model, phase in cases:
            # Each round asks the two in the other order, so that neither always runs right after the other.
            for label, worker in sorted(workers.items(), reverse=bool(index % 2)):
                assert worker.stdin is not None and worker.stdout is not None
                worker.stdin.write(f"{model} {phase} {reps}\n")
                worker.stdin.flush()
                samples.setdefault((model, phase, label), []).append(float(worker.stdout.readline()))
    for worker in workers.values():
        assert worker.stdin is not None
        worker.stdin.close()
        worker.wait()
    rows = []
    for model, phase in cases:
        before = statistics.median(samples[(model, phase, "before")])
        after = statistics.median(samples[(model, phase, "after")])
        rows.append(
            {"model": model, "phase": phase, "batch": batch, "before_ms": round(1e3 * before, 2),
             "after_ms": round(1e3 * after, 2), "after_over_before": round(after / before, 3)}
        )  # fmt: skip
        print(rows[-1], flush=True)
    return rows


def time_compiled(batch: int, reps: int, phases: list[str]) -> list[dict[str, Any]]:
    """SoftSAE's step with SAE-Lens' compile_sae (training_forward_pass through torch.compile, inductor) beside the
    eager step, in this tree, at 512/4096: compile seconds (the first call at each phase) and median step times."""
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    d_in, d_sae = SHAPES["512/4096"]
    x = activations(d_in, batch)
    rows = []
    eager_run, _ = step_runner("softsae_paper", d_in, d_sae, batch)
    compiled_run, sae = step_runner("softsae_paper", d_in, d_sae, batch)
    sae.training_forward_pass = torch.compile(sae.training_forward_pass)
    for phase in phases:
        step = PHASES[phase]
        eager_run(step, x)
        start = time.perf_counter()
        compiled_run(step, x)
        compile_s = time.perf_counter() - start
        samples: dict[str, list[float]] = {"eager": [], "compiled": []}
        for _ in range(reps):  # interleaved
            for label, run in (("eager", eager_run), ("compiled", compiled_run)):
                start = time.perf_counter()
                run(step, x)
                samples[label].append(time.perf_counter() - start)
        eager_ms, compiled_ms = (1e3 * statistics.median(samples[k]) for k in ("eager", "compiled"))
        rows.append({"phase": phase, "batch": batch, "first_call_s": round(compile_s, 1),
                     "eager_ms": round(eager_ms, 2), "compiled_ms": round(compiled_ms, 2),
                     "compiled_over_eager": round(compiled_ms / eager_ms, 3)})  # fmt: skip
        print(rows[-1], flush=True)
    return rows


def _read_csv(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


def summarise(out: Path) -> Path:
    """summary.md from counts_before.csv, counts_after.csv (and times_after.csv if present): per shape, model and
    phase the operators, kernels and own host syncs before and after, and after's ratio to TopK's step."""
    before = {(r["shape"], r["model"], r["phase"]): r for r in _read_csv(out / "counts_before.csv")}
    after = _read_csv(out / "counts_after.csv")
    lines = [
        "# Dispatch counts per training step and per inference call (eval/bench_dispatch.py)",
        "",
        "Before: the code at 92a8ade; after: this branch. ops: ATen operators dispatched; kernels: those that launch",
        "a GPU kernel (no views, no `empty`); own syncs: host syncs with softsae_plugin on the stack (SAE-Lens' own",
        "syncs, its trainer's firing counters and the baselines', are in the CSVs). Ratios: after's ops over TopK's",
        "(its step, or its inference) at the same shape. Counts do not depend on the batch (64 rows here).",
        "",
        "| shape | model | phase | ops before | ops after | kernels before | kernels after | own syncs before |"
        " own syncs after | ops / TopK after |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    topk = {(r["shape"], r["phase"] == "inference"): int(r["ops"]) for r in after if r["model"] == "topk"}
    for row in after:
        old = before.get((row["shape"], row["model"], row["phase"]), {})
        ratio = int(row["ops"]) / topk[(row["shape"], row["phase"] == "inference")]
        lines.append(
            f"| {row['shape']} | {row['model']} | {row['phase']} | {old.get('ops', '')} | {row['ops']} | "
            f"{old.get('kernels', '')} | {row['kernels']} | {old.get('own_syncs', '')} | {row['own_syncs']} | "
            f"{ratio:.2f} |"
        )
    compiled = out / "compiled.csv"
    if compiled.exists():
        lines += [
            "",
            "## The compiled step on CPU (eval/bench_dispatch.py compiled)",
            "",
            "softsae_paper at 512/4096, training_forward_pass through torch.compile (inductor) as SAE-Lens'",
            "compile_sae does, beside the eager step in the same process, interleaved; first_call_s includes",
            "compiling (2 shared CPU cores).",
            "",
            "| phase | batch | first call s | eager ms | compiled ms | compiled / eager |",
            "|---|---|---|---|---|---|",
        ]
        for row in _read_csv(compiled):
            lines.append(
                f"| {row['phase']} | {row['batch']} | {row['first_call_s']} | {row['eager_ms']} | "
                f"{row['compiled_ms']} | {row['compiled_over_eager']} |"
            )
    times = out / "times_after.csv"
    if times.exists():
        lines += [
            "",
            "## CPU time per step (eval/bench_dispatch.py time)",
            "",
            "512/4096, batch 512, one thread, before and after in two worker processes asked in turn (interleaved),",
            "medians; measured on 2 CPU cores shared with other work, so only the ratio within a row means much.",
            "",
            "| model | phase | before ms | after ms | after / before |",
            "|---|---|---|---|---|",
        ]
        for row in _read_csv(times):
            lines.append(
                f"| {row['model']} | {row['phase']} | {row['before_ms']} | {row['after_ms']} | "
                f"{row['after_over_before']} |"
            )
    path = out / "summary.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=("count", "time", "time-worker", "compiled", "summary"))
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "dispatch")
    parser.add_argument("--tag", default="after", help="the CSV's name: counts_<tag>.csv")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES))
    parser.add_argument("--base", type=Path, help="time: the baseline tree to compare against")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if args.mode == "time-worker":
        time_worker(args.batch)
    elif args.mode == "summary":
        print(summarise(args.out))
    elif args.mode == "compiled":
        write_csv(time_compiled(args.batch, args.reps, ["final", "hard"]), args.out / "compiled.csv")
    elif args.mode == "time":
        if args.base is None:
            parser.error("time needs --base (the baseline tree)")
        write_csv(time_compare(args.base, args.reps, args.batch, args.rounds), args.out / f"times_{args.tag}.csv")
    else:
        rows = [row for shape in args.shapes for row in count_shape(shape, args.batch)]
        write_csv(rows, args.out / f"counts_{args.tag}.csv")


if __name__ == "__main__":
    main()
