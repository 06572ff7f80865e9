"""The study's report, STUDY.md: the convergence criterion and verdict, the tables, the plots, and the paper's claims
judged against the seed-to-seed spread."""

from __future__ import annotations

import csv
import functools
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from lab import REPO
from lab.measures import matched_fve
from lab.plots import plot_frontier, plot_k_hat, pyplot
from lab.saes import ARCHITECTURES, COLOURS, LABELS
from lab.tables import fixed, link, md_cell, results_json

CONVERGED_DEAD = 0.05
CONVERGED_FVE_MOVE = 0.002
L0_GOAL = 0.02
# The fit reads the checkpoints of the last FIT_SPAN of the tokens (at 10% spacing, 4 to 5 points), enough for a slope
# whose uncertainty is measured rather than one difference that checkpoint jitter alone can exceed.
FIT_SPAN = 0.4
# SAEBench's README does not recommend its absorption metric below these (models, latents).
SAEBENCH_MIN_PARAMETERS = 1e9
SAEBENCH_MIN_LATENTS = 16_384
# The paper's absorption claim is made at these k.
PAPER_ABSORPTION_KS = (80, 320)
MODEL_PARAMETERS = 135e6
FAILED_CONTROL = (
    "**fails**: this probe does not reproduce the ordering the paper measures, so the SoftSAE-TopK ordering that "
    "it gives says little."
)
# The schedule and why it is what it is (commit b28328e): part of the study's method, stated in the report.
SCHEDULE_NOTE = (
    "This schedule replaced a linear decay over the last 20% of the steps (commit b28328e): with the decay, no k = 16 "
    "run passed the convergence criterion, because the decay itself moved every held-out FVE by 0.004-0.005 inside "
    "the window that the criterion judges."
)


def convergence(points: list[dict[str, float]], final: dict[str, Any]) -> dict[str, Any]:
    """Two readings of whether a run converged (dead fraction below CONVERGED_DEAD and held-out FVE still, both):
    "fit", a least-squares line through the checkpoints of the last FIT_SPAN of the tokens, its slope times 10% of
    the tokens as the move ("fit_move") with its standard error ("fit_se"), converged when |move| < CONVERGED_FVE_MOVE;
    and "two_point", the FVE difference between the checkpoint nearest 90% of the tokens and the last one."""
    dead_ok = final["dead_fraction"] < CONVERGED_DEAD
    if len(points) < 2:
        return {"fit": False, "fit_move": math.inf, "fit_se": math.inf, "two_point": False, "two_point_move": math.inf}
    total = points[-1]["tokens"]
    # The checkpoint nearest 90% of the tokens (SAE-Lens saves it on the first step past the threshold).
    at_90 = min(points[:-1], key=lambda p: abs(p["tokens"] - 0.9 * total))
    two_point = abs(points[-1]["fve"] - at_90["fve"])
    tail = [p for p in points if p["tokens"] >= (1 - FIT_SPAN) * total - 1e-9]
    if len(tail) < 3:
        tail = points[-3:]
    x = np.array([p["tokens"] / total for p in tail])
    y = np.array([p["fve"] for p in tail])
    slope, intercept = np.polyfit(x, y, 1)
    residual = y - (slope * x + intercept)
    dof = len(tail) - 2
    se = math.sqrt(residual @ residual / dof / ((x - x.mean()) @ (x - x.mean()))) if dof > 0 else math.inf
    move, move_se = 0.1 * float(slope), 0.1 * se
    return {
        "fit": dead_ok and abs(move) < CONVERGED_FVE_MOVE,
        "fit_move": move,
        "fit_se": move_se,
        "two_point": dead_ok and two_point < CONVERGED_FVE_MOVE,
        "two_point_move": two_point,
    }


def converged(points: list[dict[str, float]], final: dict[str, Any]) -> tuple[bool, float]:
    """The convergence verdict (the fit's, see `convergence`) and its FVE move over the last 10% of the tokens."""
    reading = convergence(points, final)
    return reading["fit"], reading["fit_move"]


def _main_runs(results: dict[str, Any], seed: int) -> dict[tuple[str, int], dict[str, Any]]:
    runs = results["measures"]["runs"]
    return {(r["arch"], r["k"]): r for r in runs.values() if r["seed"] == seed}


def absorption_rows(results: dict[str, Any]) -> dict[tuple[str, int], dict[str, float]]:
    """(architecture, seed) -> SAEBench's absorption fraction and number of split features."""
    rows = {}
    runs = results["measures"]["runs"]
    for row in results["absorption"]["rows"]:
        # sae-lens eval names each SAE by its path below the folders' common parent: <stage>-<run name> (the longest
        # match: "batchtopk-k32-s42" also ends with "topk-k32-s42").
        run = runs[max((name for name in runs if row["SAE"].endswith(name)), key=len)]
        rows[(run["arch"], run["seed"])] = {
            "absorption": float(row["mean_absorption_fraction_score"] or "nan"),
            "splitting": float(row["mean_num_split_features"] or "nan"),
            "l0": run["summary"]["mean_l0"],
        }
    return rows


def plot_curves(results: dict[str, Any], path: Path) -> None:
    """Held-out FVE and dead fraction against training tokens, one column per k, every run."""
    plt = pyplot()
    ks = results["scale"]["ks"]
    fig, axes = plt.subplots(2, len(ks), figsize=(4.2 * len(ks), 6), squeeze=False)
    for run in results["curves"]["runs"].values():
        col = ks.index(run["k"])
        tokens = [p["tokens"] / 1e6 for p in run["points"]]
        style = "-" if run["seed"] == results["scale"]["seeds"][0] else "--"
        label = f"{LABELS[run['arch']]} (seed {run['seed']})"
        axes[0][col].plot(tokens, [p["fve"] for p in run["points"]], style, color=COLOURS[run["arch"]], label=label)
        axes[1][col].plot(tokens, [p["dead_fraction"] for p in run["points"]], style, color=COLOURS[run["arch"]])
        axes[0][col].set_title(f"k = {run['k']}")
    for col in range(len(ks)):
        axes[0][col].set_ylabel("held-out FVE")
        axes[1][col].set_ylabel("dead fraction")
        axes[1][col].axhline(CONVERGED_DEAD, color="gray", linestyle=":")
        axes[1][col].set_xlabel("training tokens (millions)")
        axes[0][col].grid(alpha=0.3)
        axes[1][col].grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    seeds = results["scale"]["seeds"]
    if len(seeds) > 1:
        fig.suptitle(f"solid: seed {seeds[0]}; dashed: seed {', '.join(map(str, seeds[1:]))}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_absorption(
    rows: dict[tuple[str, int], dict[str, float]], converged: dict[tuple[str, int], bool], path: Path
) -> None:
    """SAEBench absorption fraction against held-out L0 at k = 32, one point per architecture and seed; hollow
    where the run did not converge (`converged`: (architecture, seed) -> verdict)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for arch in ARCHITECTURES:
        for done in (True, False):
            keys = [key for key in rows if key[0] == arch and converged[key] == done]
            points = [(rows[key]["l0"], rows[key]["absorption"]) for key in keys]
            if points:
                label = LABELS[arch] + ("" if done else " (not converged)")
                face = COLOURS[arch] if done else "none"
                ax.scatter(*zip(*points, strict=True), label=label, s=40, facecolors=face, edgecolors=COLOURS[arch])
    ax.set_xlabel("mean L0 (held out)")
    ax.set_ylabel("SAEBench mean absorption fraction")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(results: dict[str, Any], report: Path, plots: Path) -> None:
    """The Markdown report and its plots."""
    plots.mkdir(parents=True, exist_ok=True)
    report.parent.mkdir(parents=True, exist_ok=True)
    rel = functools.partial(link, report=report)
    scale = results["scale"]
    seed0, ks = scale["seeds"][0], scale["ks"]
    main = _main_runs(results, seed0)
    curves = results["curves"]["runs"]
    absorb = absorption_rows(results)
    names = {(r["arch"], r["k"], r["seed"]): n for n, r in curves.items()}
    readings = {n: convergence(r["points"], {"dead_fraction": r["final_dead_fraction"]}) for n, r in curves.items()}
    ok = {key: readings[n]["fit"] for key, n in names.items()}
    files = {
        "frontier": plots / "frontier.png",
        "curves": plots / "training_curves.png",
        "k_hat": plots / "k_hat.png",
        "absorption": plots / "absorption_vs_l0.png",
    }
    plot_frontier(main, f"SmolLM2-135M {results['hook']}: FVE vs L0 (held out)", files["frontier"])
    plot_curves(results, files["curves"])
    plot_k_hat(
        [{**main[("softsae", k)], "k_hat": np.asarray(main[("softsae", k)]["k_hat"])} for k in ks],
        "SoftSAE k_hat on held-out tokens",
        files["k_hat"],
    )
    plot_absorption(absorb, {(a, s): ok[(a, scale["sweep_k"], s)] for a, s in absorb}, files["absorption"])
    total = sum(results["stage_seconds"].values())
    L = [
        f"# SoftSAE against SAE-Lens' baselines: {sum(ok.values())} of {len(ok)} runs converged (`eval/study.py "
        f"--scale {results['scale_name']}`)",
        "",
    ]
    L += [
        f"SmolLM2-135M (offline GGUF), `{results['hook']}`, d_sae {scale['d_sae']}, batch {scale['batch']} tokens; "
        f"{scale['training_tokens']:,} training tokens per run (the activations of {results['cache']['train']:,} "
        "tokens of gensim's Wikipedia sample and Lee news corpus, cached once with SAE-Lens' CacheActivationsRunner, "
        f"read in a fresh shuffle every epoch: about {scale['training_tokens'] / results['cache']['train']:.1f} "
        "passes over the cached tokens); every FVE and L0 on "
        f"{results['cache']['heldout']:,} held-out tokens (every 10th paragraph/article, never trained on), special "
        "tokens left out as in training. Trained with SAE-Lens' multi trainer through `softsae_plugin.sweep` (one "
        "sweep per k, the same batches for every SAE); the learning rate warms up over the first 5% of the steps "
        + (
            "and stays constant after"
            if not scale["lr_decay_fraction"]
            else f"and decays over the last {scale['lr_decay_fraction']:.0%}"
        )
        + f", and SoftSAE's hard phase is the last {scale['softsae_hard_fraction']:.0%} of the steps, so the last 10% "
        "of every run, where convergence is judged, is at a steady rate in a steady phase. "
        + (SCHEDULE_NOTE if not scale["lr_decay_fraction"] else "")
        + " Wall time of all stages: "
        f"{total / 3600:.2f} h on this machine ("
        + ", ".join(
            f"{k} {v / 60:.1f} min{'*' if k in results['stages_resumed'] else ''}"
            for k, v in results["stage_seconds"].items()
        )
        + ")"
        + (
            "; * resumed from a checkpoint, its time scaled from the part run last to the whole run."
            if results["stages_resumed"]
            else "."
        ),
        "",
    ]
    L += [f"## Learning rates (sweep at k = {scale['sweep_k']}, {scale['sweep_tokens']:,} tokens)", ""]
    L += [
        "| architecture | " + " | ".join(f"lr {lr:g}" for lr in scale["lrs"]) + " | chosen |",
        "|---" * (len(scale["lrs"]) + 2) + "|",
    ]
    for arch in ARCHITECTURES:
        cells = [fixed(results["lr"]["fve"][f"{arch}-lr{lr:g}"]) for lr in scale["lrs"]]
        L.append(f"| {LABELS[arch]} | " + " | ".join(cells) + f" | {results['lr']['best_lr'][arch]:g} |")
    edge = [LABELS[a] for a, lr in results["lr"]["best_lr"].items() if lr in (min(scale["lrs"]), max(scale["lrs"]))]
    L += [
        "",
        f"FVE on the validation set ({results['cache'].get('validation', 0):,} tokens of held-out text that no other "
        "number in this report is measured on: the test set's rows are left out of it) after the sweep's tokens; each "
        "architecture trains at the rate that scored best there. "
        + (
            f"At the grid's edge: {', '.join(edge)} (the best rate may lie beyond it)."
            if edge
            else "Every pick lies inside the grid, so each optimum is bracketed."
        )
        + f" The sweep trains on {scale['sweep_tokens'] / scale['training_tokens']:.0%} of a main run's tokens, so "
        "its pick is the best rate for that length, which need not be the best for the full run.",
    ]
    L += [
        "",
        "## Convergence",
        "",
        f"A run converged when its dead fraction (SAE-Lens': no firing within the last {scale['dead_window_steps']} "
        f"steps) is below {CONVERGED_DEAD:.0%} and its held-out FVE moves by less than {CONVERGED_FVE_MOVE} over "
        f"10% of its tokens, read from a least-squares line through the checkpoints of the last {FIT_SPAN:.0%} of "
        "the tokens (the move: its slope times 10% of the tokens, with its standard error). Beside it, the two-point "
        "reading (the FVE difference between the checkpoints at 90% and 100%), which one checkpoint's jitter can "
        "decide; only the fit's verdict is used below.",
        "",
        f"![training curves]({rel(files['curves'])})",
        "",
        "| run | converged (fit) | fitted FVE move, last 10% (± SE) | two-point move | converged (two-point) | "
        "dead fraction |",
        "|---|---|---|---|---|---|",
    ]
    for name, run in curves.items():
        r = readings[name]
        L.append(
            f"| {name} | {'yes' if r['fit'] else '**no**'} | {r['fit_move']:+.4f} ± {r['fit_se']:.4f} | "
            f"{fixed(r['two_point_move'], 4)} | {'yes' if r['two_point'] else 'no'} | "
            f"{fixed(run['final_dead_fraction'])} |"
        )
    differ = [name for name, r in readings.items() if r["fit"] != r["two_point"]]
    L += [
        "",
        (
            f"The two readings differ on {len(differ)} run(s): {', '.join(differ)}."
            if differ
            else "The two readings agree on every run."
        ),
    ]
    L += [
        "",
        f"## FVE, L0 and loss recovered (seed {seed0})",
        "",
        "| k | " + " | ".join(f"{LABELS[a]} L0 / FVE / CE score" for a in ARCHITECTURES) + " |",
        "|---" * (1 + len(ARCHITECTURES)) + "|",
    ]
    for k in ks:
        cells = []
        for arch in ARCHITECTURES:
            r = main[(arch, k)]
            flag = "" if ok[(arch, k, seed0)] else " (not converged)"
            cells.append(
                f"{fixed(r['summary']['mean_l0'], 1)} / {fixed(r['summary']['fve'])} / "
                f"{fixed(r['recovered']['ce_loss_score'])}{flag}"
            )
        L.append(f"| {k} | " + " | ".join(cells) + " |")
    L += ["", f"![frontier]({rel(files['frontier'])})", ""]
    L += [
        "### SoftSAE against TopK at matched L0 (TopK's FVE interpolated at SoftSAE's L0)",
        "",
        "| k | SoftSAE L0 | L0 vs k | train L0 vs k | SoftSAE FVE | TopK FVE at that L0 | difference | compared |",
        "|---|---|---|---|---|---|---|---|",
    ]
    ref = [(main[("topk", k)]["summary"]["mean_l0"], main[("topk", k)]["summary"]["fve"]) for k in ks]
    gaps = []
    for k in ks:
        s = main[("softsae", k)]
        fve, extrapolated = matched_fve(s["summary"]["mean_l0"], *zip(*ref, strict=True))
        both = ok[("softsae", k, seed0)] and ok[("topk", k, seed0)]
        gap = s["summary"]["fve"] - fve
        if both:
            gaps.append(gap)
        L.append(
            f"| {k} | {fixed(s['summary']['mean_l0'], 2)} | {s['summary']['mean_l0'] / k - 1:+.2%} | "
            f"{s['train_sample_l0'] / k - 1:+.2%} | {fixed(s['summary']['fve'], 4)} | "
            f"{fixed(fve, 4)}{' (extrap.)' if extrapolated else ''} | {gap:+.4f} | "
            f"{'yes' if both else 'no: not converged'} |"
        )
    spread = seed_spread(results, ok)
    L += [
        "",
        f"Seed-to-seed spread at k = {scale['sweep_k']} (largest difference of held-out FVE between the converged "
        f"runs of seeds {', '.join(map(str, scale['seeds']))}): "
        + ", ".join(
            f"{LABELS[a]} {fixed(v, 4) if math.isfinite(v) else 'n/a (fewer than two converged seeds)'}"
            for a, v in spread.items()
        )
        + ".",
        "",
    ]
    L += [f"## SoftSAE's k_hat and adaptivity (seed {seed0})", "", f"![k_hat]({rel(files['k_hat'])})", ""]
    L += ["| k | Spearman(k_hat, position) | Spearman(k_hat, token rarity) |", "|---|---|---|"]
    for k in ks:
        a = main[("softsae", k)]["adaptivity"]
        L.append(f"| {k} | {fixed(a['spearman_position'])} | {fixed(a['spearman_rarity'])} |")
    a = main[("softsae", scale["sweep_k"])]["adaptivity"]
    L += [
        "",
        f"Lowest and highest k_hat tokens at k = {scale['sweep_k']} (the token in [[ ]], with the ten before it):",
        "",
        "| k_hat | context |",
        "|---|---|",
    ]
    L += [f"| {v:.1f} | {md_cell(text)} |" for v, text in a["lowest"] + a["highest"]]
    L += ["", f"## SAEBench absorption and splitting at k = {scale['sweep_k']}", "", regime_label(scale), ""]
    if scale["absorption_vocab_size"] is not None:
        L += [
            f"SAEBench's first-letter probe is trained on about {scale['absorption_vocab_size']:,} of the model's "
            "alphabetic tokens (a seeded sample, every letter kept), not all of them: the numbers compare the SAEs "
            "here with one another, not with full-vocabulary SAEBench numbers. This stage took "
            f"{results['stage_seconds']['absorption'] / 60:.1f} min for its {len(absorb)} SAEs (the model stops after "
            "the SAE's block); its prompts grow with the vocabulary, and SmolLM2 has 47,078 alphabetic tokens.",
            "",
        ]
    L += [
        "| architecture | seed | L0 | absorption fraction | split features | converged |",
        "|---|---|---|---|---|---|",
    ]
    for (arch, seed), r in sorted(absorb.items()):
        verdict = "yes" if ok[(arch, scale["sweep_k"], seed)] else "**no**"
        L.append(
            f"| {LABELS[arch]} | {seed} | {fixed(r['l0'], 1)} | {fixed(r['absorption'], 4)} | "
            f"{fixed(r['splitting'], 2)} | {verdict} |"
        )
    L += [
        "",
        f"![absorption]({rel(files['absorption'])})",
        "",
        f"Command: `sae-lens {results['absorption']['command']}`",
        "",
    ]
    runs = results["measures"]["runs"]
    vocab = scale["absorption_vocab_size"]
    probe = "SAEBench's full first-letter vocabulary" if vocab is None else f"the probe on {vocab:,} tokens"
    letters = letters_by_run(results["absorption"].get("per_letter", {}), runs)
    L += [*absorption_context(absorb, letters, probe), ""]
    full = {}
    if scale["full_vocab_check"] is not None:
        full = full_vocab_rows(REPO / scale["full_vocab_check"])
        folder = rel(REPO / scale["full_vocab_check"])
        L += full_vocab_section(full, absorb, scale["absorption_vocab_size"], f"[{folder}]({folder})")
        if full:
            full_letters = letters_by_run(per_letter_absorption(REPO / scale["full_vocab_check"]), runs)
            L += [*absorption_context(full, full_letters, "the full vocabulary"), ""]
    L += ["## What this says about the paper's claims", "", *claims(results, gaps, spread, absorb, ok, full)]
    L += ["", "## Limitations", "", *limitations(results), ""]
    report.write_text("\n".join(L) + "\n")
    (plots / "results.json").write_text(json.dumps(results_json(results), indent=1, default=float) + "\n")


def limitations(results: dict[str, Any]) -> list[str]:
    """What the study does not show, from its settings."""
    scale = results["scale"]
    single = [k for k in scale["ks"] if k != scale["sweep_k"]]
    return [
        "- SAEBench's SCR and TPP ran only on stand-in datasets (eval/results/smollm2-135m-blocks3, a pipeline check), "
        "not on SAEBench's own; this study reports neither.",
        f"- k up to {max(scale['ks'])}; the paper reports k up to {PAPER_ABSORPTION_KS[1]}.",
        f"- One model of {MODEL_PARAMETERS / 1e6:.0f}M parameters (SmolLM2), one layer ({scale['layer']}), one width "
        f"(d_sae {scale['d_sae']:,}), {scale['training_tokens']:,} training tokens per run.",
        "- A constant learning rate after warm-up (no decay), chosen so that convergence can be judged; SAE-Lens' and "
        "the paper's runs decay it, which may move each architecture's final FVE differently."
        if not scale["lr_decay_fraction"]
        else f"- The learning rate decays over the last {scale['lr_decay_fraction']:.0%} of the steps.",
        f"- {len(scale['seeds'])} seeds at k = {scale['sweep_k']}"
        + (f" and one at k {', '.join(map(str, single))}" if single else "")
        + ": seed noise is measured at one k only.",
        f"- One learning-rate grid ({', '.join(f'{lr:g}' for lr in scale['lrs'])}), swept at k = {scale['sweep_k']} "
        "and used for every k.",
    ]


def full_vocab_rows(folder: Path) -> dict[tuple[str, int], dict[str, float]]:
    """(architecture, seed) -> absorption fraction and split features of a committed `sae-lens eval` run on the full
    vocabulary (it names each SAE by its folder, <arch>-k<k>-s<seed>); empty when the folder has no results."""
    if not (folder / "summary.csv").exists():
        return {}
    with (folder / "summary.csv").open() as f:
        return {
            (row["architecture"], int(row["SAE"].rsplit("-s", 1)[1])): {
                "absorption": float(row["mean_absorption_fraction_score"] or "nan"),
                "splitting": float(row["mean_num_split_features"] or "nan"),
            }
            for row in csv.DictReader(f)
        }


def full_vocab_section(
    full: dict[tuple[str, int], dict[str, float]],
    absorb: dict[tuple[str, int], dict[str, float]],
    vocab_size: int,
    link: str,
) -> list[str]:
    """The full-vocabulary check beside the study's reduced-vocabulary numbers for the same SAEs."""
    if not full:
        return [f"The full-vocabulary check ({link}) has not been run.", ""]
    lines = [
        f"### On SAEBench's full first-letter vocabulary ({link}, run outside the study's time budget)",
        "",
        f"| architecture | seed | absorption fraction, full / {vocab_size:,} tokens | "
        f"split features, full / {vocab_size:,} tokens |",
        "|---|---|---|---|",
    ]
    for (arch, seed), r in sorted(full.items()):
        reduced = absorb.get((arch, seed), {})
        lines.append(
            f"| {LABELS[arch]} | {seed} | {fixed(r['absorption'], 4)} / "
            f"{fixed(reduced.get('absorption', math.nan), 4)} | {fixed(r['splitting'], 2)} / "
            f"{fixed(reduced.get('splitting', math.nan), 2)} |"
        )
    ratios = [
        absorb[key]["absorption"] / r["absorption"] for key, r in full.items() if key in absorb and r["absorption"]
    ]
    if ratios:
        lines += [
            "",
            f"For the same SAEs the {vocab_size:,}-token probe reports {min(ratios):.1f} to {max(ratios):.1f} "
            "times the full vocabulary's absorption fraction: read the full-vocabulary numbers as these SAEs' "
            "absorption, and the reduced ones only as the measurement that fits the study's time budget.",
        ]
    return [*lines, ""]


def per_letter_absorption(out: Path) -> dict[str, list[dict[str, Any]]]:
    """Every SAE's per-letter absorption results from SAEBench's JSON files under `out` (its `eval_result_details`:
    one record per first letter), keyed by <seed folder>/<the file's name without SAEBench's suffix>."""
    found = {}
    for path in sorted(out.rglob("absorption_first_letter/*.json")):
        details = json.loads(path.read_text()).get("eval_result_details") or []
        found[f"{path.parent.parent.name}/{path.name.removesuffix('_custom_sae_eval_results.json')}"] = details
    return found


def letters_by_run(
    per_letter: dict[str, list[dict[str, Any]]], runs: dict[str, dict[str, Any]]
) -> dict[tuple[str, int], dict[str, dict[str, float]]]:
    """(architecture, seed) -> letter -> its absorption fraction and probe true positives, each SAE's file matched to
    the run whose name it ends with (the longest: "batchtopk-k32-s42" also ends with "topk-k32-s42")."""
    found = {}
    for key, details in per_letter.items():
        matches = [name for name in runs if key.endswith(name)]
        if not matches:
            continue
        run = runs[max(matches, key=len)]
        found[(run["arch"], run["seed"])] = {
            d["first_letter"]: {"fraction": d["mean_absorption_fraction"], "positives": d["num_probe_true_positives"]}
            for d in details
        }
    return found


def paired_letters(mine: dict[str, dict[str, float]], theirs: dict[str, dict[str, float]]) -> dict[str, Any]:
    """SoftSAE's per-letter absorption against another SAE's on the letters both have: the mean difference and its
    standard error, how many letters each is lower on, the exact two-sided sign test, and the letter with the
    largest difference with the mean left when it is taken out."""
    letters = sorted(set(mine) & set(theirs))
    diff = {letter: mine[letter]["fraction"] - theirs[letter]["fraction"] for letter in letters}
    values = np.array(list(diff.values()))
    lower, higher = int((values < 0).sum()), int((values > 0).sum())
    n, tail = lower + higher, min(lower, higher)
    sign_p = min(1.0, 2 * sum(math.comb(n, i) for i in range(tail + 1)) / 2**n) if n else 1.0
    largest = max(diff, key=lambda letter: abs(diff[letter]))
    rest = np.array([v for letter, v in diff.items() if letter != largest])
    return {
        "letters": len(letters),
        "mean": float(values.mean()),
        "se": float(values.std(ddof=1) / math.sqrt(len(values))) if len(values) > 1 else math.nan,
        "lower": lower,
        "higher": higher,
        "sign_p": sign_p,
        "largest": largest,
        "largest_diff": diff[largest],
        "largest_positives": mine[largest]["positives"],
        "mean_without_largest": float(rest.mean()) if len(rest) else math.nan,
    }


def paired_sentence(pair: dict[str, Any], other: str, where: str) -> str:
    """One sentence of `paired_letters`' numbers, SoftSAE against `other`, measured `where`."""
    se = f" ± {pair['se']:.4f} (SE)" if math.isfinite(pair["se"]) else ""
    return (
        f"- Per letter, {where}: SoftSAE minus {other} {pair['mean']:+.4f}{se} over {pair['letters']} letters; "
        f"SoftSAE lower on {pair['lower']}, higher on {pair['higher']} (sign test p = {pair['sign_p']:.2f}); the "
        f"largest difference is '{pair['largest']}' ({pair['largest_diff']:+.4f}, {pair['largest_positives']} probe "
        f"true positives), without which the mean is {pair['mean_without_largest']:+.4f}."
    )


def absorption_context(
    absorb: dict[tuple[str, int], dict[str, float]],
    letters: dict[tuple[str, int], dict[str, dict[str, float]]],
    where: str,
) -> list[str]:
    """The per-letter paired comparisons of SoftSAE and TopK and the Matryoshka positive control, every number read
    from `absorb` (architecture, seed -> means) and `letters` (per-letter results); `where` names the measurement."""
    lines = []
    for seed in sorted({s for _, s in letters}):
        if ("softsae", seed) in letters and ("topk", seed) in letters:
            pair = paired_letters(letters[("softsae", seed)], letters[("topk", seed)])
            lines.append(paired_sentence(pair, "TopK", f"{where}, seed {seed}"))
    matryoshka = [r["absorption"] for (a, _), r in absorb.items() if a == "matryoshka_batchtopk"]
    topk = [r["absorption"] for (a, _), r in absorb.items() if a == "topk"]
    if matryoshka and topk:
        holds = np.mean(matryoshka) < np.mean(topk)
        lines.append(
            f"- Positive control ({where}): the paper measures Matryoshka with the lowest absorption of these "
            f"architectures; here Matryoshka scores {np.mean(matryoshka):.4f} against TopK's {np.mean(topk):.4f} "
            "(means over seeds): the control " + ("holds." if holds else FAILED_CONTROL)
        )
    return lines


def regime_label(scale: dict[str, Any]) -> str:
    """The label of the whole absorption section: where it stands against SAEBench's recommended regime and the k
    at which the paper makes its claim."""
    k = scale["sweep_k"]
    return (
        f"**Outside SAEBench's recommended regime**: its README does not recommend the absorption metric below "
        f"{SAEBENCH_MIN_PARAMETERS / 1e9:.0f}B parameters or {SAEBENCH_MIN_LATENTS:,} latents; this study has "
        f"{MODEL_PARAMETERS / 1e6:.0f}M parameters and {scale['d_sae']:,} latents, at k = {k}, while the paper makes "
        f"its absorption claim at k {PAPER_ABSORPTION_KS[0]}-{PAPER_ABSORPTION_KS[1]}. Read these numbers as a "
        "comparison of these SAEs with one another, not as a test of the paper's claim."
    )


def seed_spread(results: dict[str, Any], ok: dict[tuple[str, int, int], bool]) -> dict[str, float]:
    """Per architecture, the largest |FVE difference| between its converged seeds at k = sweep_k (nan with fewer
    than two: a run that had not converged would measure its distance from convergence, not seed noise)."""
    k = results["scale"]["sweep_k"]
    fve = {(r["arch"], r["seed"]): r["summary"]["fve"] for r in results["measures"]["runs"].values() if r["k"] == k}
    measured = converged_spread(fve, ok, k)
    return {arch: measured.get(arch, math.nan) for arch in ARCHITECTURES}


def absorption_spread(
    absorb: dict[tuple[str, int], dict[str, float]], ok: dict[tuple[str, int, int], bool], k: int
) -> dict[str, float]:
    """Per architecture with two or more converged seeds at k, the largest difference of its absorption fraction."""
    return converged_spread({key: r["absorption"] for key, r in absorb.items()}, ok, k)


def converged_spread(
    values: dict[tuple[str, int], float], ok: dict[tuple[str, int, int], bool], k: int
) -> dict[str, float]:
    """Per architecture with two or more converged seeds at k, the largest difference of `values` (keyed by
    (architecture, seed)) between those seeds."""
    spread = {}
    for arch in ARCHITECTURES:
        seen = [v for (a, seed), v in values.items() if a == arch and ok.get((arch, k, seed))]
        if len(seen) > 1:
            spread[arch] = max(seen) - min(seen)
    return spread


def claims(
    results: dict[str, Any],
    gaps: Sequence[float],
    spread: dict[str, float],
    absorb: dict[tuple[str, int], dict[str, float]],
    ok: dict[tuple[str, int, int], bool],
    full: dict[tuple[str, int], dict[str, float]],
) -> list[str]:
    """The goals of issue 14, each met, missed or not measurable, with the numbers (`full`: the full-vocabulary
    absorption check, where one was run)."""
    scale = results["scale"]
    seed0, k = scale["seeds"][0], scale["sweep_k"]
    main = _main_runs(results, seed0)
    measured = {a: v for a, v in spread.items() if math.isfinite(v)}
    noise = max(measured.values(), default=math.nan)
    noise_from = ", ".join(LABELS[a] for a in measured)
    lines = []
    n_ok = sum(ok.values())
    lines.append(
        f"- Convergence: {n_ok} of {len(ok)} runs converged by the criterion above"
        + ("." if n_ok == len(ok) else "; the others are left out of every comparison.")
    )
    if gaps and not measured:
        lines.append(
            f"- FVE at matched L0 (the paper's claim: SoftSAE >= TopK): differences "
            f"{', '.join(f'{g:+.4f}' for g in gaps)}, not judged: no architecture has two converged seeds, so the "
            "seed-to-seed spread that a difference must exceed is unmeasured."
        )
    elif gaps:
        verdict = "ahead" if min(gaps) > noise else "behind" if max(gaps) < -noise else "level (within seed noise)"
        lines.append(
            f"- FVE at matched L0 (the paper's claim: SoftSAE >= TopK): differences "
            f"{', '.join(f'{g:+.4f}' for g in gaps)} against a seed-to-seed spread up to {noise:.4f} "
            f"(measured on {noise_from}): "
            f"SoftSAE is {verdict}."
        )
    else:
        lines.append("- FVE at matched L0: not compared (no k where both SoftSAE and TopK converged).")
    l0_misses = {kk: main[("softsae", kk)]["summary"]["mean_l0"] / kk - 1 for kk in scale["ks"]}
    lines.append(
        f"- Mean L0 against k (goal within {L0_GOAL:.0%}): "
        + ", ".join(f"k {kk}: {v:+.2%} ({'met' if abs(v) <= L0_GOAL else '**missed**'})" for kk, v in l0_misses.items())
        + "."
    )
    # Only seeds at which both SoftSAE and TopK converged are compared.
    seeds = [s for s in scale["seeds"] if ok.get(("softsae", k, s)) and ok.get(("topk", k, s))]
    if full:
        lines.append(absorption_claim(full, ok, k, seeds, "SAEBench's full first-letter vocabulary"))
    vocab = scale["absorption_vocab_size"]
    setting = "SAEBench's full first-letter vocabulary" if vocab is None else f"probe on {vocab:,} tokens"
    lines.append(absorption_claim(absorb, ok, k, seeds, setting))
    return lines


def absorption_claim(
    rows: dict[tuple[str, int], dict[str, float]],
    ok: dict[tuple[str, int, int], bool],
    k: int,
    seeds: Sequence[int],
    setting: str,
) -> str:
    """The paper's absorption claim (SoftSAE <= TopK) at the `seeds` where both converged, against the seed spread
    of the architectures with two converged seeds in `rows`."""
    soft = [rows[("softsae", s)]["absorption"] for s in seeds if ("softsae", s) in rows]
    topk = [rows[("topk", s)]["absorption"] for s in seeds if ("topk", s) in rows]
    if not (soft and topk):
        return f"- Absorption at k = {k} ({setting}): not compared (no seed at which both SoftSAE and TopK converged)."
    spread = absorption_spread(rows, ok, k)
    noise = max(spread.values(), default=math.nan)
    within = abs(np.mean(soft) - np.mean(topk)) <= noise
    return (
        f"- Absorption at k = {k}, {setting} (the paper's claim: SoftSAE <= TopK): SoftSAE "
        f"{', '.join(f'{v:.4f}' for v in soft)}, TopK {', '.join(f'{v:.4f}' for v in topk)} (at the seeds where both "
        "converged; seed spread "
        + (
            f"up to {noise:.4f}, measured on {', '.join(LABELS[a] for a in spread)}): "
            if spread
            else "not measured: no architecture has two converged seeds here): "
        )
        + f"{'met' if np.mean(soft) <= np.mean(topk) else '**missed**'}{', within seed noise' if within else ''}."
    )
