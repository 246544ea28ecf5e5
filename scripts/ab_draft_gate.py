"""Interleaved A/B at concurrency 1 of plain decoding, `confidence` with the draft gate and
`confidence` without it (SmolLM2 + shipped DSpark drafter, greedy): rounds alternate
between variants so machine noise hits all of them alike; prints medians and ratios.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/ab_draft_gate.py [--reps 3] [--limit 2] [--tokens 32]
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import torch

from dspark.bench.datasets import load_prompts
from dspark.commands.common import EngineSpec, build_engine, load_target
from dspark.paths import shared_eval_dir
from dspark.spec.sampling import SamplingParams

EVAL = ("gsm8k", "humaneval", "math500", "mbpp", "mt-bench")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--limit", type=int, default=2, help="prompts per eval file")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--eval-dir", default=str(shared_eval_dir()))
    args = ap.parse_args()
    prompts = load_prompts([f"{args.eval_dir}/{n}.jsonl" for n in EVAL], args.limit, 0)
    base = EngineSpec(max_batch_size=1)
    target = load_target(base)
    ids = [target.tokenizer.apply_chat_template(p.messages, add_generation_prompt=True) for p in prompts]
    params = SamplingParams(max_new_tokens=args.tokens)
    variants = {
        "ar": dataclasses.replace(base, method="ar"),
        "confidence": dataclasses.replace(base, method="dspark", verify_policy="confidence"),
        "confidence, no gate": dataclasses.replace(base, method="dspark", verify_policy="confidence",
                                                   draft_gate=False),
    }
    engines = {k: build_engine(v, target=target)[1] for k, v in variants.items()}
    for eng in engines.values():  # warm-up, untimed
        eng.generate(ids[:1], dataclasses.replace(params, max_new_tokens=8))
    speed: dict[str, list[float]] = {k: [] for k in engines}
    for rep in range(args.reps):
        for k, eng in engines.items():
            t0 = time.perf_counter()
            outs = eng.generate(ids, params)
            speed[k].append(sum(len(o.token_ids) for o in outs) / (time.perf_counter() - t0))
            print(f"rep {rep} {k:<20} {speed[k][-1]:6.2f} tok/s", flush=True)
    ar = statistics.median(speed["ar"])
    for k, v in speed.items():
        print(f"{k:<20} median {statistics.median(v):6.2f} tok/s  {statistics.median(v) / ar:.3f}x ar")
    gate = engines["confidence"].gate
    if gate is not None:
        print(f"draft gate: {gate.drafted_rounds} drafted rounds, {gate.skipped_rounds} plain, "
              f"running rate ratio {gate.ratio:.2f}")


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
