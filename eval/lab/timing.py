"""Wall time and peak memory of one call, robust statistics of repeated timings, and the machine they ran on (the
benchmarks')."""

from __future__ import annotations

import contextlib
import ctypes
import gc
import math
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch


def load_average() -> float:
    """The 1-minute load average of the machine (NaN where the OS has none)."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return math.nan


def load_averages() -> list[float] | None:
    """The 1, 5 and 15-minute load averages, rounded to 2 decimals (None where the OS has none)."""
    return [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None


def machine_info(device: torch.device) -> dict[str, Any]:
    """A description of the machine the benchmark runs on."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    info: dict[str, Any] = {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": str(device),
        "load_average_start": load_averages(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds one call of `fn` takes, device work included."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def median(values: Sequence[float]) -> float:
    """The median of `values` (NaN when empty)."""
    return statistics.median(values) if values else math.nan


def quartiles(values: Sequence[float]) -> tuple[float, float]:
    """The first and third quartiles of `values` (both the median when fewer than 4)."""
    if len(values) < 4:
        return median(values), median(values)
    q = statistics.quantiles(values, n=4)
    return q[0], q[2]


def _status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def peak_memory_delta(fn: Callable[[], object], device: torch.device) -> float:
    """Bytes the peak memory rises above what is allocated before one call of `fn`.

    CUDA: the caching allocator's peak statistic. CPU: PyTorch keeps no allocation statistics on CPU (and
    tracemalloc does not see its allocations), so this measures the process: free memory cached by malloc is
    returned to the OS first (malloc_trim), the kernel's peak-RSS counter is reset (/proc/self/clear_refs),
    and the rise of the peak RSS (VmHWM) over the RSS before the call is the step's transient memory:
    activations, gradients and temporaries. NaN where /proc is not writable.
    """
    gc.collect()
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        synchronize(device)
        return float(torch.cuda.max_memory_allocated(device) - base)
    libc = _libc()
    try:
        if libc is not None:
            libc.malloc_trim(0)
        base = _status_bytes("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")
    except (OSError, KeyError):
        fn()
        return math.nan
    fn()
    return float(_status_bytes("VmHWM") - base)


def tensor_bytes(tensors: Iterator[torch.Tensor]) -> int:
    """Total bytes of `tensors`, each storage counted once."""
    seen: set[int] = set()
    total = 0
    for t in tensors:
        if not isinstance(t, torch.Tensor) or t.untyped_storage().data_ptr() in seen:
            continue
        seen.add(t.untyped_storage().data_ptr())
        total += t.untyped_storage().nbytes()
    return total
