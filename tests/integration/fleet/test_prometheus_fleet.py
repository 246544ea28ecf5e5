"""A real Prometheus scrapes the running fleet's router under load, and what it stores is
checked against what the clients saw:

- every raw counter Prometheus scraped equals the router's own value, and the router's
  counters moved by exactly what the clients counted in their streams (tokens per pool,
  requests, drafts, accepted drafts per position, verified tokens, prompt tokens, errors):
  exact equalities, so a double count or a lost one fails;
- the recording rules evaluated on the live data agree with the clients' numbers
  (acceptance, tokens per verification, verification budget, tokens per pool, cost per
  token from the configured prices, quantiles ordered and inside the buckets);
- every dashboard expression, recording rule and alert signal returns data here, on the
  fleet's real label sets (their formulas are checked value by value on synthetic series
  in tests/integration/test_prometheus_rule_values.py), and Prometheus evaluates the rules
  file without errors.

The dashboards use only the router's `dspark:*` metrics and `up`, so only the router's
metrics endpoint is scraped (not Ray's metrics agent).
"""

from __future__ import annotations

import collections
import functools
import math
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml

from tests.integration.deploy.test_prometheus_live import recording_rules
from tests.integration.fleet.conftest import PROMPTS
from tests.integration.fleet.helpers import collect, request, stub
from tests.integration.prometheus_util import PrometheusServer

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[3]
RULES = REPO / "deploy/prometheus/rules.yml"
JOB = "dspark-router"
STREAMS = 8
ROUNDS = 2
MAX_NEW = 16
SCRAPE_S = 1.0
# A trailing comparison with a number: the alert's threshold, not its signal.
THRESHOLD = re.compile(r"\s*(==|!=|>=|<=|>|<)\s*[-+]?[0-9.]+(e[-+]?[0-9]+)?\s*$", re.IGNORECASE)


def alert_rules() -> list[tuple[str, str]]:
    """(alert name, expr) of every alert in rules.yml."""
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [(r["alert"], r["expr"]) for g in groups for r in g["rules"] if "alert" in r]


def alert_signals() -> list[tuple[str, str]]:
    """Each alert expression without its threshold: `a > 0.05` -> `a`; `a < 0.2 and b > 0`
    -> `a`, `b`. A healthy fleet must not fire the alert, but what it compares must exist."""
    signals = []
    for name, expr in alert_rules():
        clauses = re.split(r"\s+and\s+", " ".join(expr.split()))
        signals += [(f"{name}[{i}]", THRESHOLD.sub("", c)) for i, c in enumerate(clauses)]
    return signals


def fast_rules_file(directory: Path) -> Path:
    """rules.yml with every group evaluated each second, so recorded series appear quickly."""
    doc = yaml.safe_load(RULES.read_text())
    for group in doc["groups"]:
        group["interval"] = f"{SCRAPE_S:g}s"
    path = directory / "rules.yml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


class Load:
    """Greedy gRPC streams, several at a time; counts what the clients saw in them."""

    def __init__(self, fleet: Any, tokenizer: Any) -> None:
        self.stub = stub(fleet)
        self.tokenizer = tokenizer
        self.tokens = self.requests = self.prompt_tokens = self.gaps = 0
        self.steps = self.drafted_steps = self.drafted = self.accepted = self.verify_tokens = 0
        self.accepted_per_position: collections.Counter[str] = collections.Counter()
        self.lock = threading.Lock()

    def one(self, prompt: str) -> None:
        ids, msgs = collect(self.stub.Generate(request(prompt, MAX_NEW), timeout=120))
        steps = [m.step for m in msgs if m.HasField("step")]
        with self.lock:
            self.tokens += len(ids)
            self.requests += 1
            self.prompt_tokens += len(self.tokenizer.encode(prompt))
            self.gaps += len(msgs) - 1  # inter-token latency samples: one per later message
            self.steps += len(steps)
            self.drafted_steps += sum(1 for st in steps if st.drafted)
            self.drafted += sum(st.drafted for st in steps)
            self.accepted += sum(st.accepted for st in steps)
            self.verify_tokens += sum(st.verify_tokens for st in steps)
            for st in steps:
                for position, n in enumerate(st.accepted_per_position):
                    self.accepted_per_position[str(position)] += n
        assert len(steps) == len(msgs) - 1, "every message after the first is one target step"

    def round(self, streams: int) -> None:
        threads = [threading.Thread(target=self.one, args=(PROMPTS[i % len(PROMPTS)],)) for i in range(streams)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=180)
        assert not any(t.is_alive() for t in threads), "a stream did not finish"

    def invalid(self) -> None:
        with pytest.raises(grpc.RpcError) as e:
            list(self.stub.Generate(request("", 8), timeout=30))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def snapshot(fleet: Any) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of the router's registry: (name, sorted labels) -> value."""
    return {(smp.name, tuple(sorted(smp.labels.items()))): smp.value
            for metric in fleet.metrics.registry.collect() for smp in metric.samples}


class Moved:
    """How far the router's samples moved between two snapshots, summed over label sets
    that match the given labels."""

    def __init__(self, before: dict, after: dict) -> None:
        self.before, self.after = before, after

    def __call__(self, name: str, **labels: str) -> float:
        want = set(labels.items())
        return sum(v - self.before.get(k, 0.0) for k, v in self.after.items()
                   if k[0] == name and want <= set(k[1]))


@pytest.fixture(scope="module")
def load_run(fleet: Any, embedded: tuple[Any, Any]) -> Iterator[tuple[PrometheusServer, Load, Moved]]:
    if shutil.which("prometheus") is None:
        pytest.skip("prometheus absent: run `make system-deps` (Debian package prometheus)")
    with tempfile.TemporaryDirectory(prefix="dspark-rules-") as tmp:
        rules = fast_rules_file(Path(tmp))
        target = f"127.0.0.1:{fleet.ports['metrics']}"
        with PrometheusServer.start([target], job=JOB, scrape_interval=f"{SCRAPE_S:g}s",
                                    rule_files=[rules]) as prom:
            prom.wait_for_targets_up()
            before = snapshot(fleet)
            load = Load(fleet, embedded[0].tokenizer)
            # Histogram series are created by their first observation; rate() needs an
            # increase after the first scrape, hence several rounds with scrapes between.
            for _ in range(ROUNDS):
                load.round(STREAMS)
                time.sleep(2.5 * SCRAPE_S)
            load.invalid()
            prom.wait_for_data('sum(rate(dspark:request_errors_total{code="INVALID_ARGUMENT"}[5m])) > 0')
            after = snapshot(fleet)
            # Prometheus has scraped the final values (nothing moves after the load).
            total = sum(v for (name, _), v in after.items() if name == "dspark:generation_tokens_total")
            prom.wait_for_data(f"sum(dspark:generation_tokens_total) == {total!r}")
            yield prom, load, Moved(before, after)


def _assert_data(prom: PrometheusServer, name: str, expr: str) -> list[dict[str, Any]]:
    samples = prom.wait_for_data(expr, timeout_s=15)
    assert samples, f"{name}: no non-NaN sample for {expr}"
    assert all(math.isfinite(s["value"]) for s in samples), (name, samples)
    return samples


def value(prom: PrometheusServer, expr: str, **labels: str) -> float:
    """The one sample of `expr` whose labels include `labels`."""
    samples = [s for s in prom.wait_for_data(expr, timeout_s=15) if labels.items() <= s["metric"].items()]
    assert len(samples) == 1, (expr, labels, samples)
    return samples[0]["value"]


def test_every_expression_returns_data_on_the_live_fleet(load_run) -> None:
    """Every dashboard/recording expression and alert signal finds the fleet's real series
    (label names, joins). Their values are checked below and, exactly, on synthetic series
    in tests/integration/test_prometheus_rule_values.py."""
    prom = load_run[0]
    empty = []
    for name, expr in recording_rules() + alert_signals():
        try:
            _assert_data(prom, name, expr)
        except AssertionError as e:
            empty.append(str(e))
    assert empty == []


def test_counters_match_client_view(load_run, fleet) -> None:
    """Exact: what the router counted equals what the clients saw, and what Prometheus
    stored equals what the router exported."""
    prom, load, moved = load_run
    spec = {"model": fleet.cfg.model, "method": fleet.cfg.method}
    assert load.requests == STREAMS * ROUNDS and load.tokens > load.requests
    assert moved("dspark:generation_tokens_total", pool="prefill") == load.requests  # the first token
    assert moved("dspark:generation_tokens_total", pool="target") == load.tokens - load.requests
    assert moved("dspark:generation_tokens_total", pool="drafter") == 0
    assert moved("dspark:prompt_tokens_total", pool="prefill") == load.prompt_tokens
    assert moved("dspark:request_success_total") == load.requests
    assert moved("dspark:request_errors_total") == moved("dspark:request_errors_total", code="INVALID_ARGUMENT") == 1
    assert moved("dspark:spec_decode_num_drafts_total", **spec) == load.drafted_steps
    assert moved("dspark:spec_decode_num_draft_tokens_total", **spec) == load.drafted
    assert moved("dspark:spec_decode_num_accepted_tokens_total", **spec) == load.accepted
    assert load.accepted > 0, "the n-gram drafter was accepted somewhere in the load"
    for position, n in load.accepted_per_position.items():
        assert moved("dspark:spec_decode_num_accepted_tokens_per_pos_total", position=position, **spec) == n
    assert moved("dspark:spec_decode_fallback_total") == 0
    assert moved("dspark:verify_tokens_per_request_step_count", **spec) == load.steps
    assert moved("dspark:verify_tokens_per_request_step_sum", **spec) == load.verify_tokens
    for histogram in ("time_to_first_token_seconds", "e2e_request_latency_seconds", "request_queue_time_seconds"):
        assert moved(f"dspark:{histogram}_count") == load.requests, histogram
    assert moved("dspark:inter_token_latency_seconds_count") == load.gaps
    assert moved("dspark:prefill_latency_seconds_count") == moved("dspark:kv_transfer_seconds_count") == load.requests
    assert moved("dspark:request_failovers_total") == moved("dspark:request_takeovers_total") == 0
    # Prometheus stored exactly the router's values, series by series.
    for (name, labels), exported in moved.after.items():
        if name.endswith("_total") and exported > 0:
            assert value(prom, name, **dict(labels)) == exported, (name, labels)


def test_live_rules_agree_with_the_clients(load_run, fleet) -> None:
    """The recording rules on live data: ratios of rates over the same window equal the
    ratios of the clients' counts (to the few percent rate() extrapolation may differ
    between series); prices come from the config."""
    prom, load, moved = load_run
    spec = {"model": fleet.cfg.model, "method": fleet.cfg.method}
    prom.wait_for_data("dspark:cost_per_million_output_tokens_dollars:rate5m")
    approx = functools.partial(pytest.approx, rel=0.05)
    acceptance = load.accepted / load.drafted
    assert value(prom, "dspark:spec_decode_acceptance_rate:rate5m", **spec) == approx(acceptance)
    assert value(prom, "dspark:spec_decode_mean_accepted_length:rate5m", **spec) == \
        approx(1 + load.accepted / load.drafted_steps)
    # A position's series appears with its first accepted draft; if that happened during the
    # load, rate() cannot see the increase before its first scrape and reads low (by up to a
    # scrape's worth of increase): exact only for the series that existed before.
    existed = {dict(labels).get("position") for name, labels in moved.before
               if name == "dspark:spec_decode_num_accepted_tokens_per_pos_total"}
    for position, n in load.accepted_per_position.items():
        if n:
            live = value(prom, "dspark:spec_decode_acceptance_rate_per_pos:rate5m", position=position, **spec)
            expected = n / load.drafted_steps
            assert live == approx(expected) if position in existed else 0 < live <= expected * 1.05, position
    budget = value(prom, "dspark:verify_tokens_per_request_step:mean5m", **spec)
    assert budget == approx(load.verify_tokens / load.steps)
    target, prefill = (value(prom, "dspark:generation_tokens:rate5m", pool=p) for p in ("target", "prefill"))
    assert target / prefill == approx((load.tokens - load.requests) / load.requests)
    assert value(prom, "dspark:generation_tokens:rate5m", pool="drafter") == 0
    assert value(prom, "dspark:spec_decode_fallback:rate5m", **spec) == 0
    assert value(prom, "dspark:request_errors:ratio_rate5m") == 0  # a client's bad request is not a server error
    # Cost per 1M output tokens: the pool's configured price over the fleet's token rate, that
    # rate evaluated at the rule's own evaluation time (the 5m rate keeps moving after it).
    for pool in ("prefill", "target", "drafter"):
        p = fleet.cfg.pool(pool)
        assert value(prom, "dspark:pool_hourly_cost_dollars", pool=pool) == p.hourly_cost * p.replicas
        assert value(prom, "dspark:pool_replicas", pool=pool) == p.replicas
        rule = "dspark:cost_per_million_output_tokens_dollars:rate5m"
        at = value(prom, f"timestamp({rule})", pool=pool)
        [cost] = [s["value"] for s in prom.query(rule, at=at) if s["metric"].get("pool") == pool]
        [rate] = prom.query("sum(rate(dspark:generation_tokens_total[5m]))", at=at)
        assert cost == pytest.approx(p.hourly_cost * p.replicas / (3600 * rate["value"]) * 1e6, rel=0.02)
    # Latency quantiles: ordered, positive, inside the histograms' buckets.
    for metric in ("time_to_first_token_seconds", "inter_token_latency_seconds"):
        p50, p99 = (value(prom, f"dspark:{metric}:{q}_5m") for q in ("p50", "p99"))
        assert 0 < p50 <= p99 < float("inf"), (metric, p50, p99)
    assert value(prom, "up", job=JOB) == 1


def test_rules_evaluate_without_error(load_run) -> None:
    prom = load_run[0]
    prom.wait_for_data("dspark:time_to_first_token_seconds:p99_5m")  # a full evaluation happened
    groups = prom._api("rules", {})["groups"]
    rules = [r for g in groups for r in g["rules"]]
    expected = {r.get("record") or r["alert"] for g in yaml.safe_load(RULES.read_text())["groups"]
                for r in g["rules"]}
    assert {r["name"] for r in rules} == expected
    bad = [(r["name"], r.get("health"), r.get("lastError")) for r in rules if r.get("health") != "ok"]
    assert bad == []
    firing = [r["name"] for r in rules if r.get("type") == "alerting" and r.get("state") == "firing"]
    assert firing == []  # a healthy fleet under load pages nobody
