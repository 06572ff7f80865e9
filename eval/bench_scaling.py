"""Training at scale (issue 12): a sweep from one model pass against separate runs, and 1 against 2 data-parallel
ranks, on the offline SmolLM2-135M, with every number written under eval/results/ (CSV, Markdown, PNG).

    .venv/bin/python eval/bench_scaling.py            # both sections (~15 min on 2 idle cores)
    .venv/bin/python eval/bench_scaling.py --quick    # a smoke run

sweep: `sae-lens train --config` with 6 SAEs (SoftSAE, TopK and BatchTopK at k 16 and 32) from one forward pass,
       against the 6 single-SAE `sae-lens train` runs of the same SAEs, each a fresh process: tokens trained per second
       of wall time (SAE-tokens: tokens x SAEs), model loading and the summaries included, as a user runs them.
ranks: one SoftSAE on the same tokens with 1 process and under `torchrun --nproc_per_node 2` (gloo): wall time, and
       the share of rank 0's step time spent in collectives (torch.profiler's gloo/c10d events over steps after the
       first ones). On 2 cores two ranks compete with each other for the same cores: expect little.
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

import yaml
from lab import REPO
from lab.plots import pyplot
from lab.tables import write_csv
from lab.timing import load_averages

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
    fig.tight_layout()
    fig.savefig(out / f"{PREFIX}.png", dpi=110)
    plt.close(fig)
    text = "\n".join(lines)
    (out / f"{PREFIX}_summary.md").write_text(text)
    return text


def main(argv: list[str] | None = None) -> None:
    """Run the sections and write their results."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run with few tokens")
    parser.add_argument("--sections", nargs="+", choices=("sweep", "ranks"), default=["sweep", "ranks"])
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
    print(write(results, info, args.out))


if __name__ == "__main__":
    main()
