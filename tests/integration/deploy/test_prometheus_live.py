"""A real Prometheus scrapes a FleetMetrics endpoint; every dashboard and recording-rule
expression must return data. The fleet-level live scrape reuses tests/integration/prometheus_util.py.
"""

from __future__ import annotations

import math
import shutil
import threading
from collections.abc import Iterator

import pytest
import yaml

from services.metrics import POOLS, FleetMetrics
from tests.integration.prometheus_util import PrometheusServer, render_config

from .conftest import REPO

pytestmark = pytest.mark.integration

RULE_FILES = ("deploy/prometheus/rules.yml", "deploy/prometheus/dashboard-queries.yml")


def recording_rules() -> list[tuple[str, str]]:
    rules = []
    for path in RULE_FILES:
        for group in yaml.safe_load((REPO / path).read_text())["groups"]:
            rules += [(r["record"], r["expr"]) for r in group["rules"] if "record" in r]
    return rules


def observe_forever(metrics: FleetMetrics, stop: threading.Event) -> None:
    """Keep every counter and histogram moving so rates and quantiles are defined."""
    for pool in POOLS:
        metrics.set_pool(pool, hourly_cost={"prefill": 2.0, "target": 4.0, "drafter": 1.0}[pool], replicas=1)
    step = 0
    while not stop.wait(0.1):
        step += 1
        metrics.observe_step({"drafted": 4, "accepted": step % 5, "verify_tokens": 1 + step % 4,
                              "accepted_per_position": [1] * (step % 5) + [0] * (4 - step % 5),
                              "propose_seconds": 0.004, "verify_seconds": 0.02})  # fmt: skip
        metrics.observe_request(0.05 * (1 + step % 3), [0.01, 0.02, 0.04], 0.4, 0.002, "stop")
        metrics.observe_prefill(0.03)
        metrics.observe_kv_transfer(4 << 20, 0.002)
        metrics.observe_fallback()
        metrics.observe_error("UNAVAILABLE")
        metrics.set_queue(running=1 + step % 3, waiting=step % 2)
        metrics.count_tokens("prefill", prompt=32, generated=1)
        metrics.count_tokens("target", prompt=0, generated=3)


@pytest.fixture(scope="module")
def prometheus() -> Iterator[PrometheusServer]:
    if shutil.which("prometheus") is None:
        pytest.skip("prometheus absent: run `make system-deps` (Debian package prometheus)")
    metrics = FleetMetrics(model="tiny", method="dspark")
    exporter = metrics.start_http_server(0)
    stop = threading.Event()
    worker = threading.Thread(target=observe_forever, args=(metrics, stop), daemon=True)
    worker.start()
    try:
        with PrometheusServer.start([f"127.0.0.1:{exporter.server_port}"], job="dspark-router") as prom:
            prom.wait_for_targets_up()
            # rate() needs two scrapes inside the window after the first observation.
            prom.wait_for_data("sum(rate(dspark:spec_decode_num_drafts_total[5m])) > 0")
            yield prom
    finally:
        stop.set()
        worker.join(timeout=5)
        exporter.shutdown()
        exporter.server_close()


@pytest.mark.parametrize("name,expr", recording_rules(), ids=[name for name, _ in recording_rules()])
def test_expression_returns_data(prometheus: PrometheusServer, name: str, expr: str) -> None:
    samples = prometheus.wait_for_data(expr, timeout_s=15)
    assert samples, f"{name}: no non-NaN sample for {expr}"
    assert all(math.isfinite(s["value"]) for s in samples), samples


def test_cost_per_million_tokens(prometheus: PrometheusServer) -> None:
    """Cost per 1M output tokens per pool = hourly cost / (3600 * output tokens/s) * 1e6."""
    (expr,) = [e for n, e in recording_rules() if n == "dspark:cost_per_million_output_tokens_dollars:rate5m"]
    costs = {s["metric"]["pool"]: s["value"] for s in prometheus.wait_for_data(expr)}
    tokens_per_s = prometheus.query("sum(rate(dspark:generation_tokens_total[5m]))")[0]["value"]
    assert set(costs) == set(POOLS)
    # Both queries see nearly the same window; the ratio of pools is exact.
    assert costs["target"] == pytest.approx(4.0 / (3600 * tokens_per_s) * 1e6, rel=0.2)
    assert costs["target"] / costs["drafter"] == pytest.approx(4.0)


def test_config_scrapes_loopback_only() -> None:
    config = render_config(["127.0.0.1:9400"], job="dspark-router", scrape_interval="1s")
    assert config["scrape_configs"][0]["static_configs"][0]["targets"] == ["127.0.0.1:9400"]
    with pytest.raises(ValueError):
        render_config(["10.0.0.1:9400"], job="dspark-router", scrape_interval="1s")
