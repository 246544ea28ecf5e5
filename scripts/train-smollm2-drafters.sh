#!/usr/bin/env bash
# Train the shipped SmolLM2-135M-Instruct drafters (DSpark and the DFlash-style control: the
# same data, shape, schedule and steps) on a 2-core CPU, one thread each, side by side.
# Every stage resumes where it stopped; rerun the script after an interruption, on this
# machine or a fresh one (the committed regenerated data and the shipped checkpoints are all
# a fresh machine needs: caches rebuild from them).
#
#   scripts/train-smollm2-drafters.sh                  # all stages, then export + calibrate + eval
#   STAGES="1" scripts/train-smollm2-drafters.sh       # only some stages
#
# Stage 1: ShareGPT answers teacher-forced through the target (labels = the target's argmax),
#          warmup then constant lr; this is where most anchors are seen.
# Stage 2: warm start from stage 1 on ShareGPT + the target's own regenerated answers
#          (data/regenerated/, scripts/regenerate-smollm2.sh), then the lr decays to 0.
# Data, wall times and curves: docs/results/training-smollm2.md.
set -euo pipefail
cd "$(dirname "$0")/.."
DS=.venv/bin/dspark
C=${DSPARK_CACHE:-$HOME/.cache/dspark}
R=$C/train/smollm2-135m-instruct
CFG=dspark/train/configs
STAGES=${STAGES:-"1 2"}
$DS data prepare >&2                                          # ShareGPT train/dev prompts
if [ ! -s "$R/regen/dev.jsonl" ]; then                        # the held-out set (96 dev prompts)
  mkdir -p "$R/regen" && head -96 "$C/data/sharegpt/dev.jsonl" > "$R/regen/dev-prompts.jsonl"
  $DS data regenerate --data "$R/regen/dev-prompts.jsonl" --out "$R/regen/dev.jsonl" --dtype bfloat16 \
      --batch 64 --max-new-tokens 256 --max-prompt-tokens 512 --seed 7
fi
for s in $STAGES; do
  suffix=$([ "$s" = 1 ] && echo "" || echo "-stage$s")
  for m in dspark dflash; do
    $DS train --config "$CFG/smollm2-135m-$m$suffix.yaml" > "$R/train-$m$suffix.log" 2>&1 &
  done
  wait
done
CK=dspark/drafter/checkpoints/smollm2-135m-instruct
$DS calibrate --checkpoint $CK/dspark --dataset "$C/data/sharegpt/dev.jsonl" --limit 80 --temperatures 0,1 \
    --max-new-tokens 64 --dtype bfloat16 --plot docs/img/reliability-smollm2-dspark.png
.venv/bin/python scripts/plot_training.py --runs dspark dflash
