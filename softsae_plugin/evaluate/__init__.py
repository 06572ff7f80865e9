"""`sae-lens eval`: SAEBench's own absorption, feature-splitting, SCR and TPP evaluations on any SAEs.

SAEBench's `run_eval` functions run unchanged on SAE-Lens SAE objects (SoftSAE included: SAEBench reads the
hook name and layer from `cfg.metadata` itself, and moves the SAE to the model's device and dtype). This
module only supplies what those functions cannot reach offline, and moves what they write:

- the model: built once (a local id such as SmolLM2-135M offline, any other name exactly as SAEBench loads
  it) and handed to every eval where SAEBench calls `HookedTransformer.from_pretrained_no_processing`;
- with `--datasets-dir`, local copies of the SCR/TPP datasets (`datasets.save_to_disk`) where SAEBench calls
  `load_dataset`;
- SAEBench's artifacts (first-letter probes, cached activations, per-SAE intermediate tables), which it
  writes inside its installed package or the working directory, go to `<out>/saebench/<model>/`, so two
  models never share a cached probe;
- the absorption eval's vocabulary, in sorted order rather than the tokenizer's per-process hash order (so a
  seeded run repeats), and with `--absorption-vocab-size` the subset its first-letter probe is trained on.

Each replacement is one name looked up inside one SAEBench module, patched only while that step runs; no
SAEBench file and no metric code changes. Around SAEBench's calls this module also gives every SAE unit-norm
decoder rows (folding them as SAEBench does for its own releases, or warning loudly where that is impossible),
evaluates each SAE from the same random state whatever else shares the command (SAEBench's `run_eval` once per
SAE, reseeded), repeats everything with `--seeds N` and reports the mean and spread, records in every result what
produced it (provenance.py: the datasets read, the probe vocabulary, the settings that depart from SAEBench's
published defaults, the versions), and labels every number from that record wherever it travels: the result
JSON, the table, the plots and the model card.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import softsae_plugin  # noqa: F401  (registers softsae, so SoftSAE checkpoints load)
from softsae_plugin.evaluate.evals import CORE_ID, SAELENS_ID, EvalError
from softsae_plugin.evaluate.options import eval_configs, override_sections, parse_evals, parser
from softsae_plugin.evaluate.results import (
    copy_to_checkpoints,
    datasets_read,
    label_results,
    plot_metrics,
    summary_rows,
    write_summary,
)
from softsae_plugin.evaluate.run import run_evals
from softsae_plugin.evaluate.saes import build_model, load_saes, resolve_model


def main(argv: Sequence[str]) -> None:
    """Entry point of `sae-lens eval` (see `sae-lens eval --help`)."""
    args = parser().parse_args(argv)
    try:
        if args.seeds < 1:
            raise EvalError(f"--seeds {args.seeds}: expected a positive number of seeds")
        evals = parse_evals(args.evals)
        overrides = override_sections(args)
        saes = load_saes(args.sae, args.device)
        model_name = resolve_model(saes, args.model)
        out = args.out.resolve()
        out.mkdir(parents=True, exist_ok=True)
        configs = eval_configs(evals, model_name, overrides, quick=args.quick)
        logits = CORE_ID in configs or SAELENS_ID in configs
        models = {c.llm_dtype: build_model(model_name, saes, c.llm_dtype, args.device, logits=logits)
                  for c in configs.values()}  # fmt: skip
        runs = [out / f"seed-{offset}" for offset in range(args.seeds)]
        for offset, run in enumerate(runs):
            run_evals(
                saes,
                evals,
                model_name,
                run,
                device=args.device,
                overrides=overrides,
                models=models,
                seed_offset=offset,
                datasets_dir=args.datasets_dir.resolve() if args.datasets_dir else None,
                force_rerun=args.force_rerun,
                absorption_vocab_size=args.absorption_vocab_size,
                quick=args.quick,
            )
    except EvalError as err:
        print(f"sae-lens eval: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    # Labels come from each result's own provenance record, so results kept from an earlier run keep theirs.
    for offset, run in enumerate(runs):
        label_results(saes, run, offset)
    rows = summary_rows(saes, evals, runs)
    _, md_path = write_summary(rows, out, model_name=model_name, saes=saes, datasets=datasets_read(saes, runs))
    plot_metrics(rows, out)
    if args.checkpoint_eval:
        copy_to_checkpoints(saes, rows, runs, model_name)
    print(md_path.read_text())
