#!/usr/bin/env bash
# Reproduce the shipped SmolLM2-135M-Instruct drafters (DSpark + DFlash-style control) on a
# 2-core CPU. Every stage is resumable: rerun the script after an interruption.
# Usage: scripts/train-smollm2-drafters.sh
#
# Four parts of the ShareGPT train split are answered by the target (two at a time, one per
# core). Stage 1 trains both drafters from scratch on parts 1-2; stage 2 continues both on all
# four parts and exports the shipped checkpoints. Same data, steps and schedule for both.
# The shipped run stopped each regeneration early; docs/results/training-smollm2.md has the
# conversation counts and wall times it actually used.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1   # one thread per process; two processes use the two cores
DS=.venv/bin/dspark
C=${DSPARK_CACHE:-$HOME/.cache/dspark}
D=$C/train/smollm2-135m-instruct
CFG=dspark/train/configs
mkdir -p "$D"

$DS data prepare                                    # ShareGPT -> $C/data/sharegpt/{train,dev}.jsonl
LINES=(x 1,900 901,1800 1801,2400 2401,3000)   # part i = these lines of the train split
for i in 1 2 3 4; do sed -n "${LINES[$i]}p" "$C/data/sharegpt/train.jsonl" > "$D/train-part$i.jsonl"; done

# The target answers the prompts itself (its recommended sampling, one fixed system prompt).
regen() { $DS data regenerate --data "$D/train-part$1.jsonl" --out "$D/regen$1.jsonl" --limit 900 \
            --max-new-tokens 192 --max-prompt-tokens 256 --batch 32 --seed "$(((${1} - 1) * 100000))"; }
# Target cache: token ids, loss mask, tapped hidden states, final-normed hidden state.
cache() { $DS data cache --data "$D/regen$1.jsonl" --out "$D/cache-$2" --max-len 512 --shard-size 64; }

regen 1 & regen 2 & wait
cache 1 a & cache 2 b & wait
$DS train --config $CFG/smollm2-135m-dspark.yaml & $DS train --config $CFG/smollm2-135m-dflash.yaml & wait

regen 3 & regen 4 & wait
cache 3 c & cache 4 d & wait
$DS train --config $CFG/smollm2-135m-dspark-stage2.yaml & $DS train --config $CFG/smollm2-135m-dflash-stage2.yaml & wait

CK=dspark/drafter/checkpoints/smollm2-135m-instruct
$DS calibrate --checkpoint $CK/dspark --dataset "$C/data/sharegpt/dev.jsonl" --limit 80 \
    --max-new-tokens 64 --plot docs/img/reliability-smollm2-dspark.png
