"""Held-out learning curves of drafter runs, against the anchors (blocks) they trained on.

Each run directory holds `eval.jsonl` (dspark/train/trainer.py: teacher-forced held-out
metrics every `eval_every` steps) and, for runs evaluated with real draft + verify rounds,
`tau.jsonl` (scripts/train-smollm2-drafters.sh). Stages of one run (`init_from`) are drawn
as one curve: anchors continue where the previous stage stopped.

    .venv/bin/python scripts/plot_training.py --ab paper direct          # the A/B arms
    .venv/bin/python scripts/plot_training.py --runs dspark dflash       # the shipped runs
    .venv/bin/python scripts/plot_training.py --ab paper "s4=run-dspark" # label=run directory
    .venv/bin/python scripts/plot_training.py --ab "cont=warm-b4+warm-b4-2" # arms chained as stages
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from dspark.paths import cache_dir

ROOT = cache_dir() / "train" / "smollm2-135m-instruct"


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line] if path.is_file() else []


def stages(run: Path) -> list[Path]:
    """The run and its continuation stages: run, run-stage2, run-stage3, ..."""
    out = [run]
    while (nxt := run.with_name(f"{run.name}-stage{len(out) + 1}")).is_dir():
        out.append(nxt)
    return out


def curve(run: Path | list[Path], name: str = "eval.jsonl") -> list[dict]:
    recs, offset = [], 0
    for part in (run if isinstance(run, list) else stages(run)):
        rows = read(part / name)
        for r in rows:
            recs.append({**r, "anchors_seen": r.get("anchors_seen", 0) + offset})
        log = read(part / "log.jsonl")
        offset += log[-1]["anchors_seen"] if log else 0
    return recs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ab", nargs="*", default=None, help="A/B arms under <cache>/train/<model>/ab/")
    ap.add_argument("--runs", nargs="*", default=None, help="runs under <cache>/train/<model>/run-<name>")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if args.ab is not None:  # an arm is a name under ab/, or label=directory under the model's runs
        runs = {}
        for arm in args.ab:
            label, _, path = arm.partition("=")
            if "+" in path:  # stages in other directories: "label=armA+armB" (anchors continue)
                runs[label] = [ROOT / "ab" / part for part in path.split("+")]
            else:
                runs[label] = ROOT / path if path else ROOT / "ab" / arm
        out = args.out or "docs/img/drafter-ab.png"
    else:
        runs = {name: ROOT / f"run-{name}" for name in (args.runs or ["dspark", "dflash"])}
        out = args.out or "docs/img/training-smollm2.png"
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(16, 4.5))
    for i, (name, run) in enumerate(runs.items()):
        color = f"C{i}"
        recs = curve(run)
        if not recs:
            print(f"{name}: no eval.jsonl under {run}")
            continue
        x = [r["anchors_seen"] / 1e3 for r in recs]
        ax1.plot(x, [r["heldout_tau_tf"] for r in recs], "o-", ms=3, color=color, label=name)
        ax2.plot(x, [r["heldout_greedy_per_pos"][0] for r in recs], "o-", ms=3, color=color, label=f"{name} pos 1")
        ax2.plot(x, [r["heldout_greedy_per_pos"][1] for r in recs], "x--", ms=3, color=color, label=f"{name} pos 2")
        ax3.plot(x, [r["heldout_accept_per_pos"][0] for r in recs], "o-", ms=3, color=color, label=name)
        tau = curve(run, "tau.jsonl")
        if tau:
            ax1.plot([r["anchors_seen"] / 1e3 for r in tau], [r["tau"] for r in tau], "s:", ms=5, color=color,
                     label=f"{name}: real rounds, eval prompts")
    ax1.set(xlabel="anchors trained on (thousands)", ylabel="tau (T=0)",
            title="held-out accepted length (greedy, teacher-forced)")
    ax2.set(xlabel="anchors trained on (thousands)", ylabel="P(accepted through k)",
            title="held-out greedy acceptance (solid: pos 1, dashed: through pos 2)", ylim=(0, None))
    ax3.set(xlabel="anchors trained on (thousands)", ylabel="1 - TV(draft, target)  (DFlash has no TV term)",
            title="held-out T=1 acceptance, position 1", ylim=(0, None))
    for ax in (ax1, ax2, ax3):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
