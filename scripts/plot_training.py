"""Learning curves of the SmolLM2 drafters from their training logs (stage 1, then stage 2).

Left: DSpark's estimated T=1 acceptance per block position (1 - TV to the target, on the
training batches); right: the CE term of DSpark and of the DFlash-style control. x = sequences
seen; a dotted line marks where stage 2 (more data, warm start) begins.

    .venv/bin/python scripts/plot_training.py [--out docs/img/training-smollm2.png]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from dspark.paths import cache_dir

RUNS = cache_dir() / "train" / "smollm2-135m-instruct"
SEQS_PER_STEP = 4  # batch_size x grad_accum in the shipped configs


def read_stages(method: str) -> tuple[list[dict], int]:
    """Log records of stage 1 then stage 2 (steps renumbered), and stage 2's first step."""
    records, boundary = [], 0
    for run in (f"run-{method}", f"run-{method}-stage2"):
        log = RUNS / run / "log.jsonl"
        if not log.is_file():
            continue
        boundary = len(records)
        records += [json.loads(line) for line in log.read_text().splitlines() if line]
    return records, boundary


def smooth(values: list[float], window: int = 25) -> list[float]:
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v - (values[i - window] if i >= window else 0.0)
        out.append(acc / min(i + 1, window))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="docs/img/training-smollm2.png")
    args = ap.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dspark, b_dspark = read_stages("dspark")
    dflash, _ = read_stages("dflash")
    if not dspark:
        raise SystemExit(f"no training logs under {RUNS}")
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    x = [i * SEQS_PER_STEP for i in range(1, len(dspark) + 1)]
    for pos in (0, 1, 3, 6):
        ax1.plot(x, smooth([r["accept_per_pos"][pos] for r in dspark]), label=f"position {pos + 1}")
    ax1.set(xlabel="sequences seen", ylabel="est. acceptance (T=1, training batches)",
            title="DSpark: acceptance per block position", ylim=(0, None))
    for name, recs in (("DSpark", dspark), ("DFlash-style", dflash)):
        if recs:
            xs = [i * SEQS_PER_STEP for i in range(1, len(recs) + 1)]
            ax2.plot(xs, smooth([r["loss_ce"] for r in recs]), label=name)
    ax2.set(xlabel="sequences seen", ylabel="CE (position-weighted)", title="cross-entropy term",
            yscale="log")
    for ax in (ax1, ax2):
        if b_dspark:
            ax.axvline(b_dspark * SEQS_PER_STEP, color="grey", ls=":", lw=1)
            ax.text(b_dspark * SEQS_PER_STEP, ax.get_ylim()[1], " stage 2", va="top", fontsize=8,
                    color="grey")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
