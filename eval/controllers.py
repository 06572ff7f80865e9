"""Which sparsity control SoftSAE defaults to, chosen by measurement (issue 23, item 4).

    .venv/bin/python eval/controllers.py                    # embeddings, ~25 min on 2 idle cores
    .venv/bin/python eval/controllers.py --setting smollm2  # after `make study`'s cache and lr stages, ~2 h
    .venv/bin/python eval/controllers.py --scale tiny --out /tmp/c   # smoke test of the embedding setting

Two settings, three seeds each (initialisation and batch order; the data and its held-out part are the same):
  embeddings  `make reproduce`'s (eval/REPORT.md section a, full scale: MiniLM embeddings of 20,295 sentences, d_sae
              3072, 800 steps of batch 512, lr 3e-3, which every architecture picked there), k = 32;
  smollm2     `make study`'s (eval/STUDY.md: SmolLM2-135M layer 6, d_sae 2304, 2,048,000 tokens of batch 1024, the
              study's cached activations and its learning-rate picks, measured on its test set), k = 32; each seed
              one sweep (SAE-Lens' multi trainer, the same batches for every SAE).
SoftSAE with each control:

  constraint           every soft-phase batch's mean k_hat held at k, the hard phase calibrated (the default so far)
  softplus (paper)     the paper's one-sided budget, no calibration: the paper as published
  softplus+calibration the paper's budget, then the hard phase calibrated as the constraint's is

and TopK at k 24, 28 and 32 with the same seeds, so that each SoftSAE run is compared with TopK's FVE of its own
seed interpolated at the SoftSAE run's held-out L0 (`lab.measures.matched_fve`). The winner is the control with the
highest mean FVE gain over TopK at matched L0 among those whose held-out and training L0 are within 2% of k (a
calibrated control must land there; the paper's does not promise it). Writes runs.csv, summary.md (the table, mean
and sd over seeds, and the verdict, every sentence computed from the numbers) and frontier.png under
eval/results/controllers/<setting>. Resumable: every run (embeddings) or seed (smollm2) is a stage saved under --work.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from lab import REPO
from lab.measures import matched_fve
from lab.plots import pyplot
from lab.stages import stage
from lab.tables import md_table, write_csv
from reproduce import SCALES, embedding_data, train_embedding_run
from tqdm.auto import tqdm

CONTROLS: dict[str, dict[str, Any]] = {
    "constraint": {"sparsity_control": "constraint", "calibrate_hard_l0": True},
    "softplus (paper)": {"sparsity_control": "softplus", "calibrate_hard_l0": False},
    "softplus+calibration": {"sparsity_control": "softplus", "calibrate_hard_l0": True},
}
SEEDS = (42, 43, 44)
K = 32
TOPK_KS = (24, 28, 32)
LR = 3e-3
L0_TOLERANCE = 0.02


def run_embeddings(scale_name: str, work: Path, seeds: Sequence[int] = SEEDS) -> tuple[list[dict[str, Any]], str]:
    """Every embedding-setting run (SoftSAE per control and seed, TopK per k and seed) as flat records, each a saved
    stage, and the setting's description."""
    scale = SCALES[scale_name]
    k = K if scale_name == "full" else scale.emb_ks[-1]
    topk_ks = TOPK_KS if scale_name == "full" else (k - 4, k)
    data = embedding_data(scale, work)
    plan = [("softsae", name, k, seed) for seed in seeds for name in CONTROLS]
    plan += [("topk", "topk", topk_k, seed) for seed in seeds for topk_k in topk_ks]
    records = []
    with tqdm(total=len(plan), desc="controller comparison", unit="run") as bar:
        for arch, name, run_k, seed in plan:
            seeded = dataclasses.replace(scale, seed=seed)
            overrides = CONTROLS.get(name, {})
            inputs = {"scale": scale_name, "arch": arch, "control": name, "k": run_k, "seed": seed, "lr": LR}

            def train(arch: str = arch, run_k: int = run_k, seeded: Any = seeded, overrides: Any = overrides) -> Any:
                result = train_embedding_run(arch, run_k, LR, data, seeded, work / f"seed{seeded.seed}", **overrides)
                return {"summary": result["summary"], "train_seconds": result["seconds"]}

            result = stage(work, _slug(arch, name, run_k, seed), bar, train, inputs)
            records.append({**inputs, **_measured(result["summary"]), "train_seconds": result["train_seconds"]})
    described = (
        f"Embedding setting of `make reproduce` at its {scale_name} scale (MiniLM sentence embeddings, d_in "
        f"{data['train'].shape[1]}, d_sae {scale.emb_d_sae_factor * data['train'].shape[1]}, {scale.emb_steps} steps "
        f"of batch {scale.emb_batch}), lr {LR:g} for every run; L0 and FVE on the {len(data['heldout']):,} held-out "
        "sentences, training L0 on as many training sentences."
    )
    return records, described


def run_smollm2(
    study_work: Path, work: Path, scale_name: str, seeds: Sequence[int] = SEEDS
) -> tuple[list[dict[str, Any]], str]:
    """Every SmolLM2 run, one sweep per seed on `make study`'s cached activations (its work folder `study_work`, whose
    text, cache and lr stages must have finished) at its learning-rate picks; flat records and the description."""
    import study
    from lab.activations import cached_activations
    from sae_lens import SAE
    from sae_lens.util import get_special_token_ids

    from softsae_plugin.offline.smollm2 import load_smollm2
    from softsae_plugin.training.summary import summarise

    scale = study.SCALES[scale_name]
    k = K if scale_name == "full" else scale.sweep_k
    topk_ks = TOPK_KS if scale_name == "full" else (k - 4, k)
    missing = [name for name in ("cache.json", "lr.json") if not (study_work / name).exists()]
    if missing:
        raise SystemExit(f"{study_work} has no {', '.join(missing)}: run `make study` (its cache and lr stages) first")
    picks = json.loads((study_work / "lr.json").read_text())["fve"]
    lr = {arch: max(scale.lrs, key=lambda v, a=arch: picks[f"{a}-lr{v:g}"]) for arch in ("softsae", "topk")}
    hook = f"blocks.{scale.layer}.hook_resid_post"
    special = get_special_token_ids(load_smollm2().tokenizer)
    train = cached_activations(study_work / "cache-train" / "cache", hook, special)
    heldout = cached_activations(study_work / "cache-heldout" / "cache", hook, special)
    data = {"train": train["acts"][train["keep"]], "heldout": heldout["acts"][heldout["keep"]]}
    data["d_in"] = data["train"].shape[1]
    train_sample = data["train"][torch.linspace(0, len(data["train"]) - 1, 16384).long()]
    names = {_slug("softsae", name, k, 0): ("softsae", name, k) for name in CONTROLS}
    names.update({_slug("topk", "topk", topk_k, 0): ("topk", "topk", topk_k) for topk_k in topk_ks})
    saes = {n: (arch, run_k, lr[arch]) for n, (arch, _, run_k) in names.items()}
    overrides = {n: CONTROLS[name] for n, (_, name, _) in names.items() if name in CONTROLS}
    records = []
    with tqdm(total=len(seeds), desc="controller comparison (SmolLM2)", unit="seed") as bar:
        for seed in seeds:

            def sweep(seed: int = seed) -> dict[str, Any]:
                study.train_stage(f"seed{seed}", saes, scale.training_tokens, seed, scale, data, work, True,
                                  overrides=overrides)  # fmt: skip
                measured = {}
                for n in saes:
                    folder = work / f"seed{seed}" / n
                    summary = json.loads((folder / "training_summary.json").read_text())
                    summary["train_mean_l0"] = summarise(SAE.load_from_disk(str(folder)), [train_sample])[0]["mean_l0"]
                    measured[n] = summary
                return {"summaries": measured}

            inputs = {**study.stage_inputs(saes, scale.training_tokens, scale, overrides), "seed": seed}
            result = stage(work, f"seed{seed}", bar, sweep, inputs)
            for n, (arch, name, run_k) in names.items():
                records.append({"arch": arch, "control": name, "k": run_k, "seed": seed, "lr": lr[arch],
                                **_measured(result["summaries"][n])})  # fmt: skip
    described = (
        f"SmolLM2-135M setting of `make study` (`{hook}`, d_sae {scale.d_sae}, {scale.training_tokens:,} tokens of "
        f"batch {scale.batch} per run, the study's cached activations), each architecture at the study's "
        f"learning-rate pick (SoftSAE {lr['softsae']:g}, TopK {lr['topk']:g}); L0 and FVE on the study's "
        f"{len(data['heldout']):,} held-out test tokens, training L0 on 16,384 training tokens."
    )
    return records, described


def _slug(arch: str, name: str, k: int, seed: int) -> str:
    return (f"{arch}-{name.split(' ')[0]}-k{k}" + (f"-seed{seed}" if seed else "")).replace("+", "-")


def _measured(summary: dict[str, Any]) -> dict[str, float]:
    return {"fve": summary["fve"], "l0": summary["mean_l0"], "train_l0": summary["train_mean_l0"]}


def compare(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each SoftSAE record with TopK's FVE of the same seed at its held-out L0 and the gain over it."""
    rows = []
    for record in records:
        if record["arch"] != "softsae":
            continue
        topk = sorted((r for r in records if r["arch"] == "topk" and r["seed"] == record["seed"]), key=lambda r: r["k"])
        at_l0, extrapolated = matched_fve(record["l0"], [r["l0"] for r in topk], [r["fve"] for r in topk])
        rows.append({**record, "topk_fve_at_l0": at_l0, "extrapolated": extrapolated, "gain": record["fve"] - at_l0})
    return rows


def _mean_sd(values: Sequence[float], digits: int = 3) -> str:
    mean = statistics.fmean(values)
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.{digits}f} ± {sd:.{digits}f}"


def _gains_and_eligibility(rows: list[dict[str, Any]]) -> tuple[dict[str, float], dict[str, bool]]:
    """Per control, the mean FVE gain over TopK at matched L0, and whether every run's held-out and training L0
    lie within L0_TOLERANCE of k."""
    by_control: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_control.setdefault(row["control"], []).append(row)
    k = rows[0]["k"]
    within = {}
    for control, group in by_control.items():
        worst = max(max(abs(r["l0"] / k - 1), abs(r["train_l0"] / k - 1)) for r in group)
        within[control] = worst <= L0_TOLERANCE
    gains = {control: statistics.fmean(r["gain"] for r in group) for control, group in by_control.items()}
    return gains, within


def verdict(rows: list[dict[str, Any]]) -> tuple[str, list[str]]:
    """The winning control and the sentences that state the choice, computed from the compared rows."""
    gains, within = _gains_and_eligibility(rows)
    eligible = [control for control in gains if within[control]]
    winner = max(eligible or gains, key=gains.__getitem__)
    lines = [
        "Mean FVE gain over TopK at matched L0: "
        + "; ".join(f"{control} {gains[control]:+.4f}" for control in gains)
        + ".",
        "L0 within 2% of k on held-out and training inputs in every seed: "
        + "; ".join(f"{control} {'yes' if within[control] else 'no'}" for control in within)
        + ".",
    ]
    best_overall = max(gains, key=gains.__getitem__)
    if best_overall != winner:
        lines.append(
            f"{best_overall} has the highest gain but misses the 2% L0 condition, so it is not eligible as the default."
        )
    runner_up = sorted((c for c in (eligible or gains) if c != winner), key=gains.__getitem__, reverse=True)
    if runner_up:
        won = [r["gain"] for r in rows if r["control"] == winner]
        spread = statistics.stdev(won) if len(won) > 1 else 0.0
        margin = gains[winner] - gains[runner_up[0]]
        lines.append(
            f"Chosen: {winner}, ahead of {runner_up[0]} by {margin:+.4f} FVE at matched L0 "
            f"({'more' if margin > spread else 'less'} than the sd over seeds of its gain, {spread:.4f})."
        )
    else:
        lines.append(f"Chosen: {winner}.")
    return winner, lines


def combine(root: Path) -> str | None:
    """The default across settings, from every root/<setting>/runs.csv (None with fewer than two settings): among
    the controls eligible in every setting (L0 within 2% of k), the one with the highest FVE gain over TopK at
    matched L0, averaged over the settings. Writes root/summary.md (every sentence computed) and returns it."""
    settings = {}
    for path in sorted(root.glob("*/runs.csv")):
        with path.open() as f:
            rows = [r for r in csv.DictReader(f) if r["arch"] == "softsae"]
        settings[path.parent.name] = [
            {**r, **{c: float(r[c]) for c in ("k", "fve", "l0", "train_l0", "gain")}} for r in rows
        ]
    if len(settings) < 2:
        return None
    measured = {name: _gains_and_eligibility(rows) for name, rows in settings.items()}
    controls = list(CONTROLS)
    eligible = [c for c in controls if all(within[c] for _, within in measured.values())]
    score = {c: statistics.fmean(gains[c] for gains, _ in measured.values()) for c in controls}
    winner = max(eligible or controls, key=score.__getitem__)
    table = [
        [c, *(f"{measured[name][0][c]:+.4f}{'' if measured[name][1][c] else ' (L0 off)'}" for name in settings),
         f"{score[c]:+.4f}", "yes" if c in eligible else "no"]
        for c in controls
    ]  # fmt: skip
    leaders = {name: max(gains, key=gains.__getitem__) for name, (gains, _) in measured.items()}
    runner = max((c for c in eligible if c != winner), key=score.__getitem__, default=None)
    margin = "." if runner is None else f", ahead of {runner} by {score[winner] - score[runner]:+.4f}."
    lines = [
        "# SoftSAE's default sparsity control, across settings (eval/controllers.py)",
        "",
        "Mean FVE gain over TopK at matched L0 (seeds: "
        + ", ".join(f"{name} {len({r['seed'] for r in rows})}" for name, rows in settings.items())
        + "; the settings' tables are in "
        + ", ".join(f"[{name}/summary.md]({name}/summary.md)" for name in settings)
        + "). Eligible: L0 within 2% of k on held-out and training inputs in every run of every setting.",
        "",
        *md_table(["control", *settings, "mean over settings", "eligible"], table),
        "Highest gain per setting: " + "; ".join(f"{name} {leader}" for name, leader in leaders.items()) + ".",
        f"Pick by this rule: {winner} (`{', '.join(f'{key}={value!r}' for key, value in CONTROLS[winner].items())}`), "
        f"the highest mean gain among the eligible controls{margin}",
        "The package default (`sparsity_control` in softsae.py) is set by hand from this and the README says why.",
        "",
    ]
    (root / "summary.md").write_text("\n".join(lines))
    return winner


def write_results(rows: list[dict[str, Any]], records: list[dict[str, Any]], out: Path, described: str) -> str:
    """runs.csv, summary.md and frontier.png under `out` (`described`: the setting, for the summary); returns the
    winning control."""
    out.mkdir(parents=True, exist_ok=True)
    every = [*rows, *(r for r in records if r["arch"] == "topk")]
    write_csv(out / "runs.csv", every, list(dict.fromkeys(key for row in every for key in row)))
    winner, sentences = verdict(rows)
    k = rows[0]["k"]
    table = []
    for control in CONTROLS:
        group = [r for r in rows if r["control"] == control]
        table.append(
            [
                control,
                len(group),
                _mean_sd([r["fve"] for r in group]),
                _mean_sd([r["l0"] for r in group], 2),
                _mean_sd([100 * (r["l0"] / k - 1) for r in group], 2) + "%",
                _mean_sd([100 * (r["train_l0"] / k - 1) for r in group], 2) + "%",
                _mean_sd([r["topk_fve_at_l0"] for r in group]) + ("*" if any(r["extrapolated"] for r in group) else ""),
                _mean_sd([r["gain"] for r in group], 4),
            ]
        )
    topk = [r for r in records if r["arch"] == "topk"]
    lines = [
        "# SoftSAE's sparsity control, chosen by measurement (eval/controllers.py)",
        "",
        f"{described} k = {k}, seeds {', '.join(str(s) for s in sorted({r['seed'] for r in rows}))}; mean ± sd over "
        "seeds. TopK's FVE at each run's L0 is interpolated on TopK's own runs at k "
        f"{', '.join(str(k_) for k_ in sorted({r['k'] for r in topk}))} with the same seed (* where a run's L0 lies "
        "outside them and the line is extended).",
        "",
        *md_table(
            ["control", "seeds", "FVE", "L0", "L0 / k - 1", "train L0 / k - 1", "TopK FVE at L0", "gain at L0"], table
        ),
        "",
        *sentences,
        "",
    ]
    (out / "summary.md").write_text("\n".join(lines))
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for seed in sorted({r["seed"] for r in topk}):
        mine = sorted((r for r in topk if r["seed"] == seed), key=lambda r: r["l0"])
        label = "TopK (one line per seed)" if seed == min(r["seed"] for r in topk) else None
        ax.plot([r["l0"] for r in mine], [r["fve"] for r in mine], "k-", alpha=0.4, label=label)
    for control, marker in zip(CONTROLS, "osD", strict=True):
        group = [r for r in rows if r["control"] == control]
        ax.scatter([r["l0"] for r in group], [r["fve"] for r in group], marker=marker, label=control)
    ax.axvline(k, color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel("held-out mean L0")
    ax.set_ylabel("held-out FVE")
    ax.set_title(f"SoftSAE controls against TopK ({out.name}, k = {k}); chosen: {winner}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "frontier.png", dpi=120)
    plt.close(fig)
    return winner


def main(argv: Sequence[str] | None = None) -> None:
    """Run (or read back) every run of a setting and write its comparison."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--setting", default="embeddings", choices=("embeddings", "smollm2"))
    parser.add_argument("--scale", default="full", choices=sorted(SCALES), help="reproduce's or the study's scale")
    parser.add_argument("--out", type=Path, default=None, help="default: eval/results/controllers/SETTING")
    parser.add_argument("--work", type=Path, default=None, help="default: runs/controllers-SETTING[-SCALE]")
    parser.add_argument("--study-work", type=Path, default=None, help="smollm2: the study's (runs/study-SCALE)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (two compete badly with a busy core)")
    parser.add_argument(
        "--seeds", type=lambda text: tuple(int(s) for s in text.split(",")), default=SEEDS, help="e.g. 42,43"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    suffix = "" if args.scale == "full" else f"-{args.scale}"
    work = args.work or REPO / "runs" / f"controllers-{args.setting}{suffix}"
    out = args.out or REPO / "eval" / "results" / "controllers" / args.setting
    work.mkdir(parents=True, exist_ok=True)
    if args.setting == "embeddings":
        records, described = run_embeddings(args.scale, work, args.seeds)
    else:
        study_work = args.study_work or REPO / "runs" / f"study-{args.scale}"
        records, described = run_smollm2(study_work, work, args.scale, args.seeds)
    winner = write_results(compare(records), records, out, described)
    print((out / "summary.md").read_text())
    print(f"chosen in this setting: {winner}")
    across = combine(out.parent)
    if across is not None:
        print(f"default across settings ({out.parent / 'summary.md'}): {across}")


if __name__ == "__main__":
    main()
