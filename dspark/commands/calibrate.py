"""Fit the confidence head's per-position temperatures and offsets (STS) on held-out draft rounds."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from dspark.commands.eval_drafter import add_arguments as _eval_arguments
from dspark.jsonutil import dumps


def add_arguments(p: argparse.ArgumentParser) -> None:
    _eval_arguments(p)
    p.set_defaults(temperatures="0,1", limit=50)
    p.add_argument("--plot", default=None, help="reliability diagram PNG "
                   "(default: <checkpoint>/reliability.png)")
    p.add_argument("--dry-run", action="store_true", help="report only; leave the checkpoint unchanged")


def run(args: argparse.Namespace) -> int:
    import torch
    from tqdm import tqdm

    from dspark.commands.eval_drafter import load_for_rounds
    from dspark.drafter.checkpoint import save_calibration
    from dspark.errors import UserError
    from dspark.spec.sampling import SamplingParams
    from dspark.train.calibrate import fit_calibration, reliability_plot, report
    from dspark.train.rounds import run_rounds

    loaded, proposer, _, ids = load_for_rounds(args)
    if not proposer.drafter.cfg.confidence_head:
        raise UserError("this drafter has no confidence head to calibrate")
    K = proposer.max_drafts
    results = {}
    for t in (float(x) for x in args.temperatures.split(",")):
        params = SamplingParams(temperature=t, seed=args.seed, max_new_tokens=args.max_new_tokens)
        with tqdm(total=len(ids), desc=f"dev rounds T={t:g}", file=sys.stderr) as bar:
            stats = run_rounds(loaded.model, proposer, ids, params, K, loaded.eos_token_ids,
                               on_prompt=lambda _: bar.update(1))
        z, n = stats.calibration_data(K)
        if z.shape[0] < 20:
            raise UserError(f"only {z.shape[0]} full rounds at T={t:g}; use more prompts (--limit)")
        temps, offsets = fit_calibration(z, n)
        rows = report(z, n, temps, offsets, references=True)
        regime = "greedy" if params.greedy else "sampled"
        plot_path = Path(args.plot or Path(args.checkpoint) / "reliability.png")
        plot = reliability_plot(plot_path.with_name(f"{plot_path.stem}-{regime}{plot_path.suffix}"), z, n, temps,
                                offsets)
        full = torch.ones(proposer.drafter.cfg.block_size)
        full[:K] = temps
        full_b = torch.zeros(proposer.drafter.cfg.block_size)
        full_b[:K] = offsets
        if not args.dry_run:
            save_calibration(args.checkpoint, full, full_b, greedy=params.greedy)
        results[regime] = {"temperature": t, "rounds": int(z.shape[0]), "temperatures": full.tolist(),
                           "offsets": full_b.tolist(), "plot": str(plot),
                           "positions": [dataclasses.asdict(r) for r in rows]}
        if not args.json:
            for r in rows:
                print(f"{regime} pos {r.position}: T={r.temperature:.3f} b={r.offset:+.2f} ECE {r.ece_before:.4f} -> "
                      f"{r.ece_after:.4f} (held out {r.ece_heldout:.4f}, noise floor {r.ece_floor:.4f}) "
                      f"AUROC {r.auroc:.3f} accept {r.accept_rate:.3f}")
    if not args.dry_run:
        (Path(args.checkpoint) / "calibration.json").write_text(json.dumps(results, indent=2) + "\n")
    if args.json:
        print(dumps(results))
    return 0
