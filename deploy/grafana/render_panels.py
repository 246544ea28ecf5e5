"""Render dashboard panels to one PNG from real Prometheus query results (no Grafana needed).

    python deploy/grafana/render_panels.py --prometheus http://127.0.0.1:9090 \\
        --minutes 5 --out docs/img/dashboard.png            # the main panels
    python deploy/grafana/render_panels.py ... --all        # every panel of the dashboard

Reads the dashboard JSON (titles, units, legends, stacking come from it), runs each panel's
PromQL as a `query_range` over the last `--minutes` (or `--start`/`--end`, Unix seconds),
with Grafana's `$__rate_interval` replaced by `--rate-interval`, and draws a grid of
panels with matplotlib. Series that stay at zero are hidden when a panel also has non-zero
ones (errors by code export every code at 0), and the legend says how many were hidden.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import re
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
DASHBOARD = REPO / "deploy/grafana/dashboards/dspark-overview.json"
RATE_INTERVAL = "$__rate_interval"
MAIN_PANELS = (
    "Acceptance rate",
    "Acceptance rate per position",
    "Mean accepted length",
    "Verification budget (tokens per request per step)",
    "Output tokens/s by pool",
    "Cost per 1M output tokens by pool",
    "KV transfer throughput",
    "Time to first token",
    "Inter-token latency",
    "End-to-end request latency",
    "Errors by code",
    "Requests running / waiting",
)
COLUMNS = 3
LEGEND = re.compile(r"\{\{\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*\}\}")


@dataclass
class Series:
    label: str
    times: list[float]
    values: list[float]

    @property
    def all_zero(self) -> bool:
        return all(v == 0 or math.isnan(v) for v in self.values)


# -- Prometheus ---------------------------------------------------------------------------

def query_range(base_url: str, expr: str, start: float, end: float, step: float) -> list[dict[str, Any]]:
    params = urllib.parse.urlencode({"query": expr, "start": f"{start:.3f}", "end": f"{end:.3f}",
                                     "step": f"{step:g}"})
    try:
        with urllib.request.urlopen(f"{base_url.rstrip('/')}/api/v1/query_range?{params}", timeout=30) as r:
            body = json.load(r)
    except urllib.error.HTTPError as err:  # 400/422 carry the PromQL error as JSON
        body = json.loads(err.read() or b"{}")
    if body.get("status") != "success":
        raise RuntimeError(f"query_range {expr!r}: {body.get('errorType')}: {body.get('error')}")
    return body["data"]["result"]


def legend(fmt: str, labels: dict[str, str]) -> str:
    if not fmt:
        return "{" + ", ".join(f"{k}={v}" for k, v in sorted(labels.items())) + "}"
    return LEGEND.sub(lambda m: labels.get(m.group(1), ""), fmt).strip()


def panel_series(base_url: str, panel: dict[str, Any], start: float, end: float, step: float,
                 rate_interval: str) -> list[Series]:
    series = []
    for target in panel.get("targets", []):
        expr = target["expr"].replace(RATE_INTERVAL, rate_interval)
        for result in query_range(base_url, expr, start, end, step):
            times = [float(t) for t, _ in result["values"]]
            values = [float(v) for _, v in result["values"]]  # "NaN" -> nan: a gap
            series.append(Series(legend(target.get("legendFormat", ""), result["metric"]), times, values))
    return series


# -- units (Grafana unit ids used by the dashboards) --------------------------------------

def _scaled(value: float, steps: list[tuple[float, str]]) -> str:
    """`value` in the largest unit it reaches; below the smallest, in the smallest."""
    for factor, suffix in steps:
        if abs(value) >= factor:
            return f"{value / factor:.3g}{suffix}"
    factor, suffix = steps[-1]
    return f"{value / factor:.3g}{suffix}"


def format_value(unit: str, value: float) -> str:
    if value == 0:
        return "0"
    if unit == "percentunit":
        return f"{value * 100:.3g}%"
    if unit == "s":
        return _scaled(value, [(1.0, " s"), (1e-3, " ms"), (1e-6, " µs")])
    if unit == "Bps":
        return _scaled(value, [(2**30, " GiB/s"), (2**20, " MiB/s"), (2**10, " KiB/s"), (1, " B/s")])
    if unit == "currencyUSD":
        return f"${value:.3g}" if abs(value) < 1000 else f"${value:,.0f}"
    if unit == "reqps":
        return f"{value:.3g} req/s"
    if unit == "ops":
        return f"{value:.3g} ops/s"
    return _scaled(value, [(1e9, "G"), (1e6, "M"), (1e3, "k"), (1.0, "")])


# -- drawing ------------------------------------------------------------------------------

def panels_of(dashboard: dict[str, Any], titles: tuple[str, ...] | None) -> list[dict[str, Any]]:
    panels = [p for p in dashboard["panels"] if p.get("type") == "timeseries"]
    if titles is None:
        return panels
    by_title = {p["title"]: p for p in panels}
    missing = [t for t in titles if t not in by_title]
    if missing:
        raise SystemExit(f"no such panel in {dashboard.get('title')!r}: {missing}")
    return [by_title[t] for t in titles]


def draw(panels: list[tuple[dict[str, Any], list[Series]]], title: str, out: Path,
         start: float, end: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.dates as mdates
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    rows = math.ceil(len(panels) / COLUMNS)
    fig, axes = plt.subplots(rows, COLUMNS, figsize=(6.2 * COLUMNS, 3.6 * rows), squeeze=False)
    fig.patch.set_facecolor("#111217")
    span = dt.datetime.fromtimestamp(start).strftime("%Y-%m-%d %H:%M:%S") + " - " + \
        dt.datetime.fromtimestamp(end).strftime("%H:%M:%S")
    fig.suptitle(f"{title}   ({span}, live Prometheus query_range)", color="#d8d9da", fontsize=14)
    for ax, (panel, series) in zip(axes.flat, panels, strict=False):
        unit = panel.get("fieldConfig", {}).get("defaults", {}).get("unit", "short")
        stacked = panel.get("fieldConfig", {}).get("defaults", {}).get("custom", {}) \
            .get("stacking", {}).get("mode") == "normal"
        ax.set_facecolor("#181b1f")
        for spine in ax.spines.values():
            spine.set_color("#33363d")
        ax.tick_params(colors="#a0a3a8", labelsize=8)
        ax.grid(True, color="#2b2e35", linewidth=0.6)
        ax.set_title(panel["title"], color="#d8d9da", fontsize=10.5, loc="left")
        shown = [s for s in series if not s.all_zero] or series
        hidden = len(series) - len(shown)
        if not shown:
            ax.text(0.5, 0.5, "No data", color="#a0a3a8", ha="center", va="center", transform=ax.transAxes)
        else:
            shown.sort(key=lambda s: s.label)
            to_dt = lambda ts: [dt.datetime.fromtimestamp(t) for t in ts]  # noqa: E731
            if stacked and len(shown) > 1 and all(s.times == shown[0].times for s in shown):
                ax.stackplot(to_dt(shown[0].times), *[[0 if math.isnan(v) else v for v in s.values]
                                                       for s in shown],
                             labels=[s.label for s in shown], alpha=0.7)
            else:
                for s in shown:
                    ax.plot(to_dt(s.times), s.values, linewidth=1.4, label=s.label)
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _pos, u=unit: format_value(u, v)))
            ax.xaxis.set_major_formatter(mdates.DateFormatter("%H:%M:%S"))
            ax.xaxis.set_major_locator(mdates.AutoDateLocator(maxticks=5))
            ax.set_xlim(dt.datetime.fromtimestamp(start), dt.datetime.fromtimestamp(end))
            ax.set_ylim(bottom=0)
            handles, labels = ax.get_legend_handles_labels()
            if hidden:
                handles.append(plt.Line2D([], [], linestyle="none"))
                labels.append(f"(+{hidden} all-zero hidden)")
            ax.legend(handles, labels, fontsize=7.5, loc="upper left", ncol=min(4, max(1, len(labels) // 3)),
                      facecolor="#181b1f", edgecolor="#33363d", labelcolor="#d8d9da", framealpha=0.8)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90, facecolor=fig.get_facecolor())
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prometheus", default="http://127.0.0.1:9090", help="Prometheus base URL")
    parser.add_argument("--dashboard", type=Path, default=DASHBOARD, help="Grafana dashboard JSON")
    parser.add_argument("--minutes", type=float, default=5.0, help="range ending now (default 5)")
    parser.add_argument("--start", type=float, help="range start, Unix seconds (overrides --minutes)")
    parser.add_argument("--end", type=float, help="range end, Unix seconds (default now)")
    parser.add_argument("--step", type=float, default=0.0, help="seconds between points (default range/120)")
    parser.add_argument("--rate-interval", default="1m",
                        help="replaces $__rate_interval (Grafana: max(4 x scrape, step + scrape))")
    parser.add_argument("--all", action="store_true", help="every panel, not only the main ones")
    parser.add_argument("--panel", action="append", help="a panel title to render (repeatable)")
    parser.add_argument("--out", type=Path, default=REPO / "docs/img/dashboard.png")
    args = parser.parse_args(argv)

    end = args.end if args.end is not None else time.time()
    start = args.start if args.start is not None else end - 60 * args.minutes
    if start >= end:
        parser.error("start must be before end")
    step = args.step or max(1.0, (end - start) / 120)
    dashboard = json.loads(args.dashboard.read_text())
    titles = None if args.all else tuple(args.panel or MAIN_PANELS)
    rendered, empty = [], []
    for panel in panels_of(dashboard, titles):
        series = panel_series(args.prometheus, panel, start, end, step, args.rate_interval)
        if not series:
            empty.append(panel["title"])
        rendered.append((panel, series))
    draw(rendered, dashboard.get("title", "dashboard"), args.out, start, end)
    print(f"wrote {args.out} ({len(rendered)} panels, {end - start:.0f}s, step {step:g}s)", file=sys.stderr)
    if empty:
        print(f"no data: {empty}", file=sys.stderr)
    return 1 if empty else 0


if __name__ == "__main__":
    sys.exit(main())
