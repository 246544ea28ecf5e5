#!/usr/bin/env bash
# Measure the shipped SmolLM2-135M-Instruct drafters and write the reports the README quotes:
# calibration, eval-drafter (eval files and the dev split), and the methods bench at T=0/T=1.
# Two jobs at a time, one thread each (a 2-core machine). About 50 minutes here.
# Usage: scripts/evaluate-smollm2-drafters.sh [PROMPTS_PER_EVAL_FILE]
set -euo pipefail
cd "$(dirname "$0")/.."
L=${1:-4}
export OMP_NUM_THREADS=1
DS=.venv/bin/dspark
E=dspark/bench/eval
DEV=${DSPARK_CACHE:-$HOME/.cache/dspark}/data/sharegpt/dev.jsonl
CK=dspark/drafter/checkpoints/smollm2-135m-instruct
R=docs/results
mkdir -p $R out

# Calibration first: the eval and the bench read the calibrated checkpoint.
$DS calibrate --checkpoint $CK/dspark --dataset "$DEV" --limit 80 --max-new-tokens 64 \
    --plot docs/img/reliability-smollm2-dspark.png --json > $R/calibrate-dspark.json &
$DS eval-drafter --checkpoint $CK/dflash --dataset $E --limit "$L" --max-new-tokens 64 --json \
    > $R/eval-drafter-dflash.json &
wait
$DS eval-drafter --checkpoint $CK/dspark --dataset $E --limit "$L" --max-new-tokens 64 --json \
    > $R/eval-drafter-dspark.json &
$DS eval-drafter --checkpoint $CK/dspark --dataset "$DEV" --limit 20 --max-new-tokens 64 --temperatures 0 \
    --json > $R/eval-drafter-dspark-dev.json &
wait
$DS eval-drafter --checkpoint $CK/dflash --dataset "$DEV" --limit 20 --max-new-tokens 64 --temperatures 0 \
    --json > $R/eval-drafter-dflash-dev.json
.venv/bin/python scripts/plot_training.py

# Wall clock at batch 1: one bench per temperature, every method side by side.
$DS bench --methods ar,ngram,dspark,dflash,hf-ar,hf-prompt-lookup --dataset $E/*.jsonl --limit 2 \
    --max-new-tokens 64 --out out/bench-t0
cp out/bench-t0/report.md $R/bench-smollm2-t0.md
$DS bench --methods ar,ngram,dspark,dflash --verify-policy fixed,confidence --temperature 1.0 \
    --dataset $E/*.jsonl --limit 2 --max-new-tokens 64 --out out/bench-t1
cp out/bench-t1/report.md $R/bench-smollm2-t1.md
