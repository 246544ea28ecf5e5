"""(Re)measure the target's SPS(B) table used by the confidence scheduler and plot it."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from dspark.commands.common import add_model_arguments
from dspark.engine.build import load_target
from dspark.engine.config import EngineConfig


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    p.add_argument("--refresh", action="store_true", help="re-measure even if a cached profile exists")
    p.add_argument("--plot", default=None, help="write a PNG of SPS(B) and tokens/s(B) here")
    p.add_argument("--plot-with", nargs="*", default=[],
                   help="earlier `--json` outputs to draw in the same plot (e.g. eager next to compiled)")
    p.add_argument("--json", action="store_true")


def run(args: argparse.Namespace) -> int:
    from dspark.engine.profile import load_or_profile, profile_path

    spec = EngineConfig.from_args(args)
    target = load_target(spec)
    prof = load_or_profile(target, spec.dtype, spec.max_batch_size, spec.block_size, refresh=args.refresh)
    points = dict(zip(prof.batch_tokens, prof.steps_per_second))
    compiled = target.model.compiled is not None  # False when no C++ compiler was found
    mode = "compiled" if compiled else "eager"
    label = f"{spec.dtype}, {mode}, {torch.get_num_threads()} threads"
    if args.plot:
        series = {label: points}
        for path in args.plot_with:
            other = json.loads(Path(path).read_text())
            series[f"{other['dtype']}, {'compiled' if other['compiled'] else 'eager'}, {other['threads']} threads"] = {
                int(b): v for b, v in other["sps"].items()}
        _plot(series, Path(args.plot), target.name)
    if args.json:
        print(json.dumps({"model": target.name, "dtype": spec.dtype, "compiled": compiled,
                          "threads": torch.get_num_threads(),
                          "compile_s": target.model.compiled.compile_s if compiled else {},
                          "path": str(profile_path(target.name, spec.dtype, compiled)), "sps": points}))
    else:
        for b, sps in points.items():
            print(f"B={b:4d}  {sps:7.2f} steps/s  {b * sps:8.1f} tokens/s", file=sys.stderr)
    return 0


def _plot(series: dict[str, dict[int, float]], out: Path, title: str) -> None:
    """SPS(B) (left) and tokens/s = B * SPS(B) (right), one line per profile."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for label, points in series.items():
        bs = sorted(points)
        ax.plot(bs, [points[b] for b in bs], marker="o", label=label)
        ax2.plot(bs, [b * points[b] for b in bs], marker="s", label=label)
    ax.set_xscale("log", base=2)
    ax2.set_xscale("log", base=2)
    ax.set_xlabel("verification batch B (tokens)")
    ax2.set_xlabel("verification batch B (tokens)")
    ax.set_ylabel("steps/s, SPS(B)")
    ax2.set_ylabel("tokens/s, B x SPS(B)")
    ax.legend(fontsize=8)
    fig.suptitle(f"SPS(B): {title}")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
