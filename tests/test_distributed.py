"""Data-parallel training under torchrun (gloo on CPU): the same weights as one process with the global batch."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from safetensors.torch import load_file

from softsae_plugin.training.summary import SUMMARY_FILENAME

BIN = Path(sys.executable).parent
SAE_LENS, TORCHRUN = str(BIN / "sae-lens"), str(BIN / "torchrun")
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
# 20 steps of a global batch of 128 vectors, in float64, with a hard phase (the last 2 steps), checkpoints, and dead
# latents (a 3-step window on 512 latents): the dead-latent counters and AuxK take part.
EMBEDDING = ["--d_sae", "512", "--k", "4", "--training_tokens", str(20 * 128), "--train_batch_size_tokens", "128",
             "--n_batches_for_norm_estimate", "3", "--lr", "0.003", "--seed", "3", "--sae.dtype", "float64",
             "--dead_feature_window", "3"]  # fmt: skip


def train(*args: str, ranks: int = 1, cwd: Path) -> subprocess.CompletedProcess:
    launcher = [TORCHRUN, "--standalone", "--nproc_per_node", str(ranks)] if ranks > 1 else []
    result = subprocess.run([*launcher, SAE_LENS, "train", *args], capture_output=True, text=True, timeout=900,
                            env=ENV, cwd=cwd)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def max_relative_difference(a: Path, b: Path) -> float:
    one, two = load_file(a / "sae_weights.safetensors"), load_file(b / "sae_weights.safetensors")
    assert one.keys() == two.keys()
    return max(float((one[k] - two[k]).abs().max() / one[k].abs().max().clamp_min(1e-30)) for k in one)


@pytest.fixture(scope="module")
def activations(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("ddp")
    np.save(folder / "acts.npy", np.random.default_rng(0).standard_normal((3000, 16)).astype(np.float32))
    return folder


@pytest.mark.parametrize(
    "architecture",
    ["softsae", "topk", "topk --normalize_activations covariance_whitening"],
    ids=["softsae", "topk", "topk-whitened"],
)
def test_two_ranks_with_half_batches_train_the_weights_of_one_process(activations, architecture):
    """2 gloo ranks, each with half of every global batch, against one process with the whole batch: the same
    weights after 20 steps to float64 rounding (gradients averaged by DDP; softsae's constraint and L0 calibration,
    the norm estimate or the whitening, b_dec's initialisation and the firing counters over the global batch)."""
    args = ["--architecture", *architecture.split(), "--activations", "acts.npy", *EMBEDDING]
    train(*args, "--output_path", "one", cwd=activations)
    two = train(*args, "--output_path", "two", "--checkpoint_path", "ckpt", "--n_checkpoints", "1", ranks=2,
                cwd=activations)  # fmt: skip
    assert max_relative_difference(activations / "one", activations / "two") < 1e-6
    one_summary, two_summary = (json.loads((activations / d / SUMMARY_FILENAME).read_text()) for d in ("one", "two"))
    assert one_summary["train_mean_l0"] == pytest.approx(two_summary["train_mean_l0"], rel=1e-9)
    assert one_summary["dead_fraction"] > 0  # AuxK and the dead-latent counters were at work
    # The run's global numbers, not one rank's share.
    scale = {"train_batch_size_tokens": 128, "training_tokens": 20 * 128}
    assert {**scale, "world_size": 1}.items() <= one_summary.items()
    assert {**scale, "world_size": 2}.items() <= two_summary.items()
    assert two.stdout.count("architecture ") == 1, "only rank 0 prints the summary"
    (checkpoint,) = (activations / "ckpt").glob("*/*")
    assert json.loads((checkpoint / "softsae_guard_state.json").read_text())["world_size"] == 2
    # The data position is counted in global batches: the 2 ranks' mid-run checkpoint resumed by one process ends
    # with the uninterrupted run's weights.
    train(*args, "--resume", str(checkpoint), "--output_path", "resumed", cwd=activations)
    assert max_relative_difference(activations / "one", activations / "resumed") < 1e-6
    for folder in ("one", "two", "ckpt", "resumed"):
        shutil.rmtree(activations / folder)


def test_a_sweep_trains_data_parallel_like_one_process(activations):
    sweep = {"d_sae": 64, "training_tokens": 20 * 128, "train_batch_size_tokens": 128, "n_batches_for_norm_estimate": 3,
             "lr": 0.003, "seed": 3, "sweep_parallel": "data",
             "saes": {"soft": {"architecture": "softsae", "k": 4, "dtype": "float64", "lr": 0.002},
                      "top": {"architecture": "topk", "k": 4, "dtype": "float64",
                              "normalize_activations": "expected_average_only_in"}}}  # fmt: skip
    (activations / "sweep.yaml").write_text(yaml.safe_dump(sweep))
    for ranks, out in ((1, "s1"), (2, "s2")):
        train("--config", "sweep.yaml", "--activations", "acts.npy", "--output_path", out, "--checkpoint_path",
              f"ckpt_{out}", "--n_checkpoints", "1", ranks=ranks, cwd=activations)  # fmt: skip
    # One process's mid-run checkpoint resumed on 2 ranks ends with the uninterrupted sweep's weights.
    (checkpoint,) = [path for path in (activations / "ckpt_s1").glob("*/*") if path.is_dir()]
    train("--config", "sweep.yaml", "--activations", "acts.npy", "--output_path", "s1r", "--resume", str(checkpoint),
          ranks=2, cwd=activations)  # fmt: skip
    for name in ("soft", "top"):
        assert max_relative_difference(activations / "s1" / name, activations / "s2" / name) < 1e-6, name
        assert max_relative_difference(activations / "s1" / name, activations / "s1r" / name) < 1e-6, name


# Loaded at start-up by every Python process of the run (sitecustomize on PYTHONPATH): on rank 1 only, SAE-Lens'
# trainer step raises (or hangs, as a process that never closes its connections would) from step INJECT_AT_STEP on.
FAULT_INJECTION = """
import importlib.abc, os, sys, time
if os.environ.get("RANK") == "1":
    def inject():
        from sae_lens.training.sae_trainer import SAETrainer
        step = SAETrainer.step
        def faulty(self, batch):
            if self.n_training_steps >= int(os.environ["INJECT_AT_STEP"]):
                with open(os.environ["INJECT_STAMP"], "w") as f:
                    f.write(str(time.time()))
                if os.environ["INJECT_FAULT"] == "hang":
                    time.sleep(3600)
                raise RuntimeError(f"injected fault on rank 1 at step {self.n_training_steps}")
            return step(self, batch)
        SAETrainer.step = faulty
    class WhenTheCommandLoads(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name == "softsae_plugin.cli":
                sys.meta_path.remove(self)
                inject()
            return None
    sys.meta_path.insert(0, WhenTheCommandLoads())
"""


@pytest.mark.parametrize("fault", ["raise", "hang"])
def test_a_failing_rank_ends_every_rank_within_a_minute(activations, tmp_path, fault):
    """A fault on rank 1 at step 5 of 20: an exception ends rank 0 too, with an error naming rank 1 and its error; a
    rank that hangs without closing its connections ends rank 0 by the collective timeout (15 s here). Either way
    every rank is gone within 60 s of the fault, and no output folder is written."""
    (tmp_path / "sitecustomize.py").write_text(FAULT_INJECTION)
    env = {**ENV, "PYTHONPATH": os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")])),
           "INJECT_FAULT": fault, "INJECT_AT_STEP": "5", "INJECT_STAMP": str(tmp_path / "stamp"),
           "SOFTSAE_COLLECTIVE_TIMEOUT_S": "15"}  # fmt: skip
    result = subprocess.run(
        [TORCHRUN, "--standalone", "--nproc_per_node", "2", SAE_LENS, "train", "--architecture", "softsae",
         "--activations", str(activations / "acts.npy"), *EMBEDDING, "--output_path", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path,
    )  # fmt: skip
    ended = time.time()
    assert result.returncode != 0
    assert ended - float((tmp_path / "stamp").read_text()) < 60
    assert not (tmp_path / "out").exists()
    output = result.stdout + result.stderr
    if fault == "raise":
        named = "data-parallel training stopped because rank 1 failed with RuntimeError: injected fault on rank 1 at "
        assert f"[rank0]: RuntimeError: {named}step 5; rank 0 then failed too" in output, output[-3000:]
    else:
        # gloo words a collective's timeout by where rank 0 waits: "Timed out ..." or "Application timeout caused
        # pair closure".
        timed_out = "imed out" in output or "Application timeout" in output
        assert "[rank0]:" in output and timed_out, output[-3000:]


def test_rank_zero_fetches_first_and_the_others_after_it(tmp_path):
    """`main_rank_first` (around model and dataset loading): rank 1 enters the block only once rank 0 has left it."""
    (tmp_path / "order.py").write_text(
        "import json, os, sys, time\n"
        "from softsae_plugin.training.data_parallel import init_from_environment, main_rank_first\n"
        "init_from_environment('cpu')\n"
        "with main_rank_first():\n"
        "    start = time.time(); time.sleep(1.0); end = time.time()\n"
        "open(os.path.join(sys.argv[1], os.environ['RANK']), 'w').write(json.dumps([start, end]))\n"
    )
    subprocess.run([TORCHRUN, "--standalone", "--nproc_per_node", "2", str(tmp_path / "order.py"), str(tmp_path)],
                   check=True, capture_output=True, timeout=300, env=ENV)  # fmt: skip
    (_, end_0), (start_1, _) = (json.loads((tmp_path / rank).read_text()) for rank in ("0", "1"))
    assert start_1 >= end_0


def test_ranks_read_disjoint_shares_of_an_activation_cache_that_cover_it(tmp_path):
    """`use_cached_activations`: SAE-Lens' store reads its cache from the first row on every rank; with the cache
    sharded (`shard_cached_activations`, as the runner does), 2 ranks read disjoint rows that together are the rows
    one process reads."""
    from datasets import Array2D, Dataset, Features

    rows, context, d_in = 12, 4, 3
    acts = np.repeat(np.arange(rows, dtype=np.float32), context * d_in).reshape(rows, context, d_in)  # row id
    features = Features({"blocks.0.hook_resid_post": Array2D(shape=(context, d_in), dtype="float32")})
    Dataset.from_dict({"blocks.0.hook_resid_post": acts}, features=features).save_to_disk(str(tmp_path / "cache"))
    (tmp_path / "read.py").write_text(
        "import json, os, sys\n"
        "from sae_lens.training.activations_store import ActivationsStore\n"
        "from softsae_plugin.training.data_parallel import init_from_environment, shard_cached_activations\n"
        "init_from_environment('cpu')\n"
        f"store = ActivationsStore(None, None, False, 'blocks.0.hook_resid_post', None, {context}, {d_in}, 2, 48, 2, 8,"
        " False, 'none', 'cpu', 'float32', cached_activations_path=sys.argv[1] + '/cache')\n"
        "shard_cached_activations(store)\n"
        "seen = []\n"
        "try:\n"
        "    while True:\n"
        "        seen += store.get_raw_llm_batch(raise_on_epoch_end=True)[0][::%d, 0].int().tolist()\n"
        "except StopIteration:\n"
        "    pass\n"
        "open(os.path.join(sys.argv[1], os.environ.get('RANK', 'one')), 'w').write(json.dumps(seen))\n" % context
    )
    command = [str(tmp_path / "read.py"), str(tmp_path)]
    subprocess.run([sys.executable, *command], check=True, capture_output=True, timeout=300, env=ENV)
    subprocess.run([TORCHRUN, "--standalone", "--nproc_per_node", "2", *command], check=True, capture_output=True,
                   timeout=300, env=ENV)  # fmt: skip
    one, rank_0, rank_1 = (json.loads((tmp_path / name).read_text()) for name in ("one", "0", "1"))
    assert sorted(one) == list(range(rows))
    assert not set(rank_0) & set(rank_1) and sorted(rank_0 + rank_1) == sorted(one)


def test_ranks_read_disjoint_rows_of_an_activations_file_that_cover_it(tmp_path):
    """`--activations` files (.npy and .safetensors memory-mapped, a saved dataset through its mapped Arrow files): each
    of 2 ranks reads from the file only its slice of every global batch, the slices are disjoint, and together they
    are the rows one process reads."""
    from datasets import Dataset
    from safetensors.numpy import save_file

    rows = np.repeat(np.arange(48, dtype=np.float32)[:, None], 3, axis=1)  # row id in every column
    np.save(tmp_path / "acts.npy", rows)
    save_file({"activations": rows}, tmp_path / "acts.safetensors")
    Dataset.from_dict({"activations": rows}).save_to_disk(str(tmp_path / "acts_ds"))
    (tmp_path / "read.py").write_text(
        "import json, os, sys\n"
        "from itertools import islice\n"
        "from softsae_plugin.training.activations import MappedRows, batches, map_activations\n"
        "from softsae_plugin.training.data_parallel import init_from_environment, shard\n"
        "init_from_environment('cpu')\n"
        "seen = {}\n"
        "for name in ('acts.npy', 'acts.safetensors', 'acts_ds'):\n"
        "    mapped = map_activations(os.path.join(sys.argv[1], name))\n"
        "    assert isinstance(mapped, MappedRows)\n"
        "    read, array = [], mapped.array\n"
        "    class Recording:\n"
        "        def __getitem__(self, rows, array=array, read=read):\n"
        "            read.extend(rows.tolist())\n"
        "            return array[rows]\n"
        "    mapped.array = Recording()\n"
        "    got = [b[:, 0].int().tolist() for b in islice(batches(mapped, 16, seed=2, share=shard), 3)]\n"
        "    assert sorted(read) == sorted(sum(got, [])), (read, got)  # the file was read for these rows only\n"
        "    seen[name] = sum(got, [])\n"
        "open(os.path.join(sys.argv[1], os.environ.get('RANK', 'one')), 'w').write(json.dumps(seen))\n"
    )
    command = [str(tmp_path / "read.py"), str(tmp_path)]
    subprocess.run([sys.executable, *command], check=True, capture_output=True, timeout=300, env=ENV)
    subprocess.run([TORCHRUN, "--standalone", "--nproc_per_node", "2", *command], check=True, capture_output=True,
                   timeout=300, env=ENV)  # fmt: skip
    one, rank_0, rank_1 = (json.loads((tmp_path / name).read_text()) for name in ("one", "0", "1"))
    for name, rows_one in one.items():
        assert len(rows_one) == 48 and sorted(rows_one) == list(range(48)), name  # 3 batches of 16: one epoch
        assert len(rank_0[name]) == len(rank_1[name]) == 24, name
        assert not set(rank_0[name]) & set(rank_1[name]) and sorted(rank_0[name] + rank_1[name]) == sorted(rows_one)


@pytest.mark.parametrize("kind", ["map-style", "streaming, 3 shards over 2 ranks"])
def test_ranks_read_disjoint_shares_of_a_dataset_that_cover_it(tmp_path, kind):
    """`shard_dataset` (the local text, and each rank's shard of a Hub dataset): 2 ranks read disjoint rows that
    together are the rows one process reads, also for a streaming dataset whose shard count the ranks do not divide."""
    (tmp_path / "read.py").write_text(
        "import json, os, sys\n"
        "from datasets import Dataset\n"
        "from softsae_plugin.training.data_parallel import init_from_environment, shard_dataset\n"
        "init_from_environment('cpu')\n"
        "dataset = Dataset.from_dict({'row': list(range(30))})\n"
        "if sys.argv[2] != 'map-style':\n"
        "    dataset = dataset.to_iterable_dataset(num_shards=3)\n"
        "seen = [example['row'] for example in shard_dataset(dataset)]\n"
        "open(os.path.join(sys.argv[1], os.environ.get('RANK', 'one')), 'w').write(json.dumps(seen))\n"
    )
    command = [str(tmp_path / "read.py"), str(tmp_path), kind]
    subprocess.run([sys.executable, *command], check=True, capture_output=True, timeout=300, env=ENV)
    subprocess.run([TORCHRUN, "--standalone", "--nproc_per_node", "2", *command], check=True, capture_output=True,
                   timeout=300, env=ENV)  # fmt: skip
    one, rank_0, rank_1 = (json.loads((tmp_path / name).read_text()) for name in ("one", "0", "1"))
    assert sorted(one) == list(range(30))
    assert not set(rank_0) & set(rank_1) and sorted(rank_0 + rank_1) == sorted(one)


# Loaded at start-up by every process of a language-model run (sitecustomize on PYTHONPATH), each part switched on by
# its variable: COUNT_FORWARD_PASSES=DIR counts the model's forward passes for the activation store and writes each
# rank's count to DIR/RANK at exit; SKIP_GRADIENT_AVERAGING=1 gives DistributedDataParallel a communication hook that
# keeps each rank's own gradient (the control run: data-parallel training with DDP's averaging switched off).
LANGUAGE_MODEL_PROBES = """
import atexit, importlib.abc, os, sys
def count_forward_passes(folder):
    from sae_lens.training.activations_store import ActivationsStore
    counts = {"forward_passes": 0}
    for name in ("get_activations", "get_multi_hook_activations"):
        method = getattr(ActivationsStore, name)
        def counted(self, *args, _method=method, **kwargs):
            counts["forward_passes"] += 1
            return _method(self, *args, **kwargs)
        setattr(ActivationsStore, name, counted)
    def write():
        with open(os.path.join(folder, os.environ.get("RANK", "0")), "w") as f:
            f.write(str(counts["forward_passes"]))
    atexit.register(write)
def skip_gradient_averaging():
    import torch
    from torch.nn.parallel import DistributedDataParallel
    init = DistributedDataParallel.__init__
    def own_gradients(state, bucket):
        future = torch.futures.Future()
        future.set_result(bucket.buffer())
        return future
    def without_averaging(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.register_comm_hook(None, own_gradients)
    DistributedDataParallel.__init__ = without_averaging
class WhenTheCommandLoads(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "softsae_plugin.cli":
            sys.meta_path.remove(self)
            if os.environ.get("COUNT_FORWARD_PASSES"):
                count_forward_passes(os.environ["COUNT_FORWARD_PASSES"])
            if os.environ.get("SKIP_GRADIENT_AVERAGING"):
                skip_gradient_averaging()
        return None
sys.meta_path.insert(0, WhenTheCommandLoads())
"""


@pytest.fixture(scope="module")
def smollm2_runs(tmp_path_factory) -> Path:
    """SoftSAE on the offline SmolLM2, 100 steps of a global batch of 512 tokens: `one` (one process), `two` (2 gloo
    ranks, checkpointed halfway, forward passes counted), `resumed` (2 ranks from that checkpoint, counted) and
    `unaveraged` (2 ranks with DDP's gradient averaging switched off)."""
    folder = tmp_path_factory.mktemp("smollm2")
    (folder / "sitecustomize.py").write_text(LANGUAGE_MODEL_PROBES)
    config = {
        "architecture": "softsae", "model_name": "smollm2-135m-instruct-q4_1", "hook_name": "blocks.1.hook_resid_post",
        "dataset_path": "local:english-wikipedia", "context_size": 64, "exclude_special_tokens": True, "d_in": 576,
        "d_sae": 1152, "k": 8, "k_max": 24, "training_tokens": 100 * 512, "train_batch_size_tokens": 512,
        "store_batch_size_prompts": 8, "n_batches_in_buffer": 16, "n_batches_for_norm_estimate": 2, "lr": 0.0005,
        "seed": 42, "device": "cpu", "checkpoint_path": None,
    }  # fmt: skip
    (folder / "cfg.yaml").write_text(yaml.safe_dump(config))
    pythonpath = os.pathsep.join(filter(None, [str(folder), os.environ.get("PYTHONPATH")]))
    for run, ranks, extra in (
        ("one", 1, []),
        ("two", 2, ["--checkpoint_path", "ckpt", "--n_checkpoints", "1"]),
        ("resumed", 2, ["--resume", "HALFWAY"]),
        ("unaveraged", 2, []),
    ):
        (folder / f"{run}_passes").mkdir()
        env = {**ENV, "PYTHONPATH": pythonpath, "COUNT_FORWARD_PASSES": str(folder / f"{run}_passes"),
               "SKIP_GRADIENT_AVERAGING": "1" if run == "unaveraged" else ""}  # fmt: skip
        extra = [str(next((folder / "ckpt").glob("*/*"))) if arg == "HALFWAY" else arg for arg in extra]
        launcher = [TORCHRUN, "--standalone", "--nproc_per_node", str(ranks)] if ranks > 1 else []
        result = subprocess.run([*launcher, SAE_LENS, "train", "--config", "cfg.yaml", "--output_path", run, *extra],
                                capture_output=True, text=True, timeout=900, env=env, cwd=folder)  # fmt: skip
        assert result.returncode == 0, result.stderr[-3000:]
        (folder / f"{run}.stderr").write_text(result.stderr)
    return folder


@pytest.mark.slow
def test_torchrun_trains_on_smollm2_like_one_process(smollm2_runs):
    """`torchrun --nproc_per_node 2 sae-lens train` on the offline SmolLM2: each rank its own model and its own shard
    of the text; one output folder; FVE within 0.01 of one process with the same global batch. The same comparison
    fails for the control run without DDP's gradient averaging (each rank trains on its own half batches)."""
    one, two, unaveraged = (json.loads((smollm2_runs / d / SUMMARY_FILENAME).read_text())
                            for d in ("one", "two", "unaveraged"))  # fmt: skip
    assert two["n_eval_inputs"] == one["n_eval_inputs"]
    scale = {"train_batch_size_tokens": 512, "training_tokens": 100 * 512}
    assert {**scale, "world_size": 2}.items() <= two.items()
    runner_cfg = json.loads((smollm2_runs / "two" / "runner_cfg.json").read_text())
    assert {**scale, "world_size": 2, "output_path": "two"}.items() <= runner_cfg.items()
    assert abs(two["fve"] - one["fve"]) < 0.01, (one["fve"], two["fve"])
    # Measured: 0.4783 one process, 0.4840 two ranks, 0.4465 without averaging (0.032 from one process).
    assert abs(unaveraged["fve"] - one["fve"]) > 0.01, (one["fve"], unaveraged["fve"])


@pytest.mark.slow
def test_torchrun_resumes_a_language_model_run_without_replay(smollm2_runs):
    """2 gloo ranks checkpointed halfway and resumed: each rank's store state (text position, shuffle buffer, RNG) is
    in the checkpoint, and the resumed run ends with the uninterrupted run's weights while its model runs only for the
    batches after the checkpoint (counted), not again over those before it."""
    (checkpoint,) = (smollm2_runs / "ckpt").glob("*/*")
    assert sorted(p.name for p in (checkpoint / "softsae_store_state").iterdir()) == ["rank0.pt", "rank1.pt"]
    assert "Replaying" not in (smollm2_runs / "resumed.stderr").read_text()
    assert max_relative_difference(smollm2_runs / "two", smollm2_runs / "resumed") < 1e-6
    passes = {run: [int((smollm2_runs / f"{run}_passes" / r).read_text()) for r in "01"] for run in ("two", "resumed")}
    # Rank 1 runs its model for training only (rank 0 also for the summary): about half as often after a resume
    # from the halfway checkpoint. A replay would run it as often as the uninterrupted run.
    assert passes["resumed"][1] < 0.6 * passes["two"][1], passes
