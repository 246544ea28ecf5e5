#!/usr/bin/env bash
# Drafter A/B on SmolLM2-135M-Instruct: train the given arms (dspark/train/configs/ab/<arm>.yaml)
# side by side, one thread each, then plot their held-out learning curves.
# Usage: scripts/ab-drafter.sh paper direct        (resumable: rerun after an interruption)
set -euo pipefail
cd "$(dirname "$0")/.."
DS=.venv/bin/dspark
C=${DSPARK_CACHE:-$HOME/.cache/dspark}
R=$C/train/smollm2-135m-instruct/regen
$DS data prepare >&2
scripts/heldout-smollm2.sh  # the held-out set every learning curve is measured on
for arm in "$@"; do
  $DS train --config "dspark/train/configs/ab/$arm.yaml" > "$C/train/smollm2-135m-instruct/ab-$arm.log" 2>&1 &
done
wait
.venv/bin/python scripts/plot_training.py --ab "$@"
