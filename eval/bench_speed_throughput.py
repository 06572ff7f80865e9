"""bench_speed.py's throughput section: tokens per second of a short `sae-lens train` run, softsae against topk."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench_speed_settings import write_csv
from lab import REPO
from lab.timing import load_average
from sae_lens.saes.topk_sae import TopKTrainingSAEConfig
from tqdm.auto import tqdm

from softsae_plugin.softsae import SoftTrainingSAEConfig

# `sae-lens train` is softsae_plugin.cli:main; this runs the same function with SAETrainer.fit timed.
_TIMED_SAE_LENS = """
import sys, time
from sae_lens.training.sae_trainer import SAETrainer
fit = SAETrainer.fit
def timed_fit(self):
    start = time.perf_counter()
    result = fit(self)
    print("BENCH_FIT_SECONDS", time.perf_counter() - start, flush=True)
    return result
SAETrainer.fit = timed_fit
from softsae_plugin.cli import main
main(sys.argv[1:])
"""


def topk_config_from(config: dict[str, Any]) -> dict[str, Any]:
    """The same runner config with architecture topk: SoftSAE's own keys (k_max, tau, ...) removed."""
    soft = {f.name for f in dataclasses.fields(SoftTrainingSAEConfig)}
    topk = {f.name for f in dataclasses.fields(TopKTrainingSAEConfig)}
    return {key: value for key, value in config.items() if key not in soft - topk} | {"architecture": "topk"}


def bench_throughput(quick: bool, out_dir: Path, config_path: Path) -> list[dict[str, Any]]:
    """Section 5: tokens per second of `sae-lens train` (the quickstart config, few tokens), softsae and topk."""
    import yaml

    tokens = 1024 if quick else 8192
    overrides = [
        "--training_tokens",
        str(tokens),
        "--train_batch_size_tokens",
        "512",
        "--n_batches_for_norm_estimate",
        "4",
        "--n_batches_in_buffer",
        "4",
    ]
    config = yaml.safe_load(config_path.read_text())
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        configs = {"softsae": config_path, "topk": Path(tmp) / "topk.yaml"}
        configs["topk"].write_text(yaml.safe_dump(topk_config_from(config)))
        for arch, path in tqdm(configs.items(), desc="sae-lens train (subprocess)", unit="run"):
            output = Path(tmp) / f"run_{arch}"
            cmd = [
                sys.executable,
                "-c",
                _TIMED_SAE_LENS,
                "train",
                "--config",
                str(path),
                *overrides,
                "--output_path",
                str(output),
            ]
            load = load_average()
            start = time.perf_counter()
            env = {**os.environ, "TQDM_DISABLE": "1"}
            proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env, check=False)
            wall = time.perf_counter() - start
            if proc.returncode != 0:
                raise RuntimeError(f"sae-lens train ({arch}) failed:\n{proc.stderr[-3000:]}")
            fit = next(float(line.split()[1]) for line in proc.stdout.splitlines() if line.startswith("BENCH_FIT"))
            summary = json.loads((output / "training_summary.json").read_text())
            out.append(
                {
                    "architecture": arch,
                    "training_tokens": tokens,
                    "wall_s": wall,
                    "fit_s": fit,
                    "tokens_per_s_whole_run": tokens / wall,
                    "tokens_per_s_training_loop": tokens / fit,
                    "fve": summary["fve"],
                    "mean_l0": summary["mean_l0"],
                    "load": load,
                }
            )
    base = next(r for r in out if r["architecture"] == "topk")
    for row in out:
        row["whole_run_time_ratio_vs_topk"] = row["wall_s"] / base["wall_s"]
        row["training_loop_time_ratio_vs_topk"] = row["fit_s"] / base["fit_s"]
    write_csv("throughput", out, out_dir)
    return out
