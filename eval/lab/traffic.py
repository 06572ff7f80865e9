"""What a torchrun training run exchanges between ranks, counted: the bytes each rank hands to collectives per step,
read from torch.profiler's gloo events (which record every collective's tensors, DDP's gradient all-reduces
included) over a window of a sweep's steps, and the step time over the steps after that window (unprofiled).

`counted_command(...)` is a `sae-lens train` command line that writes, per rank, `rank<R>.json`: the bytes by
collective over the profiled steps, their number and their wall times; `bytes_per_step` reads them back.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

# The profiler writes an event's tensor types as C++ names.
ELEMENT_BYTES = {"float": 4, "double": 8, "c10::BFloat16": 2, "c10::Half": 2, "bool": 1, "unsigned char": 1,
                 "signed char": 1, "short int": 2, "int": 4, "long int": 8}  # fmt: skip

COUNTED_RUN = """
import json, math, os, sys, time
from torch.profiler import ProfilerActivity, profile, schedule
from sae_lens.training.multi_sae_trainer import MultiSAETrainer

skip, steps, out, sizes = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], json.loads(sys.argv[4])
counted = {"bytes": {}, "calls": {}, "seconds": [], "steps": steps}

def count(prof):
    for event in prof.events():
        if event.name.startswith(("gloo:", "nccl:")) and event.input_shapes:
            op = event.name.split(":", 1)[1]
            size = sum(math.prod(shape) * sizes[dtype] for shape, dtype in zip(event.input_shapes, event.input_dtypes))
            counted["bytes"][op] = counted["bytes"].get(op, 0) + size
            counted["calls"][op] = counted["calls"].get(op, 0) + 1

# One profiler step per training step: SAE-Lens' multi trainer calls _update_pbar once at the end of each.
prof = profile(activities=[ProfilerActivity.CPU], record_shapes=True,
               schedule=schedule(wait=skip, warmup=1, active=steps, repeat=1), on_trace_ready=count)
update = MultiSAETrainer._update_pbar
clock = {"last": None}

def step_end(self, *args, **kwargs):
    now = time.perf_counter()
    if clock["last"] is not None and self.n_training_steps - 1 >= skip + 1 + steps:  # after the profiled steps
        counted["seconds"].append(now - clock["last"])
    clock["last"] = now
    prof.step()
    return update(self, *args, **kwargs)

MultiSAETrainer._update_pbar = step_end
prof.start()
from softsae_plugin.cli import main
try:
    main(sys.argv[5:])
finally:
    prof.stop()
    with open(os.path.join(out, f"rank{os.environ.get('RANK', '0')}.json"), "w") as f:
        json.dump(counted, f)
"""


def counted_command(script: Path, out: Path, train_args: list[str], *, skip: int, steps: int) -> list[str]:
    """The arguments after the Python interpreter (or torchrun) that run `sae-lens train *train_args` with its
    collectives counted over steps skip+1 .. skip+steps (after the norm estimate and the first steps) and its steps
    timed after them (run at least skip + 1 + 2 * steps steps), each rank's counts written into the folder `out`;
    `script` is where the counting script is written."""
    script.write_text(COUNTED_RUN)
    out.mkdir(parents=True, exist_ok=True)
    return [str(script), str(skip), str(steps), str(out), json.dumps(ELEMENT_BYTES), "train", *train_args]


def bytes_per_step(out: Path) -> dict[str, Any]:
    """Each rank's counts read back: per rank, the bytes per step by collective (`by_op`), their total (`bytes`),
    and the mean step seconds; plus `all_ranks` (the total over ranks) and `ranks`."""
    per_rank = {}
    for path in sorted(out.glob("rank*.json")):
        counted = json.loads(path.read_text())
        steps = counted["steps"]
        by_op = {op: size / steps for op, size in counted["bytes"].items()}
        seconds = counted["seconds"]
        per_rank[int(path.stem.removeprefix("rank"))] = {
            "by_op": by_op,
            "calls_per_step": {op: n / steps for op, n in counted["calls"].items()},
            "bytes": sum(by_op.values()),
            "step_seconds": sum(seconds) / len(seconds) if seconds else float("nan"),
        }
    if not per_rank:
        sys.exit(f"no counts under {out}")
    return {"per_rank": per_rank, "all_ranks": sum(r["bytes"] for r in per_rank.values()), "ranks": len(per_rank)}
