#!/usr/bin/env bash
# Regenerate the SmolLM2-135M-Instruct drafter training data: the target answers the ShareGPT
# train prompts itself (its recommended sampling, the model's own default system prompt), one
# part of 1,000 prompts at a time, code and maths interleaved with chat (dspark data prepare).
# Each finished part is compressed into data/regenerated/ (committed: prompt and response
# token ids, ~1 MB a part), so a fresh machine never regenerates it; training reads the
# committed files directly and recomputes every target feature online.
#
# Usage: scripts/regenerate-smollm2.sh FIRST LAST    (parts FIRST..LAST, 1-based; resumable)
set -euo pipefail
cd "$(dirname "$0")/.."
FIRST=${1:-1}; LAST=${2:-4}
DS=.venv/bin/dspark
C=${DSPARK_CACHE:-$HOME/.cache/dspark}
WORK=$C/train/smollm2-135m-instruct/regen
OUT=data/regenerated/smollm2-135m-instruct
PART_SIZE=1000
mkdir -p "$WORK" "$OUT"
$DS data prepare >&2                               # $C/data/sharegpt/{train,dev}.jsonl
for i in $(seq "$FIRST" "$LAST"); do
  name=$(printf 'part%02d' "$i")
  [ -f "$OUT/$name.jsonl.gz" ] && { echo "$name: already in $OUT" >&2; continue; }
  sed -n "$(((i - 1) * PART_SIZE + 1)),$((i * PART_SIZE))p" "$C/data/sharegpt/train.jsonl" > "$WORK/$name-prompts.jsonl"
  [ -s "$WORK/$name-prompts.jsonl" ] || { echo "$name: no prompts left" >&2; break; }
  $DS data regenerate --data "$WORK/$name-prompts.jsonl" --out "$WORK/$name.jsonl" --dtype bfloat16 \
      --batch 64 --max-new-tokens 256 --max-prompt-tokens 512 --seed $((i * 100000))
  gzip -9 -c "$WORK/$name.jsonl" > "$OUT/$name.jsonl.gz.tmp" && mv "$OUT/$name.jsonl.gz.tmp" "$OUT/$name.jsonl.gz"
done
