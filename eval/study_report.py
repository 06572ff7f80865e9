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


def converged(points: list[dict[str, float]], final: dict[str, Any]) -> tuple[bool, float]:
    """The convergence verdict and the held-out FVE move over the last 10% of the tokens."""
    if len(points) < 2:
        return False, math.inf
    # The checkpoint nearest 90% of the tokens (SAE-Lens saves it on the first step past the threshold).
    at_90 = min(points[:-1], key=lambda p: abs(p["tokens"] - 0.9 * points[-1]["tokens"]))
    move = abs(points[-1]["fve"] - at_90["fve"])
    return final["dead_fraction"] < CONVERGED_DEAD and move < CONVERGED_FVE_MOVE, move


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
    ok = {key: curves[n]["converged"] for key, n in names.items()}
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
        f"# SoftSAE against SAE-Lens' baselines at a scale where they converge (`eval/study.py --scale "
        f"{results['scale_name']}`)",
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
        "of every run, where convergence is judged, is at a steady rate in a steady phase. Wall time of all stages: "
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
        "Held-out FVE after the sweep's tokens; each architecture trains at the rate that scored best. "
        + (
            f"At the grid's edge: {', '.join(edge)} (the best rate may lie beyond it)."
            if edge
            else "Every pick lies inside the grid, so each optimum is bracketed."
        )
        + f" A sweep of {scale['sweep_tokens'] / scale['training_tokens']:.0%} of the training tokens favours fast "
        "rates: its pick is, if anything, higher than the best rate for the full run.",
    ]
    L += [
        "",
        "## Convergence",
        "",
        f"A run converged when its dead fraction (SAE-Lens': no firing within the last {scale['dead_window_steps']} "
        f"steps) is below {CONVERGED_DEAD:.0%} and its held-out FVE moved by less than {CONVERGED_FVE_MOVE} over "
        "the last 10% of its tokens.",
        "",
        f"![training curves]({rel(files['curves'])})",
        "",
        "| run | converged | FVE move, last 10% | dead fraction |",
        "|---|---|---|---|",
    ]
    for name, run in curves.items():
        L.append(
            f"| {name} | {'yes' if run['converged'] else '**no**'} | {fixed(run['fve_move_last_10pct'], 4)} | "
            f"{fixed(run['final_dead_fraction'])} |"
        )
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
    L += ["", f"## SAEBench absorption and splitting at k = {scale['sweep_k']}", ""]
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
    full = {}
    if scale["full_vocab_check"] is not None:
        full = full_vocab_rows(REPO / scale["full_vocab_check"])
        folder = rel(REPO / scale["full_vocab_check"])
        L += full_vocab_section(full, absorb, scale["absorption_vocab_size"], f"[{folder}]({folder})")
    L += ["## What this says about the paper's claims", "", *claims(results, gaps, spread, absorb, ok, full)]
    report.write_text("\n".join(L) + "\n")
    (plots / "results.json").write_text(json.dumps(results_json(results), indent=1, default=float) + "\n")


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
    noise = max(measured.values(), default=0.0)
    noise_from = ", ".join(LABELS[a] for a in measured) or "no architecture: none has two converged seeds"
    lines = []
    n_ok = sum(ok.values())
    lines.append(
        f"- Convergence: {n_ok} of {len(ok)} runs converged by the criterion above"
        + ("." if n_ok == len(ok) else "; the others are left out of every comparison.")
    )
    if gaps:
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
