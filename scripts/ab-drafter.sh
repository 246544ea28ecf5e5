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
if [ ! -s "$R/dev.jsonl" ]; then  # the held-out set: 96 dev-split prompts answered by the target
  mkdir -p "$R" && head -96 "$C/data/sharegpt/dev.jsonl" > "$R/dev-prompts.jsonl"
  $DS data regenerate --data "$R/dev-prompts.jsonl" --out "$R/dev.jsonl" --dtype bfloat16 --batch 64 \
      --max-new-tokens 256 --max-prompt-tokens 512 --seed 7
fi
for arm in "$@"; do
  $DS train --config "dspark/train/configs/ab/$arm.yaml" > "$C/train/smollm2-135m-instruct/ab-$arm.log" 2>&1 &
done
wait
.venv/bin/python scripts/plot_training.py --ab "$@"
