"""Build the Grafana dashboards and the files derived from them.

    python deploy/grafana/build_dashboards.py          # (re)write every generated file
    python deploy/grafana/build_dashboards.py --check  # exit 1 if any is stale

Generated, never edited by hand:
  deploy/grafana/dashboards/dspark-overview.json   the dashboard (plain Grafana JSON)
  deploy/prometheus/dashboard-queries.yml          every panel's PromQL as a recording rule,
                                                   so `promtool check rules` validates it
  helm/dspark/files/dashboards/*.json              chart copies (helm reads only its own dir)
  helm/dspark/files/prometheus-rules.yml           chart copy of deploy/prometheus/rules.yml

Panels query raw metrics rather than recording rules, so the dashboard works against any
Prometheus that scrapes the fleet, with or without our rules loaded.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
DASHBOARD_DIR = REPO / "deploy/grafana/dashboards"
QUERIES_FILE = REPO / "deploy/prometheus/dashboard-queries.yml"
RULES_FILE = REPO / "deploy/prometheus/rules.yml"
CHART_FILES = REPO / "helm/dspark/files"

# Grafana's interval variable; promtool and the live test see a fixed window instead.
RATE_INTERVAL = "$__rate_interval"
PROMQL_RATE_INTERVAL = "5m"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}


@dataclass(frozen=True)
class Query:
    expr: str
    legend: str


@dataclass(frozen=True)
class Panel:
    title: str
    unit: str
    queries: tuple[Query, ...]
    description: str = ""
    stack: bool = False
    no_value: str = ""  # what Grafana shows when the queries return no series


@dataclass
class Row:
    title: str
    panels: list[Panel] = field(default_factory=list)


def rate(metric: str) -> str:
    return f"rate({metric}[{RATE_INTERVAL}])"


def quantiles(metric: str, by: str = "") -> tuple[Query, ...]:
    """p50/p90/p99 of a histogram summed over instances."""
    group = f"{by}, le" if by else "le"
    prefix = f"{{{{{by}}}}} " if by else ""
    return tuple(
        Query(f"histogram_quantile({q}, sum by ({group}) ({rate(metric + '_bucket')}))", f"{prefix}p{p}")
        for q, p in ((0.5, 50), (0.9, 90), (0.99, 99))
    )


def _spec_rows() -> list[Row]:
    accepted = f"sum by (model, method) ({rate('dspark:spec_decode_num_accepted_tokens_total')})"
    drafted = f"sum by (model, method) ({rate('dspark:spec_decode_num_draft_tokens_total')})"
    drafts = f"sum by (model, method) ({rate('dspark:spec_decode_num_drafts_total')})"
    per_pos = (
        f"sum by (model, method, position) ({rate('dspark:spec_decode_num_accepted_tokens_per_pos_total')})"
    )
    verify = "dspark:verify_tokens_per_request_step"
    mean_verify = f"sum({rate(verify + '_sum')}) / (sum({rate(verify + '_count')}) > 0)"
    # `(x > 0)`: no series instead of 0/0 = NaN while nothing is drafted; the panel says so.
    no_drafts = "no drafts"
    return [
        Row("Speculative decoding", [
            Panel("Acceptance rate", "percentunit", (Query(f"{accepted} / ({drafted} > 0)", "{{method}}"),),
                  "Accepted draft tokens / proposed draft tokens.", no_value=no_drafts),
            Panel("Acceptance rate per position", "percentunit",
                  (Query(f"{per_pos} / ignoring (position) group_left () ({drafts} > 0)", "pos {{position}}"),),
                  "P(draft position k accepted) = accepted at k / drafts.", no_value=no_drafts),
            Panel("Mean accepted length", "short", (Query(f"1 + {accepted} / ({drafts} > 0)", "{{method}}"),),
                  "Tokens committed per verify step: 1 + accepted / drafts.", no_value=no_drafts),
            Panel("Verification budget (tokens per request per step)", "short",
                  (Query(mean_verify, "mean"), *quantiles(verify)),
                  "Tokens the target verifies per request per step (confidence scheduler).",
                  no_value="no steps"),
            Panel("Drafter fallback (plain decoding steps/s)", "ops",
                  (Query(f"sum({rate('dspark:spec_decode_fallback_total')})", "fallback steps/s"),),
                  "Steps decoded without a drafter: non-zero means the drafter pool is unavailable."),
        ]),
    ]  # fmt: skip


def _throughput_rows() -> list[Row]:
    generated = f"sum({rate('dspark:generation_tokens_total')})"
    cost = f"max by (pool) (dspark:pool_hourly_cost_dollars) / on () group_left () (3600 * {generated}) * 1e6"
    return [
        Row("Throughput and cost", [
            Panel("Output tokens/s by pool", "short",
                  (Query(f"sum by (pool) ({rate('dspark:generation_tokens_total')})", "{{pool}}"),
                   Query(generated, "total")), stack=False),
            Panel("Prompt tokens/s by pool", "short",
                  (Query(f"sum by (pool) ({rate('dspark:prompt_tokens_total')})", "{{pool}}"),)),
            Panel("Cost per 1M output tokens by pool", "currencyUSD", (Query(cost, "{{pool}}"),),
                  "Pool hourly cost / (3600 * fleet output tokens/s) * 1e6; stacked = fleet total.",
                  stack=True),
            Panel("KV transfer throughput", "Bps",
                  (Query(f"sum({rate('dspark:kv_transfer_bytes_total')})", "bytes/s"),)),
            Panel("KV transfer duration", "s", quantiles("dspark:kv_transfer_seconds")),
        ]),
    ]  # fmt: skip


def _latency_rows() -> list[Row]:
    steps = tuple(
        Query(f"histogram_quantile({q}, sum by (le) ({rate(f'dspark:{name}_latency_seconds_bucket')}))",
              f"{name} p{p}")
        for name in ("prefill", "propose", "verify")
        for q, p in ((0.5, 50), (0.99, 99))
    )  # fmt: skip
    return [
        Row("Latency", [
            Panel("Time to first token", "s", quantiles("dspark:time_to_first_token_seconds")),
            Panel("Inter-token latency", "s", quantiles("dspark:inter_token_latency_seconds")),
            Panel("End-to-end request latency", "s", quantiles("dspark:e2e_request_latency_seconds")),
            Panel("Queue time", "s", quantiles("dspark:request_queue_time_seconds")),
            Panel("Step latency (prefill / propose / verify)", "s", steps),
        ]),
    ]  # fmt: skip


def _health_rows() -> list[Row]:
    return [
        Row("Health", [
            Panel("Errors by code", "reqps",
                  (Query(f"sum by (code) ({rate('dspark:request_errors_total')})", "{{code}}"),)),
            Panel("Finished requests by reason", "reqps",
                  (Query(f"sum by (finish_reason) ({rate('dspark:request_success_total')})",
                         "{{finish_reason}}"),)),
            Panel("Requests running / waiting", "short",
                  (Query("sum(dspark:num_requests_running)", "running"),
                   Query("sum(dspark:num_requests_waiting)", "waiting"))),
            Panel("Healthy replicas by pool", "short",
                  (Query("max by (pool) (dspark:pool_replicas)", "{{pool}}"),)),
            Panel("Scrape targets up", "short",
                  (Query('up{job=~"dspark.*"}', "{{job}} {{instance}}"),)),
        ]),
    ]  # fmt: skip


def overview_rows() -> list[Row]:
    return _spec_rows() + _throughput_rows() + _latency_rows() + _health_rows()


def panel_json(panel: Panel, panel_id: int, x: int, y: int) -> dict:
    targets = [
        {"refId": chr(ord("A") + i), "datasource": DATASOURCE, "expr": q.expr, "legendFormat": q.legend}
        for i, q in enumerate(panel.queries)
    ]
    custom = {"drawStyle": "line", "lineWidth": 1, "fillOpacity": 10, "showPoints": "never",
              "stacking": {"mode": "normal" if panel.stack else "none", "group": "A"}}  # fmt: skip
    return {
        "id": panel_id,
        "type": "timeseries",
        "title": panel.title,
        "description": panel.description,
        "datasource": DATASOURCE,
        "gridPos": {"h": 8, "w": 8, "x": x, "y": y},
        "fieldConfig": {"defaults": {"unit": panel.unit, "custom": custom,
                                     **({"noValue": panel.no_value} if panel.no_value else {})},
                        "overrides": []},
        "options": {
            "legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
            "tooltip": {"mode": "multi", "sort": "none"},
        },
        "targets": targets,
    }


def dashboard_json(uid: str, title: str, rows: list[Row]) -> dict:
    panels, panel_id, y = [], 1, 0
    for row in rows:
        panels.append({"id": panel_id, "type": "row", "title": row.title, "collapsed": False,
                       "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}, "panels": []})  # fmt: skip
        panel_id, y = panel_id + 1, y + 1
        for i, panel in enumerate(row.panels):
            panels.append(panel_json(panel, panel_id, x=(i % 3) * 8, y=y + (i // 3) * 8))
            panel_id += 1
        y += ((len(row.panels) + 2) // 3) * 8
    datasource_var = {"name": "datasource", "label": "Data source", "type": "datasource",
                      "query": "prometheus", "current": {}, "hide": 0, "refresh": 1}  # fmt: skip
    return {
        "uid": uid,
        "title": title,
        "tags": ["dspark"],
        "editable": True,
        "schemaVersion": 39,
        "version": 1,
        "timezone": "browser",
        "refresh": "30s",
        "time": {"from": "now-1h", "to": "now"},
        "annotations": {"list": []},
        "templating": {"list": [datasource_var]},
        "panels": panels,
    }


def dashboards() -> dict[str, dict]:
    """File name -> dashboard JSON object."""
    return {"dspark-overview.json": dashboard_json("dspark-overview", "DSpark overview", overview_rows())}


def render_json(dashboard: dict) -> str:
    return json.dumps(dashboard, indent=2, sort_keys=False) + "\n"


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")


def dashboard_exprs(dashboard: dict) -> list[tuple[str, str]]:
    """(rule name, PromQL with a fixed rate window) for every panel target of a dashboard."""
    exprs = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            name = f"dashboard:{_slug(dashboard['uid'])}:{_slug(panel['title'])}:{target['refId'].lower()}"
            exprs.append((name, target["expr"].replace(RATE_INTERVAL, PROMQL_RATE_INTERVAL)))
    return exprs


def render_queries_file(dashboard_texts: dict[str, str]) -> str:
    """A Prometheus rules file holding each dashboard's queries, read back from its JSON text."""
    groups = []
    for file_name, text in sorted(dashboard_texts.items()):
        dashboard = json.loads(text)
        rules = [{"record": name, "expr": expr} for name, expr in dashboard_exprs(dashboard)]
        groups.append({"name": f"dashboard-{Path(file_name).stem}", "rules": rules})
    header = (
        "# GENERATED by deploy/grafana/build_dashboards.py from deploy/grafana/dashboards/*.json.\n"
        "# Not loaded by Prometheus: it exists so `promtool check rules` validates dashboard PromQL.\n"
    )
    return header + yaml.safe_dump({"groups": groups}, sort_keys=False, width=1000)


def generated_files() -> dict[Path, str]:
    """Every generated path -> its expected content."""
    texts = {name: render_json(d) for name, d in dashboards().items()}
    files: dict[Path, str] = {}
    for name, text in texts.items():
        files[DASHBOARD_DIR / name] = text
        files[CHART_FILES / "dashboards" / name] = text
    files[QUERIES_FILE] = render_queries_file(texts)
    files[CHART_FILES / "prometheus-rules.yml"] = RULES_FILE.read_text()
    return files


def stale_files() -> list[Path]:
    return [p for p, text in generated_files().items() if not p.exists() or p.read_text() != text]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--check", action="store_true", help="fail if a generated file is stale")
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_files()
        for path in stale:
            print(f"stale: {path.relative_to(REPO)} (run python deploy/grafana/build_dashboards.py)",
                  file=sys.stderr)  # fmt: skip
        return 1 if stale else 0
    for path, text in generated_files().items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        print(f"wrote {path.relative_to(REPO)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
