"""Speed and memory of SoftSAE against SAE-Lens' TopK, BatchTopK and Matryoshka BatchTopK (issue 5).

One command, five sections, every result written under eval/results/ (CSV, PNG and a Markdown summary):

  steps       one training step exactly as SAE-Lens' SAETrainer runs it (training_forward_pass, the firing
              counters, backward, clip_grad_norm_, Adam step, zero_grad), for every architecture, interleaved
              in one process (A B C D A B C D ...), at the paper's shapes (d_in 512 / d_sae 4096 and
              2304 / 16384), SoftSAE in its soft and hard phases; medians, ratios to TopK, the matmul floor
              (the step's matmul FLOPs at the GEMM speed measured in the same rounds) and peak memory.
  soft_topk   LapSum soft_topk forward + backward against torch.topk (values + backward) for n from
              1,024 to 65,536 at k = 64: the full-sort reference path and the fast (top-k candidates) path.
  fallback    how often the fast path hands a row to the full solve, on the codes of a SoftSAE trained on
              SmolLM2-135M activations (counted during training and on held-out inputs) and on Gaussian scores.
  quality     the k head's quality: paper head (width d_sae) against a cheap head (width 256) and TopK on a
              short embedding-path training on SmolLM2 activations (FVE, L0, k_hat spread).
  throughput  tokens per second of a short `sae-lens train` run on SmolLM2-135M, softsae against topk.

    .venv/bin/python eval/bench_speed.py               # the full run (~7 min on 2 idle cores; --threads 1 if loaded)
    .venv/bin/python eval/bench_speed.py --quick       # a smoke run of every section (a few minutes)

On a machine with CUDA the step and soft_topk sections run on the GPU at the paper's batch sizes (8192 and
2048). Absolute timings on a shared machine are noisy; the ratios are taken between architectures measured
in the same rounds, and the machine's load average is recorded with every section.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from bench_speed_settings import PREFIX, RESULTS
from bench_speed_smollm2 import bench_smollm2
from bench_speed_soft_topk import bench_soft_topk
from bench_speed_steps import bench_steps
from bench_speed_summary import read_results, write_summary
from bench_speed_throughput import bench_throughput
from lab import REPO
from lab.timing import load_averages, machine_info

SECTIONS = ("steps", "soft_topk", "smollm2", "throughput")


def main(argv: Sequence[str] | None = None) -> None:
    """Run the benchmark's sections and write CSV, PNG and the Markdown summary under eval/results/."""
    import argparse

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a fast smoke run of every section")
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="the step and soft_topk sections' device (default: cuda when available)",
    )
    parser.add_argument("--run-dir", type=Path, help="measure the fallback rate on this trained SoftSAE's codes")
    parser.add_argument(
        "--config",
        type=Path,
        default=REPO / "configs" / "quickstart.yaml",
        help="the `sae-lens train` config of the throughput section",
    )
    parser.add_argument("--out", type=Path, default=RESULTS, help="where results go (default eval/results)")
    parser.add_argument(
        "--threads",
        type=int,
        help="intra-op CPU threads (torch.set_num_threads; OMP_NUM_THREADS for the sae-lens subprocesses); on a "
        "machine with more runnable jobs than cores, 1 avoids OpenMP barrier stalls that penalise small ops",
    )
    parser.add_argument(
        "--summary-only",
        action="store_true",
        help="measure nothing: rewrite the Markdown summary from the CSV files of the run already in --out",
    )
    args = parser.parse_args(argv)
    if args.summary_only:
        print(write_summary(*read_results(args.out), args.out))
        return
    if args.threads is not None:
        torch.set_num_threads(args.threads)
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
    device = torch.device(args.device)
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    info = machine_info(device)
    results: dict[str, Any] = {}
    if "steps" in args.sections:
        results["steps"] = bench_steps(device, args.quick, args.out)
    if "soft_topk" in args.sections:
        results["soft_topk"] = bench_soft_topk(device, args.quick, args.out)
    if "smollm2" in args.sections:
        results["quality"], results["fallback"] = bench_smollm2(args.quick, args.out, args.run_dir)
    if "throughput" in args.sections:
        results["throughput"] = bench_throughput(args.quick, args.out, args.config)
    info["load_average_end"] = load_averages()
    info["elapsed_s"] = time.perf_counter() - start
    info["quick"] = args.quick
    (args.out / f"{PREFIX}_machine.json").write_text(json.dumps(info, indent=2) + "\n")
    print(write_summary(results, info, args.out))


if __name__ == "__main__":
    main()
