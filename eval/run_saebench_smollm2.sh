#!/usr/bin/env bash
# The committed SAEBench run (eval/results/smollm2-135m-blocks3/), offline on 2 CPU cores (about an hour):
# SoftSAE, TopK, BatchTopK and Matryoshka BatchTopK at k = 16 and 32 on SmolLM2-135M layer 3, trained with
# `sae-lens train` from configs/smollm2-eval-*.yaml, then every SAEBench eval through `sae-lens eval`.
# SCR/TPP run on the templated stand-in datasets of eval/make_pipeline_check_datasets.py: a pipeline check.
# core runs with --quick (1/40 of SAEBench's published batches, labelled): SAEBench's own plots need its L0.
# Every eval runs with SEEDS seeds (default 2; each SAE alone from each seed); the table reports mean and standard
# deviation. A seed's run is the same whether it runs alone or beside the others.
#   bash eval/run_saebench_smollm2.sh [WORK_DIR]    (default runs/saebench-smollm2; trained SAEs are reused)
#   SEEDS=3 RESUME=1 bash eval/run_saebench_smollm2.sh   (keep the results already in WORK_DIR/eval, add seed 2)
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
WORK=${1:-runs/saebench-smollm2}
RESULTS=eval/results/smollm2-135m-blocks3
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1

saes=()
for k in 16 32; do
  for arch in softsae topk batchtopk matryoshka; do
    out=$WORK/saes/$arch-k$k
    [ -f "$out/cfg.json" ] || $BIN/sae-lens train --config configs/smollm2-eval-$arch.yaml --k $k --output_path "$out"
    saes+=(--sae "$out")
  done
done
[ -d "$WORK/datasets" ] || $BIN/python eval/make_pipeline_check_datasets.py --out "$WORK/datasets"
# The first-letter probe on 3,000 of the ~47,000 alphabetic tokens and k-sparse probing up to k = 5: the full
# SAEBench settings take several hours on 2 CPU cores.
$BIN/sae-lens eval --evals absorption,splitting,scr,tpp,core --quick "${saes[@]}" --out "$WORK/eval" \
  --seeds "${SEEDS:-2}" --datasets-dir "$WORK/datasets" --eval-config eval/pipeline_check_eval_config.yaml \
  --absorption-vocab-size 3000 --set absorption.max_k_value=5 --no-checkpoint-eval \
  $([ "${RESUME:-0}" = 1 ] && echo --no-force-rerun)

# Commit SAEBench's JSON outputs (per seed), the table, the plots and each SAE's training summary (not the weights).
rm -rf "$RESULTS"/{absorption_first_letter,scr,tpp,core,seed-*,training_summaries} "$RESULTS"/*.png "$RESULTS"/summary.*
mkdir -p "$RESULTS/training_summaries"
for seed in "$WORK/eval"/seed-*/; do
  mkdir -p "$RESULTS/$(basename "$seed")"
  cp -r "$seed"/{absorption_first_letter,scr,tpp,core} "$RESULTS/$(basename "$seed")/"
done
cp "$WORK/eval"/summary.{md,csv} "$WORK/eval"/*.png "$RESULTS/"
for sae in "$WORK"/saes/*/; do cp "$sae/training_summary.json" "$RESULTS/training_summaries/$(basename "$sae").json"; done
