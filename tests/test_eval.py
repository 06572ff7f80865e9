"""`sae-lens eval`: SAEBench's own absorption, splitting, SCR and TPP, through the console script, on SAEs trained
on the real SmolLM2-135M (a shallow layer, so that 2 CPU cores finish in minutes)."""

import csv
import json
import math
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from importlib.metadata import version
from pathlib import Path

import datasets
import pytest
import sae_bench
import torch
from datasets import Dataset, DatasetDict, DatasetInfo
from sae_lens import SAE
from sae_lens.constants import SAE_WEIGHTS_FILENAME
from sae_lens.saes.sae import SAEMetadata
from sae_lens.saes.topk_sae import TopKSAE, TopKSAEConfig
from safetensors.torch import load_file, save_file

from softsae_plugin.evaluate.absorption import probe_vocabulary, stop_after_hook_layer
from softsae_plugin.evaluate.evals import (
    ABSORPTION_ID,
    CORE_ID,
    NOTES_KEY,
    SAELENS_ID,
    SCR_ID,
    SPARSE_PROBING_ID,
    TABLE_COLUMNS,
    TPP_ID,
    EvalError,
)
from softsae_plugin.evaluate.provenance import PROVENANCE_KEY
from softsae_plugin.evaluate.run import check_results
from softsae_plugin.evaluate.saes import SAESpec, prepare_decoder
from softsae_plugin.evaluate.serving import serve_datasets
from softsae_plugin.offline.smollm2 import SMOLLM2_ID

REPO = Path(__file__).resolve().parents[1]
SAE_LENS = str(Path(sys.executable).with_name("sae-lens"))
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
HOOK = "blocks.2.hook_resid_post"
# SAEBench's absorption trains its first-letter probe on every alphabetic token (about 47,000 prompts for
# SmolLM2, an hour on 2 cores); the tests use a 520-token subset, a short prompt and fewer probe epochs. The
# low min_feats_for_eval keeps SAEBench from skipping on a probe trained on so few words.
ABSORPTION_ARGS = [
    "--absorption-vocab-size", "520",
    "--set", "absorption.prompt_template={word}:",
    "--set", "absorption.prompt_token_pos=-2",
    "--set", "absorption.max_k_value=3",
    "--set", "absorption.k_sparse_probe_num_epochs=10",
    "--set", "absorption.min_feats_for_eval=3",
]  # fmt: skip


def run_cli(*args: str, cwd: Path, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run([SAE_LENS, *args], capture_output=True, text=True, timeout=timeout, env=ENV, cwd=cwd)


def train(out: Path, architecture: str) -> Path:
    config = REPO / "configs" / f"smollm2-eval-{architecture}.yaml"
    result = run_cli(
        "train", "--config", str(config), "--hook_name", HOOK, "--d_sae", "576", "--k", "8",
        "--training_tokens", str(24 * 512), "--lr_decay_steps", "5", "--output_path", str(out), cwd=out.parent,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def scaled_twin(checkpoint: Path, out: Path, scale: float) -> Path:
    """The same SAE with every decoder row scaled by `scale` and the encoder by 1/scale: the same function, rows of
    norm `scale` (how SoftSAEs were saved before their rows were folded to unit norm)."""
    shutil.copytree(checkpoint, out, ignore=shutil.ignore_patterns("eval"))
    weights = load_file(out / SAE_WEIGHTS_FILENAME)
    weights["W_dec"], weights["W_enc"] = weights["W_dec"] * scale, weights["W_enc"] / scale
    save_file(weights, out / SAE_WEIGHTS_FILENAME)
    return out


def labelled_outputs(out: Path, checkpoints: Sequence[Path]) -> dict[str, object]:
    """Everything that carries a run's labels: each result JSON's notes, the summary table and CSV, each plot's
    labels (PNG text) and each checkpoint's model card."""
    from PIL import Image

    from softsae_plugin.evaluate.results import PLOT_LABELS_KEY
    from softsae_plugin.hub.card import model_card, read_entry

    return {
        "notes": {
            str(p.relative_to(out)): json.loads(p.read_text())[NOTES_KEY]
            for p in sorted(out.rglob("*_eval_results.json"))
        },
        "summary": (out / "summary.md").read_text() + (out / "summary.csv").read_text(),
        "plots": {p.name: Image.open(p).text[PLOT_LABELS_KEY] for p in sorted(out.glob("*_vs_L0.png"))},
        "cards": [model_card("user/name", [read_entry(c.name, c)]) for c in checkpoints],
    }


def rerun_reusing_everything(evals: str, saes: Sequence[Path], out: Path, *args: str) -> None:
    """`sae-lens eval` again on `out` with --no-force-rerun and none of the first run's data or settings flags:
    SAEBench keeps every result, and nothing is served or trained."""
    flags = [arg for sae in saes for arg in ("--sae", str(sae))]
    result = run_cli("eval", "--evals", evals, *flags, "--out", str(out), "--no-force-rerun", *args, cwd=out)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "reusing the existing result" in result.stdout


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("saes")
    saes = {arch: train(root / arch, arch) for arch in ("topk", "softsae")}
    for arch in ("topk", "softsae"):
        saes[f"{arch}_twin"] = scaled_twin(saes[arch], root / f"{arch}_twin", 1 / 4.2)
    return saes


def metrics(path: Path) -> dict:
    return json.loads(path.read_text())["eval_result_metrics"]


def files_changed_since(folder: Path, since: float) -> list[Path]:
    # Python's own bytecode cache aside.
    return [p for p in folder.rglob("*") if p.is_file() and "__pycache__" not in p.parts and p.stat().st_mtime >= since]


# The order of the --sae flags: each twin is evaluated at another position than its original.
ABSORPTION_SAES = ("topk", "softsae", "softsae_twin", "topk_twin")


@pytest.fixture(scope="module")
def absorption_run(checkpoints, tmp_path_factory):
    out, cwd = tmp_path_factory.mktemp("absorption"), tmp_path_factory.mktemp("cwd")
    started = time.time()
    saes = [arg for name in ABSORPTION_SAES for arg in ("--sae", str(checkpoints[name]))]
    result = run_cli(
        "eval", "--evals", "absorption,splitting", *saes, "--out", str(out), "--seeds", "2", *ABSORPTION_ARGS, cwd=cwd
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return {"out": out, "cwd": cwd, "started": started, "stdout": result.stdout}


def result_file(out: Path, name: str, seed: int = 0, eval_id: str = ABSORPTION_ID) -> Path:
    return out / f"seed-{seed}" / eval_id / f"{name}_custom_sae_seed-{seed}_eval_results.json"


@pytest.mark.slow
def test_absorption_and_splitting_on_softsae_and_topk(absorption_run, checkpoints):
    out = absorption_run["out"]
    for name in ("topk", "softsae"):
        means = [metrics(result_file(out, name, seed))["mean"] for seed in (0, 1)]
        for mean in means:
            assert math.isfinite(mean["mean_absorption_fraction_score"]), name
            assert 0 <= mean["mean_absorption_fraction_score"] <= 1, name
            assert math.isfinite(mean["mean_num_split_features"]) and mean["mean_num_split_features"] >= 1, name
        copied = checkpoints[name] / "eval" / "seed-1" / f"{ABSORPTION_ID}_eval_results.json"
        assert metrics(copied)["mean"] == means[1]
        row = json.loads((checkpoints[name] / "eval" / "summary.json").read_text())
        split = row["metrics"]["mean_num_split_features"]
        assert row["model_name"] == SMOLLM2_ID and split["values"] == [m["mean_num_split_features"] for m in means]
        # Two seeds give a finite spread (SAEBench's probe training and prompt sampling both move with the seed).
        assert math.isfinite(row["metrics"]["mean_absorption_fraction_score"]["std"])
        assert row["decoder"] == "unit-norm rows"
    with (out / "summary.csv").open() as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == list(TABLE_COLUMNS)
        rows = {row["SAE"]: row for row in reader}
    assert rows["softsae"]["architecture"] == "softsae" and rows["topk"]["architecture"] == "topk"
    assert float(rows["topk"]["L0"]) == 8 and math.isfinite(float(rows["softsae"]["FVE"]))
    assert rows["topk"]["scr_metric_threshold_2"] == ""  # not run
    assert rows["softsae"]["n_seeds"] == "2" and float(rows["softsae"]["mean_absorption_fraction_score_std"]) >= 0
    assert "reduced vocabulary" in rows["softsae"]["labels"]
    assert "| softsae |" in (out / "summary.md").read_text()
    labelled = json.loads(result_file(out, "softsae").read_text())[NOTES_KEY]
    assert any("reduced vocabulary" in note for note in labelled) and "decoder: unit-norm rows" in labelled
    for metric in ("mean_absorption_fraction_score", "mean_num_split_features"):
        assert (out / f"{metric}_vs_L0.png").stat().st_size > 1000
    # Every artifact lands in the output folder: none in SAEBench's package, none in the working directory.
    assert not files_changed_since(Path(sae_bench.__file__).parent, absorption_run["started"])
    assert not list(absorption_run["cwd"].iterdir())
    probes = out / "seed-0" / "saebench" / SMOLLM2_ID / "artifacts" / "absorption" / "probes" / SMOLLM2_ID
    assert (probes / "layer_2").is_dir()


@pytest.mark.slow
def test_a_rerun_that_reuses_every_result_keeps_every_label(absorption_run, checkpoints):
    """Labels come from each result's own provenance record (the first-letter probe's record, kept beside the
    cached probe), not from the command line: a rerun without --absorption-vocab-size that reuses every result
    leaves the notes, summary, plots and cards as they were. The record names what produced the result, and the
    seed is in every file name, so SAEBench's own loader keeps the seeds apart."""
    from sae_bench.sae_bench_utils.graphing_utils import get_eval_results

    out = absorption_run["out"]
    saes = [checkpoints[name] for name in ABSORPTION_SAES]
    before = labelled_outputs(out, saes)
    assert any(
        "reduced vocabulary" in note
        for note in before["notes"]["seed-1/absorption_first_letter/softsae_custom_sae_seed-1_eval_results.json"]
    )
    assert "reduced vocabulary" in before["plots"]["mean_absorption_fraction_score_vs_L0.png"]
    assert "reduced vocabulary" in before["cards"][1]
    rerun_reusing_everything("absorption,splitting", saes, out, "--seeds", "2")
    assert labelled_outputs(out, saes) == before
    result = json.loads(result_file(out, "softsae", 1).read_text())
    record = result[PROVENANCE_KEY]
    assert record["probe_vocabulary"]["probe_tokens"] < record["probe_vocabulary"]["alphabetic_tokens"]
    assert record["random_seed"] == 43 and record["seed_offset"] == 1 and record["decoder"] == "unit-norm rows"
    assert record["sae_bench_version"] == result["sae_bench_commit_hash"] == f"sae_bench=={version('sae_bench')}"
    assert record["softsae_plugin_version"] and record["softsae_plugin_commit"]
    assert record["settings_changed"]["max_k_value"] == {"used": 3, "default": 10}
    files = [str(p) for p in sorted(out.glob(f"seed-*/{ABSORPTION_ID}/*_eval_results.json"))]
    assert len(get_eval_results(files)) == len(files) == 2 * len(ABSORPTION_SAES)


@pytest.mark.slow
def test_an_sae_scores_the_same_wherever_it_stands_and_whatever_its_decoder_scale(absorption_run, checkpoints):
    """Each twin (decoder rows of norm 1/4.2, the encoder scaled to match: the same SAE) scores what its original
    scores, to float noise, though it stands elsewhere in the command: SAEBench sees unit-norm rows (the SoftSAE's
    are folded when it loads, the TopK's by `sae-lens eval`), and every SAE is evaluated from the same seed."""
    out = absorption_run["out"]
    for seed in (0, 1):
        original, twin = (metrics(result_file(out, n, seed))["mean"] for n in ("softsae", "softsae_twin"))
        assert twin == pytest.approx(original, abs=1e-6), seed
    # The TopK twin is folded by `sae-lens eval`; folding divides by norms that are 1 only to float rounding, and a
    # last-bit difference in the encoder can move SAEBench's discrete k-sparse probing (a split-feature count).
    topk_twin = json.loads((checkpoints["topk_twin"] / "eval" / "summary.json").read_text())
    assert topk_twin["decoder"] == "folded to unit-norm rows before SAEBench (rows of norm 0.2381)"
    for seed in (0, 1):
        original, twin = (metrics(result_file(out, n, seed))["mean"] for n in ("topk", "topk_twin"))
        assert twin["mean_absorption_fraction_score"] == pytest.approx(original["mean_absorption_fraction_score"],
                                                                        abs=0.02)  # fmt: skip


REFERENCE = """
import json, random, shutil, sys
from pathlib import Path
from unittest import mock
import numpy as np, torch
import sae_bench
from sae_bench.evals.absorption import feature_absorption, main as absorption_main
from sae_bench.evals.absorption.common import PROBES_DIR
from sae_bench.evals.absorption.eval_config import AbsorptionEvalConfig
from sae_lens import SAE
from transformer_lens import HookedTransformer
import softsae_plugin
from softsae_plugin.offline.smollm2 import load_smollm2

copy, checkpoint, probes, ours, out = sys.argv[1:]
assert Path(sae_bench.__file__).is_relative_to(copy), sae_bench.__file__
model = load_smollm2(first_n_layers=3)
sae = SAE.load_from_disk(checkpoint)
shutil.copytree(probes, PROBES_DIR)  # the same first-letter probe, in SAEBench's own cache location
config = AbsorptionEvalConfig(**json.loads(Path(ours).read_text())["eval_config"])
random.seed(config.random_seed); np.random.seed(config.random_seed); torch.manual_seed(config.random_seed)
# SAEBench draws its in-context examples from the vocabulary in the tokenizer's hash order, which changes
# from process to process; `sae-lens eval` sorts it (see absorption_vocabulary), and so does this reference.
alpha_tokens = feature_absorption.get_alpha_tokens
with mock.patch.object(HookedTransformer, "from_pretrained_no_processing", return_value=model), \
        mock.patch.object(feature_absorption, "get_alpha_tokens", lambda tokenizer: sorted(alpha_tokens(tokenizer))):
    absorption_main.run_eval(config, [("topk", sae)], "cpu", out, force_rerun=True)
"""


@pytest.mark.slow
def test_adapter_leaves_saebench_absorption_unchanged(absorption_run, checkpoints, tmp_path):
    """The same TopK SAE, model and probe through SAEBench's own run_eval (an unmodified copy of the installed
    package, so that its default artifact folders are writable) give the same metrics as `sae-lens eval`."""
    copy = tmp_path / "site"
    shutil.copytree(Path(sae_bench.__file__).parent, copy / "sae_bench", ignore=shutil.ignore_patterns("__pycache__"))
    ours = result_file(absorption_run["out"], "topk")
    probes = absorption_run["out"] / "seed-0" / "saebench" / SMOLLM2_ID / "artifacts" / "absorption" / "probes"
    result = subprocess.run(
        [sys.executable, "-c", REFERENCE, str(copy), str(checkpoints["topk"]), str(probes), str(ours), str(tmp_path)],
        capture_output=True, text=True, timeout=900, cwd=tmp_path, env={**ENV, "PYTHONPATH": str(copy)},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    reference = json.loads((tmp_path / "topk_custom_sae_eval_results.json").read_text())
    mine = json.loads(ours.read_text())
    assert reference["eval_result_metrics"]["mean"] == pytest.approx(mine["eval_result_metrics"]["mean"])
    assert len(reference["eval_result_details"]) == len(mine["eval_result_details"]) > 0
    for theirs, same in zip(reference["eval_result_details"], mine["eval_result_details"], strict=True):
        assert theirs.pop("first_letter") == same.pop("first_letter")
        assert theirs == pytest.approx(same)


@pytest.mark.slow
def test_absorption_skip_fails_loudly(absorption_run, checkpoints):
    """SAEBench skips absorption (printing a message, writing nothing) when too few first-letter probes pass;
    `sae-lens eval` must fail and say why. Reuses the first run's probes and k-sparse probing (no force-rerun)."""
    out = absorption_run["out"]
    result_file(out, "topk").unlink()
    result = run_cli(
        "eval", "--evals", "absorption", "--sae", str(checkpoints["topk"]), "--out", str(out), "--no-force-rerun",
        "--no-checkpoint-eval", *ABSORPTION_ARGS, "--set", "absorption.min_feats_for_eval=27", cwd=out,
    )  # fmt: skip
    assert result.returncode != 0
    assert "no result for topk" in result.stderr and "first-letter probes on the model reach F1" in result.stderr
    assert "it needs 27" in result.stderr


@pytest.fixture(scope="module")
def pipeline_check_datasets(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("datasets")
    script = REPO / "eval" / "make_pipeline_check_datasets.py"
    result = subprocess.run([sys.executable, str(script), "--out", str(out)], capture_output=True, text=True,
                            timeout=300, env=ENV)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return out


@pytest.mark.slow
def test_scr_and_tpp_on_pipeline_check_datasets(checkpoints, pipeline_check_datasets, tmp_path):
    # One SCR class pair and one TPP dataset keep this short; the committed run uses SAEBench's full lists.
    config = tmp_path / "small.yaml"
    config.write_text(
        "scr:\n  dataset_names: [LabHC/bias_in_bios_class_set1]\n"
        "  column1_vals_lookup: {LabHC/bias_in_bios_class_set1: [[professor, nurse]]}\n"
        "tpp:\n  dataset_names: [canrager/amazon_reviews_mcauley_1and5]\n"
    )
    out = tmp_path / "out"
    result = run_cli(
        "eval", "--evals", "scr,tpp", "--sae", str(checkpoints["softsae"]), "--out", str(out),
        "--datasets-dir", str(pipeline_check_datasets),
        "--eval-config", str(REPO / "eval" / "pipeline_check_eval_config.yaml"), "--eval-config", str(config),
        cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    scr = metrics(result_file(out, "softsae", eval_id=SCR_ID))["scr_metrics"]
    tpp = metrics(result_file(out, "softsae", eval_id=TPP_ID))["tpp_metrics"]
    assert math.isfinite(scr["scr_metric_threshold_2"]) and math.isfinite(tpp["tpp_threshold_10_total_metric"])
    # The probes SAEBench trains on the model's activations learn the written-in labels.
    settings = json.loads(result_file(out, "softsae", eval_id=TPP_ID).read_text())
    assert settings["eval_config"]["train_set_size"] == 200
    # The label travels with the numbers: result JSON, table, CSV, plot title and the checkpoint's summary row.
    assert any(note.startswith("pipeline check, not a benchmark") for note in settings[NOTES_KEY])
    summary = (out / "summary.md").read_text()
    assert "PIPELINE CHECK ONLY" in summary and "canrager/amazon_reviews_mcauley_1and5" in summary
    assert "scr_metric_threshold_2 (pipeline check)" in summary
    assert "pipeline check, not a benchmark" in (out / "summary.csv").read_text()
    assert (out / "scr_metric_threshold_2_vs_L0.png").exists()
    row = json.loads((checkpoints["softsae"] / "eval" / "summary.json").read_text())
    assert row["metrics"]["tpp_threshold_10_total_metric"]["labels"][0].startswith("pipeline check, not a benchmark")
    # The stand-ins are named as such by their own record, not by --datasets-dir: a rerun that reuses the results,
    # with neither the datasets nor the settings, keeps every label (JSON, summary, plots' text, model card).
    before = labelled_outputs(out, [checkpoints["softsae"]])
    assert "PIPELINE CHECK" in before["plots"]["tpp_threshold_10_total_metric_vs_L0.png"].upper()
    assert "pipeline check, not a benchmark" in before["cards"][0]
    rerun_reusing_everything("scr,tpp", [checkpoints["softsae"]], out)
    assert labelled_outputs(out, [checkpoints["softsae"]]) == before
    stand_in = json.loads(result_file(out, "softsae", eval_id=SCR_ID).read_text())[PROVENANCE_KEY]["datasets"][0]
    assert stand_in["name"] == "LabHC/bias_in_bios" and stand_in["stand_in"] and stand_in["fingerprint"]


# Small settings for the core, saelens and sparse-probing evals: --quick, then two batches of 4 prompts of 64 tokens,
# one bias-in-bios class set with 200/100 probe examples.
SMALL_SPARSE_PROBING = [
    "--set", "sparse_probing.dataset_names=[LabHC/bias_in_bios_class_set1]",
    "--set", "sparse_probing.probe_train_set_size=200", "--set", "sparse_probing.probe_test_set_size=100",
    "--set", "sparse_probing.context_length=64", "--set", "sparse_probing.k_values=[1,2]",
]  # fmt: skip
SMALL_MORE_EVALS = [
    "--quick",
    "--set", "core.n_eval_reconstruction_batches=2", "--set", "core.eval_batch_size_prompts=4",
    "--set", "core.context_size=64",
    "--set", "saelens.n_eval_reconstruction_batches=2", "--set", "saelens.batch_size_prompts=4",
    "--set", "saelens.context_size=64",
    *SMALL_SPARSE_PROBING,
]  # fmt: skip


@pytest.fixture(scope="module")
def more_evals_run(checkpoints, pipeline_check_datasets, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("more") / "out"
    result = run_cli(
        "eval", "--evals", "core,saelens,sparse_probing", "--sae", str(checkpoints["softsae"]),
        "--sae", str(checkpoints["topk"]), "--out", str(out), "--datasets-dir", str(pipeline_check_datasets),
        *SMALL_MORE_EVALS, "--no-checkpoint-eval", cwd=out.parent,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out


@pytest.mark.slow
def test_core_saelens_and_sparse_probing_on_softsae_and_topk(more_evals_run, checkpoints):
    out = more_evals_run
    for name in ("softsae", "topk"):
        core = metrics(result_file(out, name, eval_id=CORE_ID))
        saelens = metrics(result_file(out, name, eval_id=SAELENS_ID))
        # SAEBench's core eval and SAE-Lens' run_evals are two implementations reading the same shuffled text: where
        # their definitions agree (the model's own loss, the encoding, per-batch variance and cosine), so do they.
        # (Their explained_variance and spliced loss are defined differently: SAE-Lens pools the variance over
        # batches and leaves special tokens out of the splice.)
        shared = (
            ("model_performance_preservation", "ce_loss_without_sae"),
            ("model_performance_preservation", "ce_loss_with_ablation"),
            ("reconstruction_quality", "explained_variance_legacy"),
            ("reconstruction_quality", "cossim"),
            ("sparsity", "l0"),
            ("sparsity", "l1"),
        )
        for category, metric in shared:
            assert core[category][metric] == pytest.approx(saelens[category][metric], rel=1e-5), (name, metric)
        for source in (core, saelens):
            assert math.isfinite(source["reconstruction_quality"]["explained_variance"]), name
            assert math.isfinite(source["model_performance_preservation"]["ce_loss_score"]), name
        # The evals encode with the SAE's own inference path: TopK keeps exactly k, SoftSAE about k on average.
        training = json.loads((checkpoints[name] / "training_summary.json").read_text())
        assert core["sparsity"]["l0"] == pytest.approx(training["k"], rel=0.3 if name == "softsae" else 1e-6), name
        probing = json.loads(result_file(out, name, eval_id=SPARSE_PROBING_ID).read_text())
        # The stand-in texts carry their labels in words: the model's probe and the SAE's best latent find them.
        assert probing["eval_result_metrics"]["llm"]["llm_test_accuracy"] > 0.8, name
        assert probing["eval_result_metrics"]["sae"]["sae_test_accuracy"] > 0.8, name
        assert 0.5 < probing["eval_result_metrics"]["sae"]["sae_top_1_test_accuracy"] <= 1.0, name
        assert any(note.startswith("pipeline check, not a benchmark") for note in probing[NOTES_KEY])
        core_result = json.loads(result_file(out, name, eval_id=CORE_ID).read_text())
        core_notes = core_result[NOTES_KEY]
        assert any("local:english-wikipedia" in note for note in core_notes), core_notes
        # --quick is recorded and labelled; SAEBench's published settings are what it departs from.
        assert any(note.startswith("--quick: settings changed") and "(default 2000)" in note for note in core_notes)
        record = core_result[PROVENANCE_KEY]
        assert record["quick"] and not record["seed_used"] and record["datasets"][0]["fingerprint"]
        exclusion = record["settings_changed"]["exclude_special_tokens_from_reconstruction"]
        assert exclusion == {"used": False, "default": True}
    summary = (out / "summary.md").read_text()
    for column in ("explained_variance", "ce_loss_score", "saelens_ce_loss_score", "sae_top_1_test_accuracy"):
        assert column in summary, column
        assert (out / f"{column}_vs_L0.png").exists(), column


@pytest.mark.slow
def test_sparse_probing_does_not_depend_on_the_saes_order(more_evals_run, checkpoints, pipeline_check_datasets):
    """SAEBench's sparse probing trains the model's probes inside the first SAE's evaluation, from the random state
    that SAE's probes then continue from; `sae-lens eval` caches them first, so the SAEs in reverse order score
    the same."""
    out = more_evals_run.parent / "reversed"
    result = run_cli(
        "eval", "--evals", "sparse_probing", "--sae", str(checkpoints["topk"]), "--sae", str(checkpoints["softsae"]),
        "--out", str(out), "--datasets-dir", str(pipeline_check_datasets), *SMALL_SPARSE_PROBING,
        "--no-checkpoint-eval", cwd=out.parent,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for name in ("softsae", "topk"):
        first, second = (metrics(result_file(o, name, eval_id=SPARSE_PROBING_ID)) for o in (more_evals_run, out))
        for category, values in first.items():
            assert second[category] == pytest.approx(values, abs=1e-6), (name, category)


@pytest.mark.slow
def test_saebench_graphing_reads_the_output(more_evals_run, tmp_path):
    """SAEBench's own loaders and plot read every result: core (which its plots need for L0), sparse probing and
    SAE-Lens' evals (saelens_core, read as core-like)."""
    from sae_bench.sae_bench_utils.graphing_utils import get_core_results, get_eval_results, plot_results

    def files(eval_id: str) -> list[str]:
        return [str(p) for p in sorted(more_evals_run.glob(f"seed-*/{eval_id}/*_eval_results.json"))]

    core, probing, saelens = files(CORE_ID), files(SPARSE_PROBING_ID), files(SAELENS_ID)
    keys = {"softsae_custom_sae_seed-0", "topk_custom_sae_seed-0"}
    assert set(get_core_results(core)) == set(get_eval_results(probing)) == set(get_eval_results(saelens)) == keys
    plot_results(probing, core, SPARSE_PROBING_ID, str(tmp_path / "probing"), k=1)
    plot_results(saelens, core, CORE_ID, str(tmp_path / "saelens"))
    assert (tmp_path / "probing_2var_sae_type.png").exists() and (tmp_path / "saelens_2var_sae_type.png").exists()


def test_help_names_each_eval():
    result = subprocess.run([SAE_LENS, "eval", "--help"], capture_output=True, text=True, timeout=120, env=ENV)
    assert result.returncode == 0
    for name in ("absorption", "splitting", "scr", "tpp", "core", "sparse_probing", "saelens", "--datasets-dir"):
        assert name in result.stdout, name


@pytest.fixture
def tiny_checkpoint(tmp_path) -> Path:
    cfg = TopKSAEConfig(d_in=576, d_sae=600, k=4, metadata=SAEMetadata(model_name=SMOLLM2_ID, hook_name=HOOK))
    TopKSAE(cfg).save_model(tmp_path / "tiny")
    return tmp_path / "tiny"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--evals", "absorption,spelling"], "unknown eval"),
        (["--set", "absorption.k_sparse_probe_epochs=3"], "did you mean 'k_sparse_probe_num_epochs'"),
        (["--set", "scr.model_name=gpt2"], "set by sae-lens eval itself"),
        (["--set", "splitting.max_k_value=3"], "computed by the absorption eval"),
        (["--model", "gemma-2-2b"], "trained on other models"),
        (["--sae", "/nonexistent"], "--sae /nonexistent: no such folder"),
        (["--seeds", "0"], "--seeds 0: expected a positive number"),
    ],
)
def test_bad_options_are_clear_errors(tiny_checkpoint, tmp_path, args, message, capsys):
    from softsae_plugin.evaluate import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--sae", str(tiny_checkpoint), "--out", str(tmp_path / "out"), *args])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.splitlines()[-1]
    assert error.startswith("sae-lens eval: error: ") and message in error


def test_an_sae_that_cannot_be_folded_is_evaluated_with_a_loud_warning(tiny_checkpoint):
    spec = SAESpec(name="tiny", sae=SAE.load_from_disk(str(tiny_checkpoint)))
    with torch.no_grad():
        spec.sae.W_dec /= spec.sae.W_dec.norm(dim=-1, keepdim=True)
        spec.sae.W_dec[0] *= 3  # rows of different norms: TopK refuses, and no single factor folds them
    prepare_decoder(spec)
    assert spec.decoder.startswith("WARNING: decoder row norms 1 to 3, which topk cannot fold")
    assert float(spec.sae.W_dec.norm(dim=-1).max()) == pytest.approx(3)


def test_a_result_saebench_kept_from_an_earlier_run_is_an_error(tiny_checkpoint, tmp_path):
    spec = SAESpec(name="tiny", sae=SAE.load_from_disk(str(tiny_checkpoint)))
    path = spec.result_path(tmp_path, 0)
    path.write_text(json.dumps({"eval_result_metrics": {"mean": {"x": 1.0}}}))
    with pytest.raises(EvalError, match="kept an old result"):
        check_results("absorption", [spec], tmp_path, time.time() + 10, True, lambda _: "")
    check_results("absorption", [spec], tmp_path, time.time() + 10, False, lambda _: "")  # reuse is allowed
    path.write_text(json.dumps({"eval_result_metrics": {"mean": {"x": float("nan")}}}))
    with pytest.raises(EvalError, match="non-finite"):
        check_results("absorption", [spec], tmp_path, 0, True, lambda _: "")
    with pytest.raises(EvalError, match=r"no result for other \(.*\); why"):
        check_results("absorption", [SAESpec(name="other", sae=spec.sae)], tmp_path, 0, True, lambda _: "why")


def test_probe_vocabulary_is_a_reproducible_subset_with_every_letter():
    vocab = [f"{letter}{i}" for letter in "abcdefghijklmnopqrstuvwxyz" for i in range(300 if letter in "st" else 30)]
    subset = probe_vocabulary(vocab, 520, seed=0)
    assert subset == probe_vocabulary(list(reversed(vocab)), 520, seed=0)
    assert set(subset) <= set(vocab) and len(set(subset)) == len(subset)
    counts = {letter: sum(t.startswith(letter) for t in subset) for letter in "abcdefghijklmnopqrstuvwxyz"}
    assert min(counts.values()) == 20 and counts["s"] > counts["a"]


ABSORPTION_VOCABULARY = """
import hashlib
from sae_bench.evals.absorption import common, feature_absorption
from softsae_plugin.evaluate.absorption import absorption_vocabulary
from softsae_plugin.offline.smollm2 import load_smollm2

tokenizer = load_smollm2(first_n_layers=1).tokenizer
raw = feature_absorption.get_alpha_tokens(tokenizer)
with absorption_vocabulary(None, 0):
    ordered, probe = feature_absorption.get_alpha_tokens(tokenizer), common.get_alpha_tokens(tokenizer)
with absorption_vocabulary(520, 0):
    subset = common.get_alpha_tokens(tokenizer)
assert ordered == sorted(raw) == probe and len(raw) > 10000 and set(subset) < set(raw), len(raw)
print(hashlib.sha256("|".join(ordered + ["#"] + subset).encode()).hexdigest())
"""


def test_absorption_vocabulary_is_the_same_in_every_process():
    """SAEBench's own list comes in the tokenizer's per-process hash order; under `absorption_vocabulary` the
    list (and the probe's subset) is the same in two processes, so seeded absorption runs repeat."""
    script = [sys.executable, "-c", ABSORPTION_VOCABULARY]
    runs = [subprocess.run(script, capture_output=True, text=True, timeout=300, env=ENV) for _ in range(2)]
    for run in runs:
        assert run.returncode == 0, run.stderr[-3000:]
    assert runs[0].stdout.split()[-1] == runs[1].stdout.split()[-1]


def test_datasets_are_served_from_local_copies_only(tmp_path):
    import sae_bench.evals.scr_and_tpp.dataset_creation as scr_data
    import sae_bench.sae_bench_utils.dataset_utils as tpp_data

    info = DatasetInfo(description="written for a test")
    split = Dataset.from_dict({"text": ["a", "b"], "rating": [1.0, 5.0]}, info=info)
    DatasetDict({"train": split, "test": split}).save_to_disk(str(tmp_path / "owner" / "reviews"))
    served: dict[str, dict] = {}
    with serve_datasets(tmp_path, served):
        assert scr_data.load_dataset("owner/reviews")["train"]["text"] == ["a", "b"]
        assert tpp_data.load_dataset("owner/reviews", split="test")["rating"] == [1.0, 5.0]
        with pytest.raises(EvalError, match=r"no copy of owner/other: expected .*owner/other"):
            tpp_data.load_dataset("owner/other")
    record = served["owner/reviews"]
    assert list(served) == ["owner/reviews"] and record["description"] == "written for a test"
    assert record["source"] == f"local copy {tmp_path / 'owner' / 'reviews'}" and not record["stand_in"]
    assert record["fingerprint"]
    assert scr_data.load_dataset is tpp_data.load_dataset is datasets.load_dataset  # restored afterwards


def test_saebench_reads_softsae_hook_and_layer_from_metadata():
    from sae_bench.sae_bench_utils.general_utils import load_and_format_sae

    from softsae_plugin import SoftSAE, SoftSAEConfig

    sae = SoftSAE(SoftSAEConfig(d_in=16, d_sae=64, k=4, metadata=SAEMetadata(model_name="m", hook_name=HOOK)))
    _, formatted, _ = load_and_format_sae("soft", sae, "cpu")
    assert formatted.cfg.hook_layer == 2 and formatted.cfg.hook_name == HOOK
    x = torch.randn(3, 5, 16)
    assert formatted.to(dtype=torch.bfloat16).encode(x.bfloat16()).shape == (3, 5, 64)


def test_absorption_reads_the_same_activations_from_a_model_stopped_after_the_hook_block():
    from softsae_plugin.offline.smollm2 import load_smollm2

    model = load_smollm2(first_n_layers=5)
    sae = TopKSAE(TopKSAEConfig(d_in=576, d_sae=600, k=4, metadata=SAEMetadata(hook_name=HOOK)))
    prompts = ["apple has the first letter: A", "zebra has the first letter:"]
    logits, full = model.run_with_cache(prompts, names_filter=[HOOK])
    with stop_after_hook_layer(model, [SAESpec(name="tiny", sae=sae)]):
        stopped, cut = model.run_with_cache(prompts, names_filter=[HOOK])
    assert torch.equal(cut[HOOK], full[HOOK])
    assert logits.shape[-1] == model.cfg.d_vocab and stopped.shape[-1] == model.cfg.d_model  # it stopped early
    assert model.run_with_cache(prompts, names_filter=[HOOK])[0].shape[-1] == model.cfg.d_vocab  # and is restored
