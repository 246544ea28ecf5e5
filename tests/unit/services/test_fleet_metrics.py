"""services/metrics.py: names, bounded labels, observations, exposition."""

from __future__ import annotations

import urllib.request
from dataclasses import dataclass, field

import pytest
from prometheus_client.parser import text_string_to_metric_families

from services.metrics import (
    ERROR_CODES,
    FINISH_REASONS,
    MAX_SPEC_POSITIONS,
    POOLS,
    POSITION_OVERFLOW,
    FleetMetrics,
    normalize_error_code,
)

ALLOWED_LABELS = {"model", "method", "pool", "position", "code", "finish_reason"}


@dataclass
class StepStats:
    drafted: int
    accepted: int
    accepted_per_position: list[int] = field(default_factory=list)
    verify_tokens: int | list[int] = 0


def value(metrics: FleetMetrics, name: str, **labels: str) -> float:
    result = metrics.registry.get_sample_value(name, labels)
    assert result is not None, f"{name}{labels} not exported"
    return result


def exercised() -> FleetMetrics:
    metrics = FleetMetrics(model="smollm2", method="dspark")
    for i in range(3):
        metrics.observe_step(
            {
                "drafted": 8,
                "accepted": i,
                "accepted_per_position": [1] * i + [0] * (8 - i),
                "verify_tokens": 6,
                "propose_seconds": 0.01,
                "verify_seconds": 0.03,
            }
        )
    metrics.observe_request(0.2, [0.02, 0.03], 1.5, 0.01, "stop")
    metrics.observe_kv_transfer(1 << 20, 0.004)
    metrics.observe_prefill(0.05)
    metrics.observe_error("unavailable")
    metrics.observe_fallback()
    metrics.set_queue(running=2, waiting=1)
    for pool in POOLS:
        metrics.set_pool(pool, hourly_cost=1.5, replicas=2)
        metrics.count_tokens(pool, prompt=10, generated=5)
    return metrics


def families(metrics: FleetMetrics) -> dict:
    body, content_type = metrics.render()
    assert content_type.startswith("text/plain")
    return {f.name: f for f in text_string_to_metric_families(body.decode())}


def test_every_metric_has_prefix_and_bounded_labels() -> None:
    for family in families(exercised()).values():
        assert family.name.startswith("dspark:"), family.name
        for sample in family.samples:
            assert set(sample.labels) - {"le"} <= ALLOWED_LABELS, sample


def test_required_names_exported() -> None:
    names = {s.name for f in families(exercised()).values() for s in f.samples}
    required = [
        "dspark:spec_decode_num_drafts_total", "dspark:spec_decode_num_draft_tokens_total",
        "dspark:spec_decode_num_accepted_tokens_total",
        "dspark:spec_decode_num_accepted_tokens_per_pos_total",
        "dspark:verify_tokens_per_request_step_bucket", "dspark:time_to_first_token_seconds_bucket",
        "dspark:inter_token_latency_seconds_bucket", "dspark:e2e_request_latency_seconds_bucket",
        "dspark:request_queue_time_seconds_bucket", "dspark:prefill_latency_seconds_bucket",
        "dspark:verify_latency_seconds_bucket", "dspark:propose_latency_seconds_bucket",
        "dspark:kv_transfer_bytes_total", "dspark:kv_transfer_seconds_bucket",
        "dspark:num_requests_running", "dspark:num_requests_waiting", "dspark:request_errors_total",
        "dspark:generation_tokens_total", "dspark:prompt_tokens_total", "dspark:pool_hourly_cost_dollars",
        "dspark:pool_replicas", "dspark:request_success_total", "dspark:spec_decode_fallback_total",
    ]  # fmt: skip
    assert set(required) - names == set()


def test_step_counters() -> None:
    metrics = exercised()
    spec = {"model": "smollm2", "method": "dspark"}
    assert value(metrics, "dspark:spec_decode_num_drafts_total", **spec) == 3
    assert value(metrics, "dspark:spec_decode_num_draft_tokens_total", **spec) == 24
    assert value(metrics, "dspark:spec_decode_num_accepted_tokens_total", **spec) == 0 + 1 + 2
    assert value(metrics, "dspark:spec_decode_num_accepted_tokens_per_pos_total", **spec, position="0") == 2
    assert value(metrics, "dspark:spec_decode_num_accepted_tokens_per_pos_total", **spec, position="1") == 1
    assert value(metrics, "dspark:verify_tokens_per_request_step_sum", **spec) == 18
    assert value(metrics, "dspark:request_errors_total", model="smollm2", code="UNAVAILABLE") == 1
    assert value(metrics, "dspark:generation_tokens_total", pool="target") == 5


def test_dataclass_stats_and_batched_verify_tokens() -> None:
    metrics = FleetMetrics(model="m", method="ngram")
    metrics.observe_step(
        StepStats(drafted=4, accepted=1, accepted_per_position=[1, 0, 0, 0], verify_tokens=[3, 5])
    )
    assert value(metrics, "dspark:verify_tokens_per_request_step_count", model="m", method="ngram") == 2
    metrics.observe_step(StepStats(drafted=0, accepted=0))  # a step without a draft
    assert value(metrics, "dspark:spec_decode_num_drafts_total", model="m", method="ngram") == 1


def test_positions_are_capped() -> None:
    metrics = FleetMetrics(model="m", method="dspark")
    metrics.observe_step({"drafted": 64, "accepted": 64, "accepted_per_position": [1] * 64})
    positions = {
        s.labels["position"]
        for s in families(metrics)["dspark:spec_decode_num_accepted_tokens_per_pos"].samples
        if s.name.endswith("_total")
    }
    assert len(positions) == MAX_SPEC_POSITIONS + 1
    assert value(metrics, "dspark:spec_decode_num_accepted_tokens_per_pos_total", model="m", method="dspark",
                 position=POSITION_OVERFLOW) == 64 - MAX_SPEC_POSITIONS  # fmt: skip


def test_label_values_are_bounded() -> None:
    assert normalize_error_code(503) == "UNAVAILABLE"
    assert normalize_error_code(418) == "UNKNOWN"
    assert normalize_error_code("made-up request id 1234") == "UNKNOWN"
    metrics = FleetMetrics(model="m", method="dspark")
    metrics.observe_request(None, [], 0.1, 0.0, "some-new-reason")
    reasons = {s.labels["finish_reason"] for s in families(metrics)["dspark:request_success"].samples}
    codes = {s.labels["code"] for s in families(metrics)["dspark:request_errors"].samples}
    assert reasons <= set(FINISH_REASONS) and codes <= set(ERROR_CODES)
    with pytest.raises(ValueError):
        metrics.set_pool("router", 1.0, 1)


def test_registries_are_isolated() -> None:
    first, second = FleetMetrics(model="a", method="dspark"), FleetMetrics(model="a", method="dspark")
    first.observe_error(500)
    assert (
        second.registry.get_sample_value("dspark:request_errors_total", {"model": "a", "code": "INTERNAL"})
        == 0
    )


# What Prometheus 2.x sends: it prefers OpenMetrics.
PROMETHEUS_ACCEPT = (
    "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,"
    "text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
)


def test_http_server_keeps_colon_names() -> None:
    """Text format whatever the Accept header: OpenMetrics would rename dspark:x to dspark_x."""
    metrics = exercised()
    server = metrics.start_http_server(0)
    try:
        assert server.server_address[0] == "127.0.0.1"
        url = f"http://127.0.0.1:{server.server_port}/metrics"
        request = urllib.request.Request(url, headers={"Accept": PROMETHEUS_ACCEPT})
        with urllib.request.urlopen(request, timeout=5) as response:
            assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
            body = response.read()
        assert b"\ndspark:spec_decode_num_drafts_total{" in body
        assert b"dspark_" not in body
    finally:
        server.shutdown()
        server.server_close()
