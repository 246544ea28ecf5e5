"""The VALUE of every recording rule, dashboard query and alert (deploy/prometheus/rules.yml
and dashboard-queries.yml), checked by `promtool test rules` on synthetic series whose
rates are known: a rule that divides by the wrong counter, sums the wrong labels, drops a
factor or compares with the wrong threshold gets a different number, which a check that
the expression "returns data" would never notice.

Each expected value is computed here from the synthetic rates, by what the rule is meant
to show (the comments), in the order PromQL evaluates it, so floating point gives the
same double: promtool compares samples exactly. Every record in the two files must have an
expectation here; a new rule fails this test until it gets one.
"""

from __future__ import annotations

import math
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
RULE_FILES = [REPO / "deploy/prometheus/rules.yml", REPO / "deploy/prometheus/dashboard-queries.yml"]
MINUTES = 20  # samples every minute from 0 to 20m
EVAL = "15m"  # every 5m window is full by then, and every alert's `for` has elapsed
M = {"model": "m"}
SPEC = {"model": "m", "method": "dspark"}
POOLS = ("drafter", "prefill", "target")
# Gauges per pool.
HOURLY_COST = {"prefill": 0.5, "target": 2.0, "drafter": 0.25}
REPLICAS = {"prefill": 1, "target": 2, "drafter": 1}


def labels(**kw: Any) -> str:
    return "{" + ",".join(f'{k}="{v}"' for k, v in sorted(kw.items())) + "}"


class Fleet:
    """Synthetic series: counters growing at constant per-second rates, constant gauges,
    cumulative histogram buckets growing at constant rates."""

    def __init__(self) -> None:
        self.series: list[dict[str, str]] = []

    def counter(self, name: str, per_s: float, **kw: Any) -> None:
        self.series.append({"series": f"{name}{labels(**kw)}", "values": f"0+{per_s * 60!r}x{MINUTES}"})

    def gauge(self, name: str, value: float, **kw: Any) -> None:
        self.series.append({"series": f"{name}{labels(**kw)}", "values": f"{value!r}x{MINUTES}"})

    def histogram(self, name: str, buckets: dict[str, float], **kw: Any) -> None:
        """`buckets`: le -> cumulative observations per second (the last le is +Inf)."""
        for le, per_s in buckets.items():
            self.counter(f"{name}_bucket", per_s, le=le, **kw)


def quantile(q: float, buckets: dict[str, float]) -> float:
    """Prometheus' histogram_quantile (promql/quantile.go, bucketQuantile) on per-second
    bucket rates: linear interpolation inside the bucket that holds rank q * total."""
    bounds = [(float(le), n) for le, n in buckets.items()]  # ascending, last is +Inf
    rank = q * bounds[-1][1]
    b = next(i for i, (_, n) in enumerate(bounds[:-1] + [(math.inf, math.inf)]) if n >= rank)
    if b == len(bounds) - 1:
        return bounds[-2][0]
    start, end, count = 0.0, bounds[b][0], bounds[b][1]
    if b > 0:
        start = bounds[b - 1][0]
        count -= bounds[b - 1][1]
        rank -= bounds[b - 1][1]
    return start + (end - start) * (rank / count)


# -- a busy, healthy fleet ---------------------------------------------------------------------
DRAFTS, DRAFT_TOKENS, ACCEPTED = 1.0, 5.0, 2.0  # per second
PER_POSITION = {"0": 0.75, "1": 0.625, "2": 0.375, "3": 0.25}  # accepted per second, sums to ACCEPTED
FALLBACK = 0.125
VERIFY_SUM, VERIFY_COUNT = 6.0, 1.0
VERIFY_BUCKETS = {"1": 0.0, "2": 0.125, "4": 0.5, "8": 0.875, "+Inf": 1.0}
TTFT = {"0.1": 0.25, "0.5": 0.5, "1": 0.875, "10": 1.0, "+Inf": 1.0}  # p99 ~9.3 s: DSparkTTFTHigh fires
ITL = {"0.01": 0.5, "0.05": 0.75, "0.25": 1.0, "+Inf": 1.0}
E2E = {"1": 0.25, "2": 0.75, "8": 1.0, "+Inf": 1.0}
QUEUE = {"0.01": 0.875, "0.1": 0.9375, "1": 1.0, "+Inf": 1.0}
PREFILL = {"0.05": 0.5, "0.1": 0.9375, "0.5": 1.0, "+Inf": 1.0}
PROPOSE = {"0.005": 0.25, "0.01": 0.75, "0.05": 1.0, "+Inf": 1.0}
VERIFY_S = {"0.02": 0.5, "0.05": 0.875, "0.2": 1.0, "+Inf": 1.0}
KV_S = {"0.001": 0.5, "0.005": 1.0, "+Inf": 1.0}
KV_BYTES = 131072.0
ERRORS = {"UNAVAILABLE": 0.125, "INVALID_ARGUMENT": 0.0625}  # one server-side, one client-side code
SUCCESS = {"stop": 0.75, "length": 0.25}
GENERATED = {"drafter": 0.0, "prefill": 1.0, "target": 9.0}
PROMPT_TOKENS = {"drafter": 0.0, "prefill": 32.0, "target": 0.0}
RUNNING, WAITING = 3.0, 2.0
SERVER_SIDE = ("INTERNAL", "UNAVAILABLE", "DEADLINE_EXCEEDED", "UNKNOWN", "DATA_LOSS", "UNIMPLEMENTED")
UP = {"job": "dspark-router", "instance": "127.0.0.1:9400"}
LATENCY_HISTOGRAMS = {"dspark:time_to_first_token_seconds": TTFT, "dspark:inter_token_latency_seconds": ITL,
                      "dspark:e2e_request_latency_seconds": E2E, "dspark:request_queue_time_seconds": QUEUE,
                      "dspark:prefill_latency_seconds": PREFILL, "dspark:kv_transfer_seconds": KV_S}


def busy_fleet() -> Fleet:
    f = Fleet()
    f.counter("dspark:spec_decode_num_drafts_total", DRAFTS, **SPEC)
    f.counter("dspark:spec_decode_num_draft_tokens_total", DRAFT_TOKENS, **SPEC)
    f.counter("dspark:spec_decode_num_accepted_tokens_total", ACCEPTED, **SPEC)
    for position, per_s in PER_POSITION.items():
        f.counter("dspark:spec_decode_num_accepted_tokens_per_pos_total", per_s, position=position, **SPEC)
    f.counter("dspark:spec_decode_fallback_total", FALLBACK, **SPEC)
    f.counter("dspark:verify_tokens_per_request_step_sum", VERIFY_SUM, **SPEC)
    f.counter("dspark:verify_tokens_per_request_step_count", VERIFY_COUNT, **SPEC)
    f.histogram("dspark:verify_tokens_per_request_step", VERIFY_BUCKETS, **SPEC)
    f.histogram("dspark:propose_latency_seconds", PROPOSE, **SPEC)
    f.histogram("dspark:verify_latency_seconds", VERIFY_S, **SPEC)
    for name, buckets in LATENCY_HISTOGRAMS.items():
        f.histogram(name, buckets, **M)
    f.counter("dspark:kv_transfer_bytes_total", KV_BYTES, **M)
    for code, per_s in ERRORS.items():
        f.counter("dspark:request_errors_total", per_s, code=code, **M)
    for reason, per_s in SUCCESS.items():
        f.counter("dspark:request_success_total", per_s, finish_reason=reason, **M)
    for pool in POOLS:
        f.counter("dspark:generation_tokens_total", GENERATED[pool], pool=pool)
        f.counter("dspark:prompt_tokens_total", PROMPT_TOKENS[pool], pool=pool)
        f.gauge("dspark:pool_hourly_cost_dollars", HOURLY_COST[pool], pool=pool)
        f.gauge("dspark:pool_replicas", REPLICAS[pool], pool=pool)
    f.gauge("dspark:num_requests_running", RUNNING, **M)
    f.gauge("dspark:num_requests_waiting", WAITING, **M)
    f.gauge("up", 1, **UP)
    return f


def busy_expectations() -> dict[str, list[tuple[dict[str, str], float]]]:
    """record -> [(labels, value)] for the busy fleet."""
    acceptance = ACCEPTED / DRAFT_TOKENS  # accepted draft tokens per proposed draft token
    per_position = [({**SPEC, "position": p}, a / DRAFTS) for p, a in PER_POSITION.items()]
    mean_length = 1 + ACCEPTED / DRAFTS  # tokens per verification: accepted drafts + the target's own
    generated = sum(GENERATED[p] for p in POOLS)  # fleet output tokens per second
    cost = [({"pool": p}, HOURLY_COST[p] / (3600 * generated) * 1e6) for p in POOLS]
    server_errors = sum(v for c, v in ERRORS.items() if c in SERVER_SIDE)
    finished = sum(ERRORS.values()) + sum(SUCCESS.values())
    d = "dashboard:dspark_overview:"
    exp: dict[str, list[tuple[dict[str, str], float]]] = {
        "dspark:spec_decode_acceptance_rate:rate5m": [(SPEC, acceptance)],
        "dspark:spec_decode_acceptance_rate_per_pos:rate5m": per_position,
        "dspark:spec_decode_mean_accepted_length:rate5m": [(SPEC, mean_length)],
        "dspark:verify_tokens_per_request_step:mean5m": [(SPEC, VERIFY_SUM / VERIFY_COUNT)],
        "dspark:spec_decode_fallback:rate5m": [(SPEC, FALLBACK)],
        "dspark:generation_tokens:rate5m": [({"pool": p}, GENERATED[p]) for p in POOLS],
        "dspark:prompt_tokens:rate5m": [({"pool": p}, PROMPT_TOKENS[p]) for p in POOLS],
        "dspark:cost_per_million_output_tokens_dollars:rate5m": cost,
        "dspark:kv_transfer_bytes:rate5m": [(M, KV_BYTES)],
        "dspark:request_errors:ratio_rate5m": [(M, server_errors / finished)],
        "dspark:time_to_first_token_seconds:p50_5m": [(M, quantile(0.5, TTFT))],
        "dspark:time_to_first_token_seconds:p99_5m": [(M, quantile(0.99, TTFT))],
        "dspark:inter_token_latency_seconds:p50_5m": [(M, quantile(0.5, ITL))],
        "dspark:inter_token_latency_seconds:p99_5m": [(M, quantile(0.99, ITL))],
        d + "acceptance_rate:a": [(SPEC, acceptance)],
        d + "acceptance_rate_per_position:a": per_position,
        d + "mean_accepted_length:a": [(SPEC, mean_length)],
        d + "verification_budget_tokens_per_request_per_step:a": [({}, VERIFY_SUM / VERIFY_COUNT)],
        d + "drafter_fallback_plain_decoding_steps_s:a": [({}, FALLBACK)],
        d + "output_tokens_s_by_pool:a": [({"pool": p}, GENERATED[p]) for p in POOLS],
        d + "output_tokens_s_by_pool:b": [({}, generated)],
        d + "prompt_tokens_s_by_pool:a": [({"pool": p}, PROMPT_TOKENS[p]) for p in POOLS],
        d + "cost_per_1m_output_tokens_by_pool:a": cost,
        d + "kv_transfer_throughput:a": [({}, KV_BYTES)],
        d + "errors_by_code:a": [({"code": c}, v) for c, v in ERRORS.items()],
        d + "finished_requests_by_reason:a": [({"finish_reason": r}, v) for r, v in SUCCESS.items()],
        d + "requests_running_waiting:a": [({}, RUNNING)],
        d + "requests_running_waiting:b": [({}, WAITING)],
        d + "healthy_replicas_by_pool:a": [({"pool": p}, float(REPLICAS[p])) for p in POOLS],
        d + "scrape_targets_up:a": [(UP, 1.0)],
    }
    quantiles = {  # dashboard panel -> (histogram, quantiles in panel order)
        "verification_budget_tokens_per_request_per_step": [(VERIFY_BUCKETS, q) for q in (0.5, 0.9, 0.99)],
        "kv_transfer_duration": [(KV_S, q) for q in (0.5, 0.9, 0.99)],
        "time_to_first_token": [(TTFT, q) for q in (0.5, 0.9, 0.99)],
        "inter_token_latency": [(ITL, q) for q in (0.5, 0.9, 0.99)],
        "end_to_end_request_latency": [(E2E, q) for q in (0.5, 0.9, 0.99)],
        "queue_time": [(QUEUE, q) for q in (0.5, 0.9, 0.99)],
        "step_latency_prefill_propose_verify": [(PREFILL, 0.5), (PREFILL, 0.99), (PROPOSE, 0.5), (PROPOSE, 0.99),
                                                (VERIFY_S, 0.5), (VERIFY_S, 0.99)],
    }
    for panel, items in quantiles.items():
        first = 1 if panel == "verification_budget_tokens_per_request_per_step" else 0  # :a is the mean
        for i, (buckets, q) in enumerate(items):
            exp[f"{d}{panel}:{'abcdefg'[first + i]}"] = [({}, quantile(q, buckets))]
    return exp


def busy_alerts() -> list[dict[str, Any]]:
    """Alerts firing at EVAL on the busy fleet (the others must stay quiet): its server
    error ratio is above 5%, it falls back to plain decoding, its TTFT p99 is above 5 s."""
    server_errors = sum(v for c, v in ERRORS.items() if c in SERVER_SIDE)
    ratio = server_errors / (sum(ERRORS.values()) + sum(SUCCESS.values()))
    return [
        {"alertname": "DSparkHighErrorRate", "exp_alerts": [{
            "exp_labels": {**M, "severity": "page"},
            "exp_annotations": {"summary": "More than 5% of requests to m fail on the server side",
                                "description": f"Server error ratio is {100 * ratio:.4g}% over 5m "
                                               "(client errors excluded)."}}]},
        {"alertname": "DSparkAcceptanceCollapse", "exp_alerts": []},  # 0.4 >= 0.2
        {"alertname": "DSparkDrafterFallback", "exp_alerts": [{
            "exp_labels": {**SPEC, "severity": "warn"},
            "exp_annotations": {"summary": "Decoding without drafter (m)",
                                "description": f"{FALLBACK * 1000:.4g}m steps/s fall back to plain decoding: "
                                               "drafter pool unavailable."}}]},
        {"alertname": "DSparkScrapeTargetDown", "exp_alerts": []},
        {"alertname": "DSparkPoolNoReplicas", "exp_alerts": []},
        {"alertname": "DSparkTTFTHigh", "exp_alerts": [{
            "exp_labels": {**M, "severity": "warn"},
            "exp_annotations": {"summary": "TTFT p99 of m above 5s",
                                "description": f"TTFT p99 is {quantile(0.99, TTFT):.4g}s."}}]},
    ]


# -- a broken fleet: acceptance collapsed, a scrape target down, a pool without replicas ------
COLLAPSED_ACCEPTED = 0.125  # of DRAFT_TOKENS: 2.5% acceptance


def broken_fleet() -> Fleet:
    f = Fleet()
    f.counter("dspark:spec_decode_num_drafts_total", DRAFTS, **SPEC)
    f.counter("dspark:spec_decode_num_draft_tokens_total", DRAFT_TOKENS, **SPEC)
    f.counter("dspark:spec_decode_num_accepted_tokens_total", COLLAPSED_ACCEPTED, **SPEC)
    f.counter("dspark:spec_decode_fallback_total", 0.0, **SPEC)
    f.counter("dspark:request_errors_total", 0.0, code="UNAVAILABLE", **M)
    f.counter("dspark:request_success_total", 1.0, finish_reason="stop", **M)
    f.histogram("dspark:time_to_first_token_seconds", {"0.1": 1.0, "+Inf": 1.0}, **M)
    for pool in POOLS:
        f.gauge("dspark:pool_replicas", 0 if pool == "drafter" else 1, pool=pool)
    f.gauge("up", 0, **UP)
    return f


def broken_alerts() -> list[dict[str, Any]]:
    acceptance = COLLAPSED_ACCEPTED / DRAFT_TOKENS
    return [
        {"alertname": "DSparkHighErrorRate", "exp_alerts": []},
        {"alertname": "DSparkAcceptanceCollapse", "exp_alerts": [{
            "exp_labels": {**SPEC, "severity": "warn"},
            "exp_annotations": {"summary": "Draft acceptance of dspark on m collapsed",
                                "description": f"Acceptance rate {100 * acceptance:.4g}%: drafter and target may "
                                               "be mismatched."}}]},
        {"alertname": "DSparkDrafterFallback", "exp_alerts": []},
        {"alertname": "DSparkScrapeTargetDown", "exp_alerts": [{
            "exp_labels": {**UP, "severity": "page"},
            "exp_annotations": {"summary": "dspark-router target 127.0.0.1:9400 is down"}}]},
        {"alertname": "DSparkPoolNoReplicas", "exp_alerts": [{
            "exp_labels": {"pool": "drafter", "severity": "page"},
            "exp_annotations": {"summary": "Pool drafter has no healthy replica"}}]},
        {"alertname": "DSparkTTFTHigh", "exp_alerts": []},
    ]


# -- the promtool run --------------------------------------------------------------------------

def rule_names(kind: str) -> set[str]:
    return {r[kind] for path in RULE_FILES for g in yaml.safe_load(path.read_text())["groups"]
            for r in g["rules"] if kind in r}


# promtool compares samples exactly, and rate() is exact only up to a rounding step or two
# (0.875 comes out as 0.8750000000000001). Both sides are rounded to a multiple of 2^-30
# (~1e-9) the way PromQL's round() does it: far finer than any mistake in a rule.
STEP = 2.0**-30


def go_round(value: float) -> float:
    """PromQL round(v, STEP): floor(v * (1 / STEP) + 0.5) / (1 / STEP)."""
    inverse = 1.0 / STEP
    return math.floor(value * inverse + 0.5) / inverse


def expr_tests(expectations: dict[str, list[tuple[dict[str, str], float]]]) -> list[dict[str, Any]]:
    return [{"expr": f"round({record}, {STEP!r})", "eval_time": EVAL,
             "exp_samples": [{"labels": labels(**lbl), "value": go_round(value)} for lbl, value in samples]}
            for record, samples in sorted(expectations.items())]


def alert_tests(alerts: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{**a, "eval_time": EVAL} for a in alerts]


def promtool_tests(tmp: Path) -> Path:
    doc = {"rule_files": [str(p) for p in RULE_FILES], "evaluation_interval": "1m", "tests": [
        {"name": "busy fleet", "interval": "1m", "input_series": busy_fleet().series,
         "promql_expr_test": expr_tests(busy_expectations()), "alert_rule_test": alert_tests(busy_alerts())},
        {"name": "broken fleet", "interval": "1m", "input_series": broken_fleet().series,
         "promql_expr_test": expr_tests({
             "dspark:spec_decode_acceptance_rate:rate5m": [(SPEC, COLLAPSED_ACCEPTED / DRAFT_TOKENS)],
             "dspark:request_errors:ratio_rate5m": [(M, 0.0)]}),
         "alert_rule_test": alert_tests(broken_alerts())},
    ]}
    path = tmp / "rule-values.test.yml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def test_every_rule_has_an_expected_value() -> None:
    missing = rule_names("record") - set(busy_expectations())
    assert not missing, f"records without an expected value in this test: {sorted(missing)}"
    assert {a["alertname"] for a in busy_alerts()} == {a["alertname"] for a in broken_alerts()} == rule_names("alert")


def test_rule_values(tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool absent: run `make system-deps` (Debian package prometheus)")
    out = subprocess.run([promtool, "test", "rules", str(promtool_tests(tmp_path))], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
