"""(Re)measure the target's SPS(B) table used by the confidence scheduler and plot it."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from dspark.commands.common import EngineSpec, add_model_arguments, load_target


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    p.add_argument("--refresh", action="store_true", help="re-measure even if a cached profile exists")
    p.add_argument("--plot", default=None, help="write a PNG of SPS(B) and tokens/s(B) here")
    p.add_argument("--json", action="store_true")


def run(args: argparse.Namespace) -> int:
    from dspark.engine.profile import load_or_profile, profile_path

    spec = EngineSpec.from_args(args)
    target = load_target(spec)
    prof = load_or_profile(target, spec.dtype, spec.max_batch_size, spec.block_size, refresh=args.refresh)
    points = dict(zip(prof.batch_tokens, prof.steps_per_second))
    if args.plot:
        _plot(points, Path(args.plot), f"{target.name} ({spec.dtype})")
    if args.json:
        print(json.dumps({"model": target.name, "dtype": spec.dtype, "path": str(profile_path(target.name, spec.dtype)),
                          "sps": points}))
    else:
        for b, sps in points.items():
            print(f"B={b:4d}  {sps:7.2f} steps/s  {b * sps:8.1f} tokens/s", file=sys.stderr)
    return 0


def _plot(points: dict[int, float], out: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bs = list(points)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(bs, [points[b] for b in bs], marker="o", label="steps/s")
    ax2 = ax.twinx()
    ax2.plot(bs, [b * points[b] for b in bs], marker="s", color="tab:orange", label="tokens/s")
    ax.set_xlabel("verification batch (tokens)")
    ax.set_ylabel("steps/s")
    ax2.set_ylabel("tokens/s")
    ax.set_title(f"SPS(B): {title}")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
