#!/usr/bin/env bash
# The held-out set of every SmolLM2-135M-Instruct learning curve: the first 96 dev-split prompts
# answered by the target (73 fit --max-prompt-tokens 512), never trained on. It is committed
# (data/regenerated/smollm2-135m-instruct/dev.jsonl.gz) because sampling it again on another
# machine does not give the same answers: the set rebuilt on a fresh machine measured the same
# weights at held-out tau_tf 1.720 where the lost one had given 1.654, and curves from different
# sets must not be compared. This restores it into the cache the training configs read; without
# the committed file it regenerates one.
set -euo pipefail
cd "$(dirname "$0")/.."
C=${DSPARK_CACHE:-$HOME/.cache/dspark}
R=$C/train/smollm2-135m-instruct/regen
SET=data/regenerated/smollm2-135m-instruct/dev.jsonl.gz
[ -s "$R/dev.jsonl" ] && exit 0
mkdir -p "$R"
if [ -f "$SET" ]; then
  gzip -dc "$SET" > "$R/dev.jsonl.tmp" && mv "$R/dev.jsonl.tmp" "$R/dev.jsonl"
else
  .venv/bin/dspark data prepare >&2
  head -96 "$C/data/sharegpt/dev.jsonl" > "$R/dev-prompts.jsonl"
  .venv/bin/dspark data regenerate --data "$R/dev-prompts.jsonl" --out "$R/dev.jsonl" --dtype bfloat16 \
      --batch 64 --max-new-tokens 256 --max-prompt-tokens 512 --seed 7
fi
