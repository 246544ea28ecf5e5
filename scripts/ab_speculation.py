"""Interleaved A/B at concurrency 1 on SmolLM2 with the eval prompts: every repetition runs
each variant once, in turn, so machine noise hits all of them alike; prints median tok/s,
the ratio to plain decoding, and tau (tokens per target step) per variant.

A variant is `METHOD[:POLICY][:k=K][:nogate][:T=TEMP]`, e.g. `dspark:fixed:k=3`,
`dspark:confidence:nogate`, `dflash:fixed:k=2:T=1`. Plain decoding (`ar`) always runs.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/ab_speculation.py \\
        --variants dspark:confidence,dspark:confidence:nogate [--reps 3] [--limit 2] [--tokens 32]
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import torch

from dspark.bench.datasets import load_prompts
from dspark.engine.build import build_engine, load_target
from dspark.engine.config import EngineConfig
from dspark.paths import eval_dir
from dspark.spec.sampling import SamplingParams

EVAL = ("gsm8k", "humaneval", "math500", "mbpp", "mt-bench")


def parse_variant(text: str, base: EngineConfig) -> tuple[EngineConfig, float]:
    """'dspark:fixed:k=3:T=1' -> (engine spec, temperature)."""
    method, *opts = text.split(":")
    spec, temperature = base.replace(method=method), 0.0
    for opt in opts:
        if opt in ("fixed", "threshold", "confidence"):
            spec = spec.replace(verify_policy=opt)
        elif opt == "nogate":
            spec = spec.replace(draft_gate=False)
        elif opt.startswith("k="):
            spec = spec.replace(block_size=int(opt[2:]))
        elif opt.startswith("T="):
            temperature = float(opt[2:])
        else:
            raise SystemExit(f"unknown variant option {opt!r} in {text!r}")
    return spec, temperature


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", required=True, help="comma list, see the module docstring")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--limit", type=int, default=2, help="prompts per eval file")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--eval-dir", default=str(eval_dir()))
    args = ap.parse_args()
    prompts = load_prompts([f"{args.eval_dir}/{n}.jsonl" for n in EVAL], args.limit, 0)
    base = EngineConfig(max_batch_size=1)
    target = load_target(base)
    ids = [target.tokenizer.apply_chat_template(p.messages, add_generation_prompt=True) for p in prompts]
    names = ["ar", *[v for v in args.variants.split(",") if v and v != "ar"]]
    variants = {name: parse_variant(name, base) for name in names}
    engines = {name: build_engine(spec, target=target)[1] for name, (spec, _) in variants.items()}
    params = {name: SamplingParams(max_new_tokens=args.tokens, temperature=t, seed=0)
              for name, (_, t) in variants.items()}
    for name, eng in engines.items():  # warm-up, untimed
        eng.generate(ids[:1], dataclasses.replace(params[name], max_new_tokens=8))
    speed: dict[str, list[float]] = {k: [] for k in engines}
    tau: dict[str, list[float]] = {k: [] for k in engines}
    for rep in range(args.reps):
        for name, eng in engines.items():
            t0 = time.perf_counter()
            outs = eng.generate(ids, params[name])
            tokens = sum(len(o.token_ids) for o in outs)
            speed[name].append(tokens / (time.perf_counter() - t0))
            steps = sum(o.num_verify_steps for o in outs)
            tau[name].append((tokens - len(outs)) / max(1, steps))  # the prefill token is not a step
            print(f"rep {rep} {name:<28} {speed[name][-1]:6.2f} tok/s  tau {tau[name][-1]:.2f}", flush=True)
    ar = statistics.median(speed["ar"])
    for name, v in speed.items():
        print(f"{name:<28} median {statistics.median(v):6.2f} tok/s  {statistics.median(v) / ar:.3f}x ar"
              f"  tau {statistics.median(tau[name]):.2f}")
    for name, eng in engines.items():
        gate = getattr(eng, "gate", None)
        if gate is not None:
            print(f"{name}: draft gate {gate.drafted_rounds} drafted rounds, {gate.skipped_rounds} plain, "
                  f"running rate ratio {gate.ratio:.2f}")


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
