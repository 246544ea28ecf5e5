#!/usr/bin/env bash
# Measure the shipped SmolLM2-135M-Instruct drafters and write the reports the README quotes:
# calibration (greedy and sampled rounds on dev prompts), eval-drafter on the eval files
# (tau, per-position acceptance) and the methods bench at T=0 and T=1. Run it on a quiet
# machine: the bench measures wall clock (default settings: --dtype auto, --compile). About
# 45 min on 2 cores, one thread per process (OMP_NUM_THREADS=1).
# Usage: scripts/evaluate-smollm2-drafters.sh [PROMPTS_PER_EVAL_FILE] [BENCH_PROMPTS_PER_FILE]
set -euo pipefail
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
cd "$(dirname "$0")/.."
L=${1:-8}
B=${2:-2}
DS=.venv/bin/dspark
E=dspark/bench/eval
C=${DSPARK_CACHE:-$HOME/.cache/dspark}
DEV=$C/data/sharegpt/dev.jsonl
CK=dspark/drafter/checkpoints/smollm2-135m-instruct
R=docs/results
mkdir -p $R out
$DS data prepare >&2
# Calibration first (dev prompts after the 96 held out during training): eval and bench read it.
tail -n +97 "$DEV" > "$C/data/sharegpt/dev-calibration.jsonl"
$DS calibrate --checkpoint $CK/dspark --dataset "$C/data/sharegpt/dev-calibration.jsonl" --limit 24 \
    --temperatures 0,1 --max-new-tokens 64 --dtype bfloat16 --plot docs/img/reliability-smollm2-dspark.png --json \
    > $R/calibrate-dspark.json
for m in dspark dflash; do
  $DS eval-drafter --checkpoint $CK/$m --dataset $E --limit "$L" --max-new-tokens 128 --temperatures 0,1 \
      --dtype bfloat16 --json > $R/eval-drafter-$m.json
done
# Wall clock at batch 1, every method side by side in one run per temperature.
$DS bench --methods ar,ngram,dspark,hybrid,dflash --dataset $E/*.jsonl --limit "$B" --max-new-tokens 128 \
    --out out/bench-t0
cp out/bench-t0/report.md $R/bench-smollm2-t0.md
$DS bench --methods ar,ngram,dspark,hybrid,dflash --temperature 1.0 --seed 0 --dataset $E/*.jsonl --limit "$B" \
    --max-new-tokens 128 --out out/bench-t1
cp out/bench-t1/report.md $R/bench-smollm2-t1.md
