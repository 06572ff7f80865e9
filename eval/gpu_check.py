"""The checks that need a GPU (issue 21), for the day one is lent; run through eval/gpu_check.sh.

1. soft_topk on CUDA against a float64 CPU solve of the same rows, and its time (forward + backward) beside
   torch.topk's at the Gemma shape's codes (4096 x 16384, k 64 and 320).
2. With SAE-Lens importable: one SoftSAE training step on CUDA against the same step on CPU (tiny shape, float32),
   then the step time per phase at d_in 2304 / d_sae 16384, batch 4096, bf16 autocast, beside SAE-Lens' TopK, with
   the host syncs each step makes (torch.cuda.set_sync_debug_mode counts them as warnings).

Synthetic activations only; no network. Times are medians of CUDA-event timings after warm-ups. Writes
gpu_check.csv into $OUT (or the folder given as the first argument).
"""

from __future__ import annotations

import csv
import importlib.util
import os
import statistics
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
ROWS: list[dict[str, Any]] = []


def lapsum_module() -> Any:
    """softsae_plugin/lapsum.py on its own (it needs only torch), so this runs where SAE-Lens is missing."""
    spec = importlib.util.spec_from_file_location("lapsum_standalone", ROOT / "softsae_plugin" / "lapsum.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def cuda_time(fn: Callable[[], Any], reps: int = 20, warmup: int = 3) -> float:
    """Median milliseconds of `fn` by CUDA events."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def record(check: str, **values: Any) -> None:
    ROWS.append({"check": check, **values})
    print(check, values, flush=True)


def check_soft_topk() -> None:
    lapsum = lapsum_module()
    gen = torch.Generator(device="cuda").manual_seed(0)
    small = torch.randn(64, 4096, device="cuda", generator=gen).relu()
    k = torch.rand(64, device="cuda", generator=gen) * 60 + 1
    got = lapsum.soft_topk(small, k, 0.01, k_bound=61)
    reference = lapsum.soft_topk(small.double().cpu(), k.double().cpu(), 0.01, method="sort")
    record("soft_topk_cuda_vs_cpu_float64", max_abs_diff=float((got.double().cpu() - reference).abs().max()))
    x = torch.randn(4096, 16384, device="cuda", generator=gen).relu().requires_grad_()
    for k_target in (64, 320):
        grad = torch.randn_like(x)
        kk = torch.full((4096,), float(k_target), device="cuda")

        def soft(kk: torch.Tensor = kk, k_target: int = k_target, grad: torch.Tensor = grad) -> None:
            (lapsum.soft_topk(x, kk, 0.01, k_bound=k_target) * grad).sum().backward()

        def hard(k_target: int = k_target, grad: torch.Tensor = grad) -> None:
            values, indices = x.topk(k_target, dim=-1)
            torch.zeros_like(x).scatter(-1, indices, values).mul(grad).sum().backward()

        soft_ms, topk_ms = cuda_time(soft), cuda_time(hard)
        record("soft_topk_vs_topk_4096x16384", k=k_target, soft_topk_ms=soft_ms, topk_ms=topk_ms,
               ratio=soft_ms / topk_ms)  # fmt: skip


def check_training_step() -> None:
    sys.path.insert(0, str(ROOT / "eval"))
    from bench_dispatch import PHASES, activations, step_runner
    from sae_lens.saes.sae import TrainStepInput

    from softsae_plugin import SoftTrainingSAE, SoftTrainingSAEConfig

    def step_input(x: torch.Tensor, step: int) -> TrainStepInput:
        return TrainStepInput(
            sae_in=x, coefficients={}, dead_neuron_mask=None, n_training_steps=step, is_logging_step=False
        )

    # CUDA against CPU, float32, tiny: the same losses after the same steps.
    losses = {}
    for device in ("cpu", "cuda"):
        torch.manual_seed(0)
        cfg = SoftTrainingSAEConfig(d_in=32, d_sae=512, k=8, total_training_steps=100, hard_topk_steps=20,
                                    device=device)  # fmt: skip
        sae = SoftTrainingSAE(cfg)
        x = activations(32, 256).to(device)
        losses[device] = [float(sae.training_forward_pass(step_input(x, step)).loss) for step in (0, 1, 50, 85)]
    pairs = zip(losses["cuda"], losses["cpu"], strict=True)
    record("step_cuda_vs_cpu", max_rel_diff=max(abs(a - b) / abs(b) for a, b in pairs))

    d_in, d_sae, batch = 2304, 16384, 4096
    x = activations(d_in, batch).cuda()
    for model in ("topk", "softsae_paper", "softsae_h256"):
        run = step_runner(model, d_in, d_sae, batch, device="cuda")[0]
        phases = PHASES if model.startswith("softsae") else {"step": 0}
        for phase, step in phases.items():

            def once(step: int = step, run: Callable[[int, torch.Tensor], Any] = run) -> None:
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    run(step, x)

            once()
            ms = cuda_time(once, reps=10, warmup=2)
            torch.cuda.set_sync_debug_mode("warn")
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                once()
            torch.cuda.set_sync_debug_mode("default")
            syncs = sum("synchroniz" in str(w.message) for w in caught)
            record("step_2304x16384_bf16", model=model, phase=phase, ms=ms, host_syncs=syncs)
        del run
        torch.cuda.empty_cache()


def main() -> None:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else os.environ.get("OUT", "/tmp/gpu_check"))
    out.mkdir(parents=True, exist_ok=True)
    record("machine", torch=torch.__version__, gpu=torch.cuda.get_device_name())
    check_soft_topk()
    if importlib.util.find_spec("sae_lens") is None:
        record("training_step", skipped="sae_lens is not installed here: carry its wheels (see gpu_check.sh)")
    else:
        check_training_step()
    keys = sorted({key for row in ROWS for key in row})
    with (out / "gpu_check.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(ROWS)


if __name__ == "__main__":
    main()
