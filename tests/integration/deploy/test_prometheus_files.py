"""Prometheus config, rules and dashboard queries: promtool and cross-checks with metrics.py."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import yaml

from services.metrics import FleetMetrics

from .conftest import REPO, run

pytestmark = pytest.mark.integration

PROMETHEUS_DIR = REPO / "deploy/prometheus"
BUILD_DASHBOARDS = REPO / "deploy/grafana/build_dashboards.py"
METRIC_NAME = re.compile(r"\bdspark:[a-z0-9_:]+")
SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}


def recorded_names() -> set[str]:
    names = set()
    for path in (PROMETHEUS_DIR / "rules.yml", PROMETHEUS_DIR / "dashboard-queries.yml"):
        for group in yaml.safe_load(path.read_text())["groups"]:
            names |= {rule["record"] for rule in group["rules"] if "record" in rule}
    return names


def exported_names() -> set[str]:
    """Series names a FleetMetrics exports (histogram _bucket/_sum/_count included)."""
    metrics = FleetMetrics(model="m", method="dspark")
    return {f.name + suffix for f in metrics.registry.collect() for suffix in SUFFIXES[f.type]}


def test_promtool_check_config(promtool: str) -> None:
    result = run([promtool, "check", "config", PROMETHEUS_DIR / "prometheus.yml"])
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("rules_file", ["rules.yml", "dashboard-queries.yml"])
def test_promtool_check_rules(promtool: str, rules_file: str) -> None:
    result = run([promtool, "check", "rules", PROMETHEUS_DIR / rules_file])
    assert result.returncode == 0, result.stdout + result.stderr


def test_generated_files_in_sync() -> None:
    """dashboard-queries.yml and the chart copies are what build_dashboards.py makes now."""
    result = run([sys.executable, BUILD_DASHBOARDS, "--check"])
    assert result.returncode == 0, result.stderr


def test_queries_use_only_exported_metrics() -> None:
    """Every dspark:* name in rules and dashboards is exported by FleetMetrics or recorded."""
    known = exported_names() | recorded_names()
    used: set[str] = set()
    for path in [PROMETHEUS_DIR / "rules.yml", *Path(REPO / "deploy/grafana/dashboards").glob("*.json")]:
        used |= set(METRIC_NAME.findall(path.read_text()))
    assert used, "no dspark: metric found in rules or dashboards"
    assert used - known == set()


def test_promtool_check_metrics(promtool: str) -> None:
    """The exposition parses; the only lint is the deliberate vLLM-style ':' in names."""
    metrics = FleetMetrics(model="m", method="dspark")
    metrics.observe_step(
        {"drafted": 4, "accepted": 2, "accepted_per_position": [1, 1, 0, 0], "verify_tokens": 5}
    )
    metrics.observe_request(0.1, [0.02], 0.5, 0.01, "stop")
    body, _ = metrics.render()
    result = run([promtool, "check", "metrics"], input=body.decode())
    lints = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    assert result.returncode in (0, 3), lints  # 3 = lint findings only, 1 = parse error
    unexpected = [line for line in lints if not line.endswith("metric names should not contain ':'")]
    assert unexpected == []
