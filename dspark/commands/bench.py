"""Benchmark decoding methods side by side on the same prompts (results.json, report.md, plots)."""

from __future__ import annotations

import argparse
import dataclasses
import platform
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from dspark.bench.datasets import Prompt, load_prompts
from dspark.bench.harness import RunResult, run_callable, run_engine, summarize
from dspark.bench.hf_peers import HF_METHODS, make_hf_generate
from dspark.bench.llamacpp_peers import LLAMACPP_METHODS
from dspark.bench.report import write_json, write_report
from dspark.bench.roofline import copy_bandwidth_gb_s, weight_bytes_per_token
from dspark.commands.common import add_model_arguments, add_sampling_arguments, sampling_from_args
from dspark.engine.build import DTYPES, build_engine, load_target
from dspark.engine.config import EngineConfig
from dspark.errors import UserError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--methods", default="ar,ngram",
                   help="comma list; ar always runs (first). Peers: hf-ar, hf-prompt-lookup, hf-assisted "
                        "(transformers), llamacpp-ar, llamacpp-lookup (llama.cpp, scripts/build-peers.sh)")
    p.add_argument("--dataset", nargs="+", required=True, help="JSONL files (turns or messages)")
    p.add_argument("--limit", type=int, default=None, help="prompts per file (the first N)")
    p.add_argument("--concurrency", default="1", help="comma list of in-flight request counts")
    p.add_argument("--out", required=True, help="output directory")
    add_model_arguments(p, method_default=None)
    add_sampling_arguments(p, max_new_tokens=128)
    p.set_defaults(max_batch_size=None)


def _parse_list(s: str) -> list[str]:
    return [x.strip() for x in s.split(",") if x.strip()]


def run(args: argparse.Namespace) -> int:
    params = sampling_from_args(args)
    methods = ["ar"] + [m for m in _parse_list(args.methods) if m != "ar"]
    try:
        levels = sorted({int(c) for c in _parse_list(args.concurrency)})
    except ValueError:
        raise UserError(f"--concurrency must be a comma list of integers, got {args.concurrency!r}") from None
    if not levels or levels[0] < 1:
        raise UserError("--concurrency levels must be >= 1")
    # In bench, --verify-policy takes a comma list: each speculative method runs each policy.
    policies = _parse_list(args.verify_policy) or ["fixed"]
    prompts = load_prompts(args.dataset, args.limit, args.seed)
    if not prompts:
        raise UserError("no prompts in the given datasets")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    one = argparse.Namespace(**{**vars(args), "verify_policy": "fixed", "max_batch_size": levels[-1]})
    base = EngineConfig.from_args(one)  # each run replaces the policy and batch size
    for policy in policies:  # refuse an unknown name before loading anything
        base.replace(verify_policy=policy)
    skipped = _skipped_peers(methods, base)
    methods = [m for m in methods if m not in skipped]
    target = load_target(base)
    encode = _encoder(target)
    encoded = {p.id: encode(p) for p in prompts}
    by_level: dict[str, dict[str, object]] = {}
    bandwidth = None
    for level in levels:
        runs = _run_level(methods, policies, level, base, target, prompts, encoded, params, args)
        ar = runs["ar"]
        block: dict[str, object] = {"concurrency": level}
        for key, run_ in runs.items():
            block[key] = summarize(run_, None if key == "ar" else ar, params.greedy)
        by_level[str(level)] = block
        if level == 1:
            bandwidth = _roofline(target, block["ar"]["overall"]["tokens_per_s"])  # type: ignore[index]
    results: dict[str, object] = {"meta": _meta(args, base, target, prompts, methods, policies)}
    if skipped:
        results["meta"]["skipped"] = skipped  # type: ignore[index]
    if len(levels) == 1:
        results.update(by_level[str(levels[0])])
    else:
        results["by_concurrency"] = by_level
    if bandwidth:
        results["bandwidth"] = bandwidth
    write_json(results, out_dir)
    write_report(results, out_dir)
    print(f"wrote {out_dir / 'results.json'} and {out_dir / 'report.md'}", file=sys.stderr)
    return 0


def _run_level(methods: list[str], policies: list[str], level: int, base: EngineConfig, target: object,
               prompts: list[Prompt], encoded: dict[str, list[int]], params: object,
               args: argparse.Namespace) -> dict[str, RunResult]:
    runs: dict[str, RunResult] = {}
    total = len(prompts) * params.max_new_tokens  # type: ignore[attr-defined]
    for method in methods:
        if method in HF_METHODS or method in LLAMACPP_METHODS:
            if level != 1:
                continue  # the peers decode one prompt at a time here
            gen = _peer_generate(method, base, target, params)
            gen(encoded[prompts[0].id])  # warm-up, untimed: first-touch of the weights, kernel caches
            with tqdm(total=total, desc=f"{method} c={level}", unit="tok", file=sys.stderr) as bar:
                runs[method] = run_callable(method, prompts, lambda p, g=gen: g(encoded[p.id]), bar)
            continue
        for policy in (["fixed"] if method == "ar" else policies):
            key = method if (method == "ar" or policies == ["fixed"]) else f"{method}:{policy}"
            spec = base.replace(method=method, verify_policy=policy, max_batch_size=level)
            _, engine, _ = build_engine(spec, target=target)
            engine.runner.warm_up(engine.taps)  # compile every token bucket before the clock runs
            engine.generate([encoded[prompts[0].id]], dataclasses.replace(params, max_new_tokens=8))  # warm-up
            with tqdm(total=total, desc=f"{key} c={level}", unit="tok", file=sys.stderr) as bar:
                runs[key] = run_engine(key, engine, prompts, lambda p: encoded[p.id], params, level, bar)
    return runs


def _skipped_peers(methods: list[str], spec: EngineConfig) -> dict[str, str]:
    """llama.cpp peers that cannot run here, each with the reason (printed once)."""
    from dspark.bench.llamacpp_peers import source_gguf, unavailable_reason

    wanted = [m for m in methods if m in LLAMACPP_METHODS]
    if not wanted:
        return {}
    reason = unavailable_reason()
    if reason is None and source_gguf(spec.model) is None:
        reason = f"{spec.model} has no GGUF file for llama.cpp to load"
    if reason is None and spec.device not in (None, "cpu"):
        reason = "the llama.cpp peer is built for the CPU"
    if reason is None:
        return {}
    print(f"dspark: skipping {', '.join(wanted)}: {reason}", file=sys.stderr)
    return {m: reason for m in wanted}


def _peer_generate(method: str, spec: EngineConfig, target: object, params: object):  # -> Callable
    """One prompt at a time through transformers or llama.cpp, on the same weights."""
    if method in HF_METHODS:
        return make_hf_generate(method, str(target.path), DTYPES.get(spec.dtype, torch.bfloat16),  # type: ignore[attr-defined]
                                params.max_new_tokens, tuple(target.tokenizer.eos_token_ids),  # type: ignore[attr-defined]
                                spec.block_size, _draft_dir(spec), params.temperature, params.top_p,  # type: ignore[attr-defined]
                                params.top_k, params.seed)  # type: ignore[attr-defined]
    from dspark.bench.llamacpp_peers import converted_gguf, make_llamacpp_generate, source_gguf

    gguf = converted_gguf(source_gguf(spec.model), spec.dtype)  # type: ignore[arg-type]
    return make_llamacpp_generate(method, gguf, params.max_new_tokens, tuple(target.tokenizer.eos_token_ids),  # type: ignore[attr-defined]
                                  spec.block_size, torch.get_num_threads(), spec.max_seq_len,
                                  params.temperature, params.top_p, params.top_k, params.seed)  # type: ignore[attr-defined]


def _draft_dir(spec: EngineConfig) -> str | None:
    if not spec.draft_model:
        return None
    from dspark.models.loader import resolve_model_dir

    return str(resolve_model_dir(spec.draft_model))


def _encoder(target: object):  # -> Callable[[Prompt], list[int]]
    def encode(p: Prompt) -> list[int]:
        return target.tokenizer.apply_chat_template(p.messages, add_generation_prompt=True)  # type: ignore[attr-defined]
    return encode


def _roofline(target: object, ar_tps: float) -> dict[str, float]:
    bw = copy_bandwidth_gb_s()
    nbytes = weight_bytes_per_token(target.model)  # type: ignore[attr-defined]
    limit = bw * 1e9 / nbytes
    return {"copy_gb_s": bw, "weight_bytes": nbytes, "limit_tokens_per_s": limit,
            "ar_tokens_per_s": ar_tps, "fraction_of_limit": ar_tps / limit}


def _meta(args: argparse.Namespace, spec: EngineConfig, target: object, prompts: list[Prompt], methods: list[str],
          policies: list[str]) -> dict[str, object]:
    return {
        "model": target.name, "dtype": spec.dtype, "compiled": spec.compile,  # type: ignore[attr-defined]
        "temperature": args.temperature,
        "top_p": args.top_p, "seed": args.seed, "max_new_tokens": args.max_new_tokens,
        "block_size": args.block_size, "methods": methods, "verify_policies": policies,
        "prompts": len(prompts), "datasets": args.dataset, "limit": args.limit, "argv": sys.argv,
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
        "torch": torch.__version__,
    }
