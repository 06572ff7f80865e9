"""Training at scale (issue 12): a sweep from one model pass against separate runs, and 1 against 2 data-parallel
ranks, on the offline SmolLM2-135M, with every number written under eval/results/ (CSV, Markdown, PNG).

    .venv/bin/python eval/bench_scaling.py            # every section (~20 min on 2 idle cores)
    .venv/bin/python eval/bench_scaling.py --sections modes   # one section (modes: ~5 min)
    .venv/bin/python eval/bench_scaling.py --quick    # a smoke run

sweep: `sae-lens train --config` with 6 SAEs (SoftSAE, TopK and BatchTopK at k 16 and 32) from one forward pass,
       against the 6 single-SAE `sae-lens train` runs of the same SAEs, each a fresh process: tokens trained per second
       of wall time (SAE-tokens: tokens x SAEs), model loading and the summaries included, as a user runs them.
ranks: one SoftSAE on the same tokens with 1 process and under `torchrun --nproc_per_node 2` (gloo): wall time, and
       the share of rank 0's step time spent in collectives (torch.profiler's gloo/c10d events over steps after the
       first ones). On 2 cores two ranks compete with each other for the same cores: expect little.
modes: a sweep of the same 6 SAEs on a file of activations (d_in 576, random) under 2 gloo ranks, split by SAE
       (`sweep_parallel: sae`) against data-parallel (`data`), and in one process: the bytes each rank hands to
       collectives per step, counted by torch.profiler's gloo events (eval/lab/traffic.py), and the step time; then
       the bytes per step each mode would exchange for the paper's Gemma-2-2B sweep
       (configs/gemma2-2b-l12-sweep.yaml: 20 SAEs, d_in 2304, d_sae 16384, batch 2048) on 8 and 32 ranks, computed
       from its SAEs' shapes with the formula that the 2-rank count checks. Written to bench_scaling_modes.* (its own
       files: the other sections' summary is left as it is).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from lab import REPO
from lab.plots import pyplot
from lab.tables import write_csv
from lab.timing import load_averages
from lab.traffic import bytes_per_step, counted_command

RESULTS = REPO / "eval" / "results"
BIN = Path(sys.executable).parent
PREFIX = "bench_scaling"
SWEEP_GOAL = 3.0
BASE = {
    "model_name": "smollm2-135m-instruct-q4_1",
    "hook_name": "blocks.6.hook_resid_post",
    "dataset_path": "local:english-wikipedia",
    "context_size": 128,
    "exclude_special_tokens": True,
    "d_in": 576,
    "d_sae": 2304,
    "train_batch_size_tokens": 1024,
    "store_batch_size_prompts": 16,
    "n_batches_in_buffer": 16,
    "n_batches_for_norm_estimate": 5,
    "lr": 0.001,
    "seed": 42,
    "device": "cpu",
    "checkpoint_path": None,
}
SAES = {f"{arch}-k{k}": {"architecture": arch, "k": k} for arch in ("softsae", "topk", "batchtopk") for k in (16, 32)}
# The profiler's names for time spent in collectives (gloo's own events and the c10d front end).
COLLECTIVE_MARKS = ("gloo", "c10d", "all_reduce", "allreduce", "all_gather", "allgather", "broadcast")

PROFILED_RUN = """
import json, sys, time, torch
from torch.profiler import ProfilerActivity, profile
import softsae_plugin.collectives as collectives
import sae_lens.training.sae_trainer as sae_trainer

marks, warm, out = tuple(json.loads(sys.argv[1])), int(sys.argv[2]), sys.argv[3]
original = sae_trainer.SAETrainer._train_step
state = {"step": 0, "profiled": 0.0, "collective": 0.0, "steps": 0}

def timed_step(self, sae, sae_in):
    state["step"] += 1
    if state["step"] <= warm:
        return original(self, sae, sae_in)
    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        result = original(self, sae, sae_in)
    state["profiled"] += time.perf_counter() - start
    state["steps"] += 1
    # Self time of every event whose name marks a collective: the time spent communicating (or waiting for it).
    state["collective"] += sum(e.self_cpu_time_total for e in prof.key_averages()
                               if any(m in e.key.lower() for m in marks)) / 1e6
    return result

sae_trainer.SAETrainer._train_step = timed_step
from softsae_plugin.cli import main
try:
    main(sys.argv[4:])
finally:
    if collectives.is_main():
        with open(out, "w") as f:
            json.dump(state, f)
"""


def run(command: list[str], cwd: Path, env: dict[str, str]) -> float:
    """Wall seconds of `command` (which must succeed)."""
    start = time.perf_counter()
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
    return time.perf_counter() - start


def bench_sweep(tokens: int, work: Path, env: dict[str, str]) -> list[dict[str, Any]]:
    """6 SAEs from one pass against 6 separate runs (each a fresh process, as a user would run them)."""
    sweep = {**BASE, "training_tokens": tokens, "output_path": str(work / "sweep"), "saes": SAES}
    (work / "sweep.yaml").write_text(yaml.safe_dump(sweep))
    rows = [{"what": "sweep, one model pass", "saes": len(SAES), "tokens": tokens,
             "seconds": run([str(BIN / "sae-lens"), "train", "--config", "sweep.yaml"], work, env)}]  # fmt: skip
    separate = 0.0
    for name, options in SAES.items():
        single = {**BASE, **options, "training_tokens": tokens, "output_path": str(work / name)}
        (work / f"{name}.yaml").write_text(yaml.safe_dump(single))
        separate += run([str(BIN / "sae-lens"), "train", "--config", f"{name}.yaml"], work, env)
    rows.append({"what": "separate runs", "saes": len(SAES), "tokens": tokens, "seconds": separate})
    for row in rows:
        row["sae_tokens_per_s"] = row["saes"] * row["tokens"] / row["seconds"]
    rows[0]["speedup"] = rows[1]["seconds"] / rows[0]["seconds"]
    return rows


def bench_ranks(tokens: int, work: Path, env: dict[str, str], warm: int) -> list[dict[str, Any]]:
    """One SoftSAE with 1 process and with 2 gloo ranks (the same global batch and tokens)."""
    single = {**BASE, "architecture": "softsae", "k": 32, "k_max": 96, "training_tokens": tokens}
    (work / "ranks.yaml").write_text(yaml.safe_dump(single))
    script = work / "profiled_run.py"
    script.write_text(PROFILED_RUN)
    rows = []
    for ranks in (1, 2):
        stats = work / f"ranks{ranks}.json"
        args = [str(script), json.dumps(COLLECTIVE_MARKS), str(warm), str(stats), "train", "--config", "ranks.yaml",
                "--output_path", f"ranks{ranks}"]  # fmt: skip
        launcher = [str(BIN / "torchrun"), "--standalone", "--nproc_per_node", str(ranks)] if ranks > 1 else []
        command = [*launcher, *args] if ranks > 1 else [sys.executable, *args]
        seconds = run(command, work, env)
        state = json.loads(stats.read_text())
        summary = json.loads((work / f"ranks{ranks}" / "training_summary.json").read_text())
        rows.append(
            {
                "ranks": ranks,
                "tokens": tokens,
                "seconds": seconds,
                "tokens_per_s": tokens / seconds,
                "ms_per_step_profiled": 1e3 * state["profiled"] / max(state["steps"], 1),
                "collective_share": state["collective"] / state["profiled"] if state["profiled"] else float("nan"),
                "fve": summary["fve"],
                "mean_l0": summary["mean_l0"],
            }
        )
    for row in rows:
        row["speedup_vs_1"] = rows[0]["seconds"] / row["seconds"]
    return rows


# The modes section: the sweep's shapes, the steps counted and timed, and the paper's sweep computed.
MODES_SHAPE = {"d_in": 576, "d_sae": 2304, "train_batch_size_tokens": 1024, "n_batches_for_norm_estimate": 2,
               "lr": 0.001, "seed": 42, "dtype": "float32"}  # fmt: skip
GEMMA_SWEEP = REPO / "configs" / "gemma2-2b-l12-sweep.yaml"
GEMMA_RANKS = (8, 32)
FLOAT32 = 4  # bytes: the Gemma sweep's weights, gradients and activations, and SAE-Lens' firing counters


def sae_shapes(config: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The shared options of the sweep config at `config`, and per SAE its architecture and its numbers of parameters
    and buffer elements, counted on SAEs built on PyTorch's meta device (no memory: the shapes only)."""
    import dataclasses

    import torch
    from sae_lens.saes.sae import TrainingSAE

    from softsae_plugin.training.config import OWN_KEYS, load_sweep_config
    from softsae_plugin.training.sweep import build_sweep

    shared, saes = load_sweep_config(config)
    sweep = build_sweep({k: v for k, v in shared.items() if k not in OWN_KEYS}, saes)
    rows = []
    for name, cfg in sweep.runner.saes.items():
        with torch.device("meta"):
            sae = TrainingSAE.from_dict(dataclasses.replace(cfg, device="meta").to_dict())
        rows.append({"name": name, "architecture": cfg.architecture(), "d_sae": cfg.d_sae,
                     "parameters": sum(p.numel() for p in sae.parameters()),
                     "buffers": sum(b.numel() for b in sae.buffers())})  # fmt: skip
    return shared, rows


def bytes_by_mode(saes: list[dict[str, Any]], d_in: int, batch: int, ranks: int, element: int) -> dict[str, float]:
    """The bytes one rank hands to collectives per step of a sweep of `saes` (`sae_shapes`' rows) on `ranks` ranks.

    Split by SAE: its share of the batch of activations (one all_gather). Data-parallel: per SAE its gradients (DDP's
    all-reduce), its buffers (DDP broadcasts them every forward), SAE-Lens' two firing counters (float32, d_sae each)
    and the divergence flag (data_parallel.synchronise_counters, sweep.PerSAETrainer), and for SoftSAE the two rows of
    the rank's share of the batch that its constraint gathers (k_hat and the logits' norm); the few scalar sums
    of softsae's constraint and AuxK are left out (tens of bytes)."""
    rows = batch // ranks
    data = sum((sae["parameters"] + sae["buffers"]) * element + 2 * sae["d_sae"] * FLOAT32 + FLOAT32 for sae in saes)
    data += sum(2 * rows * element for sae in saes if sae["architecture"] == "softsae")
    return {"sae": rows * d_in * element, "data": data}


def bench_modes(work: Path, env: dict[str, str], quick: bool) -> dict[str, list[dict[str, Any]]]:
    """The same 6-SAE sweep on a file of activations in one process and on 2 gloo ranks in each mode: bytes per step
    counted and step time; then the paper's Gemma sweep computed on 8 and 32 ranks."""
    skip, steps = (2, 3) if quick else (3, 6)
    batch = MODES_SHAPE["train_batch_size_tokens"]
    np.save(work / "acts.npy", np.random.default_rng(0).standard_normal((20_000, MODES_SHAPE["d_in"]), np.float32))
    options = {key: value for key, value in MODES_SHAPE.items() if key != "dtype"}
    saes = {name: {**sae, "dtype": MODES_SHAPE["dtype"]} for name, sae in SAES.items()}
    sweep = {**options, "hook_name": "activations", "training_tokens": (skip + 2 + 2 * steps) * batch, "saes": saes}
    (work / "modes.yaml").write_text(yaml.safe_dump(sweep))
    _, shapes = sae_shapes(work / "modes.yaml")
    measured = []
    for ranks, mode in ((1, "one process"), (2, "data"), (2, "sae")):
        out = work / f"counted-{mode.replace(' ', '-')}"
        args = ["--config", "modes.yaml", "--activations", "acts.npy", "--output_path", "null"]  # training only
        args += ["--sweep_parallel", mode] if ranks > 1 else []
        command = counted_command(work / "counted.py", out, args, skip=skip, steps=steps)
        launcher = [str(BIN / "torchrun"), "--standalone", "--nproc_per_node", str(ranks)] if ranks > 1 else []
        # One thread per process, as torchrun gives each rank: the one process is one rank's worth of CPU.
        run([*launcher, *command] if ranks > 1 else [sys.executable, *command], work, {**env, "OMP_NUM_THREADS": "1"})
        counted = bytes_per_step(out)
        rank_0 = counted["per_rank"][0]
        formula = bytes_by_mode(shapes, MODES_SHAPE["d_in"], batch, ranks, FLOAT32)[mode] if ranks > 1 else 0
        slowest = max(r["step_seconds"] for r in counted["per_rank"].values())
        measured.append({"mode": mode, "ranks": ranks, "saes": len(shapes), "bytes_per_rank": rank_0["bytes"],
                         "bytes_all_ranks": counted["all_ranks"], "formula_bytes_per_rank": formula,
                         "by_collective": json.dumps(rank_0["by_op"]), "ms_per_step": 1e3 * slowest,
                         "calls_per_step": json.dumps(rank_0["calls_per_step"])})  # fmt: skip
    shared, gemma = sae_shapes(GEMMA_SWEEP)
    computed = []
    for ranks in GEMMA_RANKS:
        per_rank = bytes_by_mode(gemma, shared["d_in"], shared["train_batch_size_tokens"], ranks, FLOAT32)
        for mode in ("data", "sae"):
            computed.append({"mode": mode, "ranks": ranks, "saes": len(gemma),
                             "parameters": sum(s["parameters"] for s in gemma),
                             "bytes_per_rank": per_rank[mode], "bytes_all_ranks": per_rank[mode] * ranks})  # fmt: skip
    return {"modes": measured, "gemma_modes": computed}


def write_modes(results: dict[str, list[dict[str, Any]]], info: dict[str, Any], out: Path) -> str:
    """The modes section's CSVs, Markdown and PNG (bench_scaling_modes.*); returns the Markdown."""
    plt = pyplot()
    out.mkdir(parents=True, exist_ok=True)
    for section, rows in results.items():
        write_csv(out / f"{PREFIX}_{section}.csv", rows, sorted({k for r in rows for k in r}))
    measured, computed = results["modes"], results["gemma_modes"]
    lines = [
        f"Machine: {info['cpu_count']} cores, load average at start {info['load']} (other work on the machine).",
        "",
        f"A sweep of {measured[0]['saes']} SAEs (SoftSAE, TopK and BatchTopK at k 16 and 32; d_in 576, d_sae 2304, "
        "float32) on a file of random activations, global batch 1,024: the bytes each rank hands to collectives per "
        "step, counted by torch.profiler's gloo events over the steps after the first ones (rank 0's; rank 1's are "
        "the same), against the formula used for the Gemma table; step time over the steps after those, unprofiled "
        "(the slower rank's), one thread per process:",
        "",
        "| mode | ranks | bytes / step / rank (counted) | formula | all ranks | collectives (rank 0) | ms / step |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in measured:
        lines.append(
            f"| {r['mode']} | {r['ranks']} | {r['bytes_per_rank']:,.0f} | {r['formula_bytes_per_rank']:,.0f} | "
            f"{r['bytes_all_ranks']:,.0f} | {r['by_collective']} | {r['ms_per_step']:.0f} |"
        )
    lines += ["", f"The paper's Gemma-2-2B sweep ({GEMMA_SWEEP.relative_to(REPO)}: {computed[0]['saes']} SAEs, "
              f"{computed[0]['parameters'] / 1e9:.2f} B parameters with SoftSAE's k heads, d_in 2304, global batch "
              "2,048 tokens, float32), computed from the SAEs' shapes:", "",
              "| ranks | mode | bytes / step / rank | all ranks | data / sae |", "|---|---|---|---|---|"]  # fmt: skip
    by = {(r["ranks"], r["mode"]): r for r in computed}
    for ranks in GEMMA_RANKS:
        for mode in ("data", "sae"):
            r = by[ranks, mode]
            ratio = r["bytes_per_rank"] / by[ranks, "sae"]["bytes_per_rank"]
            lines.append(f"| {ranks} | {mode} | {_size(r['bytes_per_rank'])} | {_size(r['bytes_all_ranks'])} | "
                         f"{ratio:,.0f}x |")  # fmt: skip
    lines.append("")
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    two = [r for r in measured if r["ranks"] == 2]
    axes[0].bar([r["mode"] for r in two], [r["bytes_per_rank"] for r in two], color=["tab:gray", "tab:blue"])
    axes[0].set_yscale("log")
    axes[0].set_ylabel("bytes per step per rank (counted)")
    axes[0].set_title("6 SAEs, d_sae 2304, 2 gloo ranks", fontsize=10)
    for offset, mode, colour in ((-0.2, "data", "tab:gray"), (0.2, "sae", "tab:blue")):
        heights = [by[ranks, mode]["bytes_per_rank"] for ranks in GEMMA_RANKS]
        axes[1].bar([i + offset for i in range(len(GEMMA_RANKS))], heights, width=0.4, color=colour, label=mode)
    axes[1].set_xticks(range(len(GEMMA_RANKS)), [f"{ranks} ranks" for ranks in GEMMA_RANKS])
    axes[1].set_yscale("log")
    axes[1].set_ylabel("bytes per step per rank (computed)")
    axes[1].set_title("Gemma-2-2B sweep: 20 SAEs, d_sae 16384", fontsize=10)
    axes[1].legend(title="sweep_parallel", fontsize=8)
    return _save(fig, lines, out / f"{PREFIX}_modes.png", out / f"{PREFIX}_modes.md")


def _save(fig: Any, lines: list[str], png: Path, md: Path) -> str:
    """Write a section's figure and its Markdown; return the Markdown."""
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    pyplot().close(fig)
    text = "\n".join(lines)
    md.write_text(text)
    return text


def _size(n: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


def write(results: dict[str, list[dict[str, Any]]], info: dict[str, Any], out: Path) -> str:
    """CSV per section, a PNG of throughput, and the Markdown summary (returned)."""
    plt = pyplot()
    out.mkdir(parents=True, exist_ok=True)
    for section, rows in results.items():
        write_csv(out / f"{PREFIX}_{section}.csv", rows, sorted({k for r in rows for k in r}))
    lines = [f"Machine: {info['cpu_count']} cores, load average at start {info['load']}; torch threads per process: "
             f"{info['threads']}.", ""]  # fmt: skip
    if "sweep" in results:
        sweep, separate = results["sweep"]
        status = "met" if sweep["speedup"] >= SWEEP_GOAL else "**missed**"
        lines += [
            f"Sweep of {sweep['saes']} SAEs (SoftSAE, TopK, BatchTopK at k 16 and 32; d_sae 2304) on SmolLM2-135M "
            f"layer 6, {sweep['tokens']:,} tokens each, whole `sae-lens train` commands (model loading and summaries "
            "included):",
            "",
            "| run | wall s | SAE-tokens / s |",
            "|---|---|---|",
            f"| one sweep, one model pass | {sweep['seconds']:.0f} | {sweep['sae_tokens_per_s']:.0f} |",
            f"| {separate['saes']} separate runs | {separate['seconds']:.0f} | {separate['sae_tokens_per_s']:.0f} |",
            "",
            f"Speed-up of the sweep: **{sweep['speedup']:.2f}x** (goal >= {SWEEP_GOAL}x: {status}).",
            "",
        ]
    if "ranks" in results:
        lines += [
            "One SoftSAE (k 32, k_max 96), the same global batch of 1,024 tokens and the same tokens, 1 process "
            "against `torchrun --nproc_per_node 2` (gloo); collective share = the time rank 0's profiler attributes "
            "to gloo/c10d collectives, over the steps after the first ones:",
            "",
            "| ranks | wall s | tokens / s | speed-up | ms per step (profiled) | collective share | FVE | mean L0 |",
            "|---|---|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {r['ranks']} | {r['seconds']:.0f} | {r['tokens_per_s']:.0f} | {r['speedup_vs_1']:.2f} | "
            f"{r['ms_per_step_profiled']:.0f} | {100 * r['collective_share']:.1f}% | {r['fve']:.4f} | "
            f"{r['mean_l0']:.2f} |"
            for r in results["ranks"]
        ]
        lines += [""]
    fig, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 3.5), squeeze=False)
    for ax, (section, rows) in zip(axes[0], results.items(), strict=True):
        if section == "sweep":
            ax.bar([r["what"] for r in rows], [r["sae_tokens_per_s"] for r in rows], color=["tab:blue", "tab:gray"])
            ax.set_ylabel("SAE-tokens per second")
            ax.set_title(f"{rows[0]['saes']} SAEs: sweep {rows[0]['speedup']:.1f}x faster", fontsize=10)
        else:
            ax.bar([f"{r['ranks']} rank(s)" for r in rows], [r["tokens_per_s"] for r in rows], color="tab:green")
            ax.set_ylabel("tokens per second")
            ax.set_title("data-parallel on 2 cores", fontsize=10)
        ax.tick_params(axis="x", labelsize=8)
    return _save(fig, lines, out / f"{PREFIX}.png", out / f"{PREFIX}_summary.md")


def main(argv: list[str] | None = None) -> None:
    """Run the sections and write their results."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run with few tokens")
    parser.add_argument(
        "--sections", nargs="+", choices=("sweep", "ranks", "modes"), default=["sweep", "ranks", "modes"]
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    info = {"cpu_count": os.cpu_count(), "load": load_averages(),
            "threads": env.get("OMP_NUM_THREADS", "torch default (torchrun: 1 per rank)")}  # fmt: skip
    tokens = 8 * 1024 if args.quick else 60 * 1024
    results: dict[str, list[dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory(prefix="bench_scaling_") as tmp:
        work = Path(tmp)
        if "sweep" in args.sections:
            results["sweep"] = bench_sweep(tokens, work, env)
        if "ranks" in args.sections:
            results["ranks"] = bench_ranks(tokens, work, env, warm=2 if args.quick else 10)
        modes = bench_modes(work, env, args.quick) if "modes" in args.sections else None
    if results:
        print(write(results, info, args.out))
    if modes is not None:
        print(write_modes(modes, info, args.out))


if __name__ == "__main__":
    main()
