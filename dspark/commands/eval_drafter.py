"""Measure a drafter with real draft + verify rounds: tau at T=0 and T=1, per-position acceptance."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from dspark.engine.build import DTYPES, default_device
from dspark.jsonutil import dumps


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="drafter checkpoint directory")
    p.add_argument("--dataset", nargs="+", required=True, help="prompt JSONL files or directories")
    p.add_argument("--limit", type=int, default=20, help="prompts per file")
    p.add_argument("--model", default=None, help="target (default: the checkpoint's)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--device", default=None)
    p.add_argument("--block-size", type=int, default=None, help="drafts per round (default: the drafter's K)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperatures", default="0,1", help="comma-separated sampling temperatures")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="one JSON object on stdout")


def load_for_rounds(args: argparse.Namespace):  # -> (LoadedModel, DrafterProposer, prompt ids)
    from dspark.bench.datasets import load_prompts
    from dspark.drafter.checkpoint import load_drafter
    from dspark.drafter.config import DrafterConfig
    from dspark.drafter.proposer import DrafterProposer
    from dspark.models.loader import load_model

    dcfg = DrafterConfig.load(args.checkpoint)
    loaded = load_model(args.model or dcfg.target, DTYPES[args.dtype], args.device or default_device())
    drafter = load_drafter(args.checkpoint, loaded.model)
    method = "dspark" if dcfg.markov_rank > 0 or dcfg.confidence_head else "dflash"
    proposer = DrafterProposer(drafter, method, args.block_size)
    prompts = load_prompts(args.dataset, args.limit)
    ids = [loaded.tokenizer.apply_chat_template(p.messages, add_generation_prompt=True) for p in prompts]
    return loaded, proposer, prompts, ids


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from dspark.spec.sampling import SamplingParams
    from dspark.train.rounds import run_rounds

    loaded, proposer, prompts, ids = load_for_rounds(args)
    K = proposer.max_drafts
    result: dict[str, Any] = {"checkpoint": args.checkpoint, "model": loaded.name, "block_size": K,
                              "num_prompts": len(ids), "results": {}}
    for temp in [float(t) for t in args.temperatures.split(",")]:
        params = SamplingParams(temperature=temp, seed=args.seed, max_new_tokens=args.max_new_tokens)
        by_cat: dict[str, list[int]] = {}
        for i, p in enumerate(prompts):
            by_cat.setdefault(p.category, []).append(i)
        rows, all_rounds = {}, []
        with tqdm(total=len(ids), desc=f"eval T={temp:g}", file=sys.stderr) as bar:
            for cat, idx in by_cat.items():
                stats = run_rounds(loaded.model, proposer, [ids[i] for i in idx], params, K,
                                   loaded.eos_token_ids, on_prompt=lambda _: bar.update(1))
                rows[cat] = {"tau": round(stats.tau, 4), "rounds": len(stats.rounds)}
                all_rounds += stats.rounds
        from dspark.train.rounds import RoundStats

        total = RoundStats(all_rounds)
        result["results"][f"T={temp:g}"] = {
            "tau": round(total.tau, 4), "rounds": len(all_rounds), "by_dataset": rows,
            "conditional_acceptance": [round(a, 4) for a in total.conditional_acceptance(K)]}
    if args.json:
        print(dumps(result))
    else:
        for name, r in result["results"].items():
            acc = " ".join(f"{a:.2f}" for a in r["conditional_acceptance"])
            cats = ", ".join(f"{c} {v['tau']:.2f}" for c, v in r["by_dataset"].items())
            print(f"{name}: tau {r['tau']:.3f} over {r['rounds']} rounds | per-position {acc} | {cats}")
    return 0
