"""The recording rules and alerts behave (promtool's rule unit tests, on the real rules file
and the real bucket bounds): acceptance shows "no drafts" (no series) instead of NaN, client
errors and cancellations never page, server errors do, the verified-tokens p50 of a fleet
verifying one token per step is 1, and a cancellation is an error, not a success."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from services.metrics import VERIFY_TOKENS_BUCKETS, FleetMetrics

REPO = Path(__file__).resolve().parents[3]
RULES = REPO / "deploy/prometheus/rules.yml"
M = 'model="m"'
SPEC = 'model="m",method="ngram"'


def flat(series: str, per_step: float = 0.0) -> dict:
    return {"series": series, "values": f"0+{per_step}x20"}


def promtool_test(tmp_path: Path, series: list[dict], expr_tests: list[dict], alert_tests: list[dict]) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool absent: run `make system-deps` (Debian package prometheus)")
    spec = {"rule_files": [str(RULES)], "evaluation_interval": "30s",
            "tests": [{"interval": "30s", "input_series": series, "promql_expr_test": expr_tests,
                       "alert_rule_test": alert_tests}]}
    path = tmp_path / "rules_test.yml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    result = subprocess.run([promtool, "test", "rules", str(path)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_no_drafts_is_no_series_not_nan(tmp_path: Path) -> None:
    series = [flat(f"dspark:spec_decode_num_{n}_total{{{SPEC}}}") for n in ("accepted_tokens", "draft_tokens",
                                                                          "drafts")]
    series.append(flat(f'dspark:spec_decode_num_accepted_tokens_per_pos_total{{{SPEC},position="0"}}'))
    tests = [{"expr": r, "eval_time": "10m", "exp_samples": []} for r in (
        "dspark:spec_decode_acceptance_rate:rate5m", "dspark:spec_decode_mean_accepted_length:rate5m",
        "dspark:spec_decode_acceptance_rate_per_pos:rate5m")]
    promtool_test(tmp_path, series, tests, [{"eval_time": "20m", "alertname": "DSparkAcceptanceCollapse",
                                             "exp_alerts": []}])


def test_client_errors_do_not_page_and_server_errors_do(tmp_path: Path) -> None:
    series = [flat(f'dspark:request_errors_total{{{M},code="{c}"}}', 10) for c in
              ("INVALID_ARGUMENT", "NOT_FOUND", "UNAUTHENTICATED", "CANCELLED", "RESOURCE_EXHAUSTED")]
    series += [flat(f'dspark:request_errors_total{{{M},code="INTERNAL"}}'),
               flat(f'dspark:request_success_total{{{M},finish_reason="stop"}}', 1)]
    ratio = [{"expr": "dspark:request_errors:ratio_rate5m", "eval_time": "10m",
              "exp_samples": [{"labels": f"dspark:request_errors:ratio_rate5m{{{M}}}", "value": 0}]}]
    promtool_test(tmp_path, series, ratio, [{"eval_time": "10m", "alertname": "DSparkHighErrorRate",
                                             "exp_alerts": []}])
    series[-2] = flat(f'dspark:request_errors_total{{{M},code="INTERNAL"}}', 10)  # 10 of 61 requests
    page = [{"eval_time": "10m", "alertname": "DSparkHighErrorRate", "exp_alerts": [
        {"exp_labels": {"severity": "page", "model": "m"},
         "exp_annotations": {"summary": "More than 5% of requests to m fail on the server side",
                             "description": "Server error ratio is 16.39% over 5m (client errors excluded)."}}]}]
    promtool_test(tmp_path, series, [], page)


def test_verified_tokens_median_of_single_token_steps_is_one(tmp_path: Path) -> None:
    metrics = FleetMetrics("m", "ngram")
    for _ in range(20):
        metrics.observe_step({"drafted": 0, "accepted": 0, "verify_tokens": 1})
    series = []
    for family in metrics.registry.collect():
        for sample in family.samples:
            if sample.name == "dspark:verify_tokens_per_request_step_bucket":
                le = sample.labels["le"]
                series.append(flat(f'{sample.name}{{{SPEC},le="{le}"}}', sample.value))
    assert VERIFY_TOKENS_BUCKETS[0] < 1 < VERIFY_TOKENS_BUCKETS[1]
    expr = "histogram_quantile(0.5, sum by (le) (rate(dspark:verify_tokens_per_request_step_bucket[5m])))"
    promtool_test(tmp_path, series, [{"expr": expr, "eval_time": "10m", "exp_samples": [{"labels": "{}",
                                                                                       "value": 1}]}], [])


def test_a_cancellation_is_an_error_not_a_success() -> None:
    metrics = FleetMetrics("m", "ngram")
    metrics.observe_error("CANCELLED")
    metrics.observe_request(0.1, [], 0.5, 0.0, "abort")
    metrics.observe_request(0.1, [], 0.5, 0.0, "error")
    assert metrics.registry.get_sample_value("dspark:request_errors_total", {"model": "m", "code": "CANCELLED"}) == 1
    for reason in ("stop", "length"):
        assert metrics.registry.get_sample_value("dspark:request_success_total",
                                                 {"model": "m", "finish_reason": reason}) == 0
    assert metrics.registry.get_sample_value("dspark:e2e_request_latency_seconds_count", {"model": "m"}) == 2
