"""`results.json` -> `report.md` tables and PNG plots."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dspark.jsonutil import dumps


def _fmt(x: object, digits: int = 2) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def _methods(level: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {k: v for k, v in level.items() if isinstance(v, dict) and "overall" in v}


def write_report(results: dict[str, Any], out_dir: Path) -> None:
    lines = [f"# dspark bench: {results['meta']['model']}", "",
             "```", " ".join(results["meta"]["argv"]), "```", ""]
    meta = results["meta"]
    compiled = {True: ", compiled step", False: ", eager step"}.get(meta.get("compiled"), "")
    lines += [f"dtype {meta['dtype']}{compiled}, temperature {meta['temperature']}, max new tokens "
              f"{meta['max_new_tokens']}, block size {meta['block_size']}, {meta['prompts']} prompts, "
              f"machine: {meta['machine']}", ""]
    for method, reason in meta.get("skipped", {}).items():
        lines += [f"- `{method}` skipped: {reason}"]
    if meta.get("skipped"):
        lines += [""]
    levels = results.get("by_concurrency") or {str(results.get("concurrency", 1)): results}
    for level, block in levels.items():
        methods = _methods(block)
        cats = [c for c in next(iter(methods.values())) if c not in ("overall", "concurrency")]
        lines += [f"## Concurrency {level}", "",
                  "| method | tokens/s | per-user tok/s | speedup vs ar | tokens/CPU-s | speedup vs ar (CPU) "
                  "| tau | identical to ar | verify tok/req/step | rejected share |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for name, m in methods.items():
            o = m["overall"]
            lines.append(f"| {name} | {_fmt(o['tokens_per_s'], 1)} | {_fmt(o['per_user_tokens_per_s'], 1)} | "
                         f"{_fmt(o['speedup_vs_ar'])} | {_fmt(o.get('tokens_per_cpu_s'), 1)} | "
                         f"{_fmt(o.get('speedup_vs_ar_cpu'))} | {_fmt(o['mean_accepted_length'])} | "
                         f"{_fmt(o['identical_to_ar'])} | {_fmt(o.get('verify_tokens_per_request_step'))} | "
                         f"{_fmt(o.get('rejected_draft_share'))} |")
        lines += ["", "Speedup vs ar by category, wall clock / CPU time (tau in parentheses):", "",
                  "| method | " + " | ".join(cats) + " |", "|---" * (len(cats) + 1) + "|"]
        for name, m in methods.items():
            cells = [f"{_fmt(m[c]['speedup_vs_ar'])} / {_fmt(m[c].get('speedup_vs_ar_cpu'))} "
                     f"({_fmt(m[c]['mean_accepted_length'])})" for c in cats]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
    if "bandwidth" in results:
        bw = results["bandwidth"]
        lines += ["## Memory-bandwidth roofline (batch 1, ar)", "",
                  f"copy bandwidth {bw['copy_gb_s']:.1f} GB/s, weights read per token "
                  f"{bw['weight_bytes'] / 1e6:.0f} MB -> limit {bw['limit_tokens_per_s']:.1f} tok/s; "
                  f"measured {bw['ar_tokens_per_s']:.1f} tok/s = {100 * bw['fraction_of_limit']:.0f}% of the limit", ""]
    (out_dir / "report.md").write_text("\n".join(lines))
    _plots(levels, out_dir)


def _plots(levels: dict[str, dict[str, Any]], out_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    level, block = next(iter(levels.items()))
    methods = {k: v for k, v in _methods(block).items() if k != "ar"}
    if methods:
        cats = [c for c in next(iter(methods.values())) if c not in ("concurrency",)]
        fig, ax = plt.subplots(figsize=(max(6, 1.4 * len(cats)), 4))
        width = 0.8 / len(methods)
        for i, (name, m) in enumerate(methods.items()):
            ax.bar([x + i * width for x in range(len(cats))], [m[c]["speedup_vs_ar"] or 0 for c in cats],
                   width, label=name)
        ax.axhline(1.0, color="black", lw=0.8)
        ax.set_xticks([x + 0.4 - width / 2 for x in range(len(cats))], cats)
        ax.set_ylabel("speedup vs ar (wall clock)")
        ax.set_title(f"Speedup per category (concurrency {level})")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out_dir / "speedup_per_category.png", dpi=120)
        plt.close(fig)
        fig, ax = plt.subplots(figsize=(6, 4))
        for name, m in methods.items():
            acc = m["overall"]["accepted_per_position"]
            if acc:
                ax.plot(range(1, len(acc) + 1), [a if a is not None else float("nan") for a in acc],
                        marker="o", label=name)
        ax.set_xlabel("draft position")
        ax.set_ylabel("conditional acceptance")
        ax.set_ylim(0, 1)
        ax.set_title("Per-position conditional acceptance")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out_dir / "acceptance_per_position.png", dpi=120)
        plt.close(fig)
    if len(levels) > 1:
        _concurrency_plots(levels, out_dir, plt)


def _concurrency_plots(levels: dict[str, dict[str, Any]], out_dir: Path, plt: Any) -> None:
    names = list(_methods(next(iter(levels.values()))))
    fig, ax = plt.subplots(figsize=(6, 4))
    fig2, ax2 = plt.subplots(figsize=(6, 4))
    for name in names:
        pts = [(int(lv), b[name]["overall"]) for lv, b in levels.items() if name in b]
        ax.plot([p["per_user_tokens_per_s"] for _, p in pts], [p["tokens_per_s"] for _, p in pts],
                marker="o", label=name)
        for lv, p in pts:
            ax.annotate(str(lv), (p["per_user_tokens_per_s"], p["tokens_per_s"]), fontsize=7)
        budget = [(lv, p.get("verify_tokens_per_request_step")) for lv, p in pts]
        if any(b is not None for _, b in budget):
            ax2.plot([lv for lv, _ in budget], [b or 0 for _, b in budget], marker="o", label=name)
    ax.set_xlabel("per-user tokens/s")
    ax.set_ylabel("aggregate tokens/s")
    ax.set_title("Throughput vs per-user speed (labels: concurrency)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / "throughput_vs_per_user.png", dpi=120)
    ax2.set_xscale("log", base=2)
    ax2.set_xlabel("concurrency")
    ax2.set_ylabel("verified tokens per request per step")
    ax2.set_title("Verification budget vs concurrency")
    ax2.legend(fontsize=8)
    fig2.tight_layout()
    fig2.savefig(out_dir / "verify_budget_vs_concurrency.png", dpi=120)
    plt.close(fig)
    plt.close(fig2)


def write_json(results: dict[str, Any], out_dir: Path) -> None:
    (out_dir / "results.json").write_text(dumps(results, indent=2))
