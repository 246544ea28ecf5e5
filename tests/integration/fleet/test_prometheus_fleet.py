"""A real Prometheus scrapes the running fleet's router under load: every PromQL expression
of the dashboards (deploy/prometheus/dashboard-queries.yml, generated from the dashboard
JSON), every recording rule and every alert's signal in deploy/prometheus/rules.yml returns
data, and Prometheus evaluates the rules file without errors.

The dashboards use only the router's `dspark:*` metrics and `up`, so only the router's
metrics endpoint is scraped (not Ray's metrics agent).
"""

from __future__ import annotations

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
    """Greedy gRPC streams, several at a time; counts what the clients saw."""

    def __init__(self, fleet: Any) -> None:
        self.stub = stub(fleet)
        self.tokens = self.requests = 0
        self.lock = threading.Lock()

    def one(self, prompt: str) -> None:
        ids, _ = collect(self.stub.Generate(request(prompt, MAX_NEW), timeout=120))
        with self.lock:
            self.tokens += len(ids)
            self.requests += 1

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


@pytest.fixture(scope="module")
def load_run(fleet: Any) -> Iterator[tuple[PrometheusServer, Load]]:
    if shutil.which("prometheus") is None:
        pytest.skip("prometheus absent: run `make system-deps` (Debian package prometheus)")
    with tempfile.TemporaryDirectory(prefix="dspark-rules-") as tmp:
        rules = fast_rules_file(Path(tmp))
        target = f"127.0.0.1:{fleet.ports['metrics']}"
        with PrometheusServer.start([target], job=JOB, scrape_interval=f"{SCRAPE_S:g}s",
                                    rule_files=[rules]) as prom:
            prom.wait_for_targets_up()
            load = Load(fleet)
            # Histogram series are created by their first observation; rate() needs an
            # increase after the first scrape, hence several rounds with scrapes between.
            for _ in range(ROUNDS):
                load.round(STREAMS)
                time.sleep(2.5 * SCRAPE_S)
            load.invalid()
            prom.wait_for_data('sum(rate(dspark:request_errors_total{code="INVALID_ARGUMENT"}[5m])) > 0')
            yield prom, load


def _assert_data(prom: PrometheusServer, name: str, expr: str) -> list[dict[str, Any]]:
    samples = prom.wait_for_data(expr, timeout_s=15)
    assert samples, f"{name}: no non-NaN sample for {expr}"
    assert all(math.isfinite(s["value"]) for s in samples), (name, samples)
    return samples


@pytest.mark.parametrize("name,expr", recording_rules(), ids=[n for n, _ in recording_rules()])
def test_dashboard_and_recording_expression_returns_data(load_run, name: str, expr: str) -> None:
    _assert_data(load_run[0], name, expr)


@pytest.mark.parametrize("name,expr", alert_signals(), ids=[n for n, _ in alert_signals()])
def test_alert_signal_returns_data(load_run, name: str, expr: str) -> None:
    _assert_data(load_run[0], name, expr)


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


def test_counters_match_client_view(load_run) -> None:
    prom, load = load_run
    generated = prom.query("sum(dspark:generation_tokens_total)")[0]["value"]
    finished = prom.query('sum(dspark:request_success_total{finish_reason=~"stop|length"})')[0]["value"]
    # The session fleet may have served other tests' requests before this module.
    assert generated >= load.tokens > 0
    assert finished >= load.requests == STREAMS * ROUNDS
    codes = {s["metric"]["code"] for s in prom.query("sum by (code) (increase(dspark:request_errors_total[5m])) > 0")}
    assert "INVALID_ARGUMENT" in codes
    costs = {s["metric"]["pool"] for s in prom.wait_for_data("dspark:cost_per_million_output_tokens_dollars:rate5m")}
    assert costs == {"prefill", "target", "drafter"}
