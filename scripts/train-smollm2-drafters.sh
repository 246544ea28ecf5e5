#!/usr/bin/env bash
# Reproduce the shipped SmolLM2-135M-Instruct drafters (DSpark + DFlash-style control) on a
# 2-core CPU. Every stage is resumable: rerun the script after an interruption.
# Usage: scripts/train-smollm2-drafters.sh [CONVERSATIONS_PER_HALF]
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-900}
export OMP_NUM_THREADS=1   # one thread per process; two processes use the two cores
DS=.venv/bin/dspark
C=${DSPARK_CACHE:-$HOME/.cache/dspark}
D=$C/train/smollm2-135m-instruct
mkdir -p "$D"

$DS data prepare                                    # ShareGPT -> $C/data/sharegpt/{train,dev}.jsonl
sed -n "1,${N}p" "$C/data/sharegpt/train.jsonl" > "$D/train-part1.jsonl"
sed -n "$((N + 1)),$((2 * N))p" "$C/data/sharegpt/train.jsonl" > "$D/train-part2.jsonl"

# The target answers the prompts itself (its recommended sampling, one fixed system prompt).
regen() { $DS data regenerate --data "$D/train-part$1.jsonl" --out "$D/regen$1.jsonl" --limit "$N" \
            --max-new-tokens 192 --max-prompt-tokens 256 --batch 32 --seed "$2"; }
regen 1 0 & regen 2 100000 & wait

# Target cache: token ids, loss mask, tapped hidden states, final-normed hidden state.
$DS data cache --data "$D/regen1.jsonl" --out "$D/cache-a" --max-len 512 --shard-size 64 &
$DS data cache --data "$D/regen2.jsonl" --out "$D/cache-b" --max-len 512 --shard-size 64 &
wait

# Same data and budget for both; checkpoints resume exactly.
$DS train --config dspark/train/configs/smollm2-135m-dspark.yaml &
$DS train --config dspark/train/configs/smollm2-135m-dflash.yaml &
wait

CK=dspark/drafter/checkpoints/smollm2-135m-instruct
$DS calibrate --checkpoint $CK/dspark --dataset "$C/data/sharegpt/dev.jsonl" --limit 40 \
    --max-new-tokens 96 --plot docs/img/reliability-smollm2-dspark.png
