#!/usr/bin/env bash
# Train the shipped SmolLM2-135M-Instruct drafters (DSpark and the DFlash-style control: the
# same data, shape, schedule and steps) on a 2-core CPU, one thread each, side by side.
# Every stage resumes where it stopped; rerun the script after an interruption, on this
# machine or a fresh one (the committed regenerated data and the shipped checkpoints are all
# a fresh machine needs: caches rebuild from them).
#
#   scripts/train-smollm2-drafters.sh                  # stage 2 (continue the shipped weights), calibrate
#   STAGES="1" scripts/train-smollm2-drafters.sh       # the from-scratch stage instead
#
# Stage 1: from scratch on the target's own regenerated answers (data/regenerated/), 32 random
#          anchors from each of 4 conversations a step, warmup then a constant lr. Measured
#          (A/B arm regen-b4, docs/results/drafter-ab.md): held-out tau_tf 1.25-1.26 after
#          60-100k anchors, still below the shipped weights' 1.374, so it is not in the default
#          STAGES and does not export.
# Stage 2: continue the SHIPPED weights (copied into the cache first) on the same data and
#          batch, lr warmed up then a cosine to 0 (A/B arm warm-b4); exports over the shipped
#          checkpoint at the end.
# Data, wall times and curves: docs/results/training-smollm2.md.
set -euo pipefail
cd "$(dirname "$0")/.."
DS=.venv/bin/dspark
C=${DSPARK_CACHE:-$HOME/.cache/dspark}
R=$C/train/smollm2-135m-instruct
CFG=dspark/train/configs
STAGES=${STAGES:-"2"}
CK=dspark/drafter/checkpoints/smollm2-135m-instruct
mkdir -p "$R/shipped"
for m in dspark dflash; do  # stage 2's warm start: the shipped weights as they were when it began
  [ -d "$R/shipped/$m" ] || cp -r "$CK/$m" "$R/shipped/$m"
done
$DS data prepare >&2                                          # ShareGPT train/dev prompts
scripts/heldout-smollm2.sh                                    # the held-out set (committed)
for s in $STAGES; do
  suffix=$([ "$s" = 1 ] && echo "" || echo "-stage$s")
  for m in dspark dflash; do
    $DS train --config "$CFG/smollm2-135m-$m$suffix.yaml" > "$R/train-$m$suffix.log" 2>&1 &
  done
  wait
done
# Calibration, eval-drafter and the bench: scripts/evaluate-smollm2-drafters.sh.
.venv/bin/python scripts/plot_training.py --ab "dspark, continued=continue-dspark-b4" "dflash, continued=continue-dflash-b4" \
    --out docs/img/training-smollm2.png
