"""Prometheus metrics of the fleet: every name, label and bucket list lives here.

The library (`dspark/`) returns plain stats; services turn them into these metrics. Names
follow vLLM's (`vllm:spec_decode_num_drafts_total` -> `dspark:spec_decode_num_drafts_total`).

Label sets are bounded by construction:
  model, method  one value per process (from the validated config), never user input
  pool           one of POOLS
  position       "0" .. str(MAX_SPEC_POSITIONS - 1), or POSITION_OVERFLOW
  code           a gRPC status code name (HTTP statuses are mapped onto them)
  finish_reason  one of FINISH_REASONS (successes only: a cancelled request counts as an
                 error with code CANCELLED, a failed one with its own code)
Request ids never go in labels.

Each `FleetMetrics` owns its own `CollectorRegistry`, so two objects in one process (tests)
never collide and a process exports exactly what it registered.

Exposition is always the classic text format 0.0.4. prometheus-client 0.26 negotiates
OpenMetrics with Prometheus and then writes `dspark_x_total` sample lines under
`# TYPE dspark:x` (prometheus/client_python#1177): the `dspark:` names would not survive a
scrape. `prometheus_client.start_http_server` / `make_wsgi_app` negotiate, so they are not
used here; embed `render_latest` in other servers.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

PREFIX = "dspark:"
# generate_latest writes the classic 0.0.4 text format (legacy names, colons kept); 0.26's
# CONTENT_TYPE_LATEST announces text version=1.0.0 (the UTF-8 variant), so name 0.0.4 here.
CONTENT_TYPE_TEXT = "text/plain; version=0.0.4; charset=utf-8"

POOLS = ("prefill", "target", "drafter")
FINISH_REASONS = ("stop", "length")
# Per-position acceptance is tracked for the first MAX_SPEC_POSITIONS draft positions;
# later positions (unusually long blocks) share one overflow series.
MAX_SPEC_POSITIONS = 16
POSITION_OVERFLOW = "overflow"

# gRPC canonical status code names: the error label's whole value set.
ERROR_CODES = (
    "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND",
    "ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION",
    "ABORTED", "OUT_OF_RANGE", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS",
    "UNAUTHENTICATED",
)  # fmt: skip
HTTP_STATUS_TO_CODE = {
    400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED",
    404: "NOT_FOUND", 408: "DEADLINE_EXCEEDED", 409: "ABORTED", 413: "OUT_OF_RANGE",
    429: "RESOURCE_EXHAUSTED", 499: "CANCELLED", 500: "INTERNAL", 501: "UNIMPLEMENTED",
    503: "UNAVAILABLE", 504: "DEADLINE_EXCEEDED",
}  # fmt: skip

# Bucket lists (seconds unless named otherwise). Latency buckets follow vLLM's, with finer
# steps at the low end because CPU fleets verify in tens of milliseconds.
TTFT_BUCKETS_S = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75,
    1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0,
)  # fmt: skip
ITL_BUCKETS_S = (
    0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1,
    0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
REQUEST_BUCKETS_S = (
    0.01, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0,
    30.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0,
)  # fmt: skip
STEP_BUCKETS_S = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2,
    0.3, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
KV_TRANSFER_BUCKETS_S = (
    0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
# Tokens verified per request per step: an integer >= 1 (the anchor plus the drafts). Bounds
# sit halfway between integers, so bucket (k - 0.5, k + 0.5] holds exactly k and
# histogram_quantile interpolates around k: with bounds at the integers (first bucket le=1,
# lower edge 0), a fleet verifying 1 token per step showed a p50 of 0.59.
VERIFY_TOKENS_BUCKETS = (0.5, 1.5, 2.5, 3.5, 4.5, 5.5, 6.5, 8.5, 10.5, 12.5, 16.5, 24.5, 32.5, 64.5)

_SPEC_LABELS = ("model", "method")
_REQUEST_LABELS = ("model",)


def _field(stats: Any, name: str, default: Any = None) -> Any:
    """Read `name` from a mapping or an attribute-style stats object (dataclass)."""
    if isinstance(stats, Mapping):
        return stats.get(name, default)
    return getattr(stats, name, default)


def _position_label(position: int) -> str:
    return str(position) if position < MAX_SPEC_POSITIONS else POSITION_OVERFLOW


def normalize_error_code(code: str | int) -> str:
    """Map a gRPC code name (any case, `grpc.StatusCode` too) or an HTTP status to ERROR_CODES."""
    if isinstance(code, int):
        return HTTP_STATUS_TO_CODE.get(code, "INTERNAL" if code >= 500 else "UNKNOWN")
    name = getattr(code, "name", code)  # grpc.StatusCode members carry .name
    name = str(name).upper()
    return name if name in ERROR_CODES else "UNKNOWN"


def render_latest(registry: CollectorRegistry) -> tuple[bytes, str]:
    """Text-format (0.0.4) body and its Content-Type, for an existing HTTP server's /metrics.

    Ignore the scraper's Accept header: see the module docstring for why not OpenMetrics.
    """
    return generate_latest(registry), CONTENT_TYPE_TEXT


class FleetMetrics:
    """All fleet metrics of one process, registered in a registry of their own.

    `model` and `method` are fixed per process (they come from the validated config) and
    become the `model` / `method` labels; they never come from a request.
    """

    def __init__(self, model: str, method: str, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        self.model = model
        self.method = method
        self._define_spec_metrics()
        self._define_request_metrics()
        self._define_pool_metrics()
        self._prime_label_sets()

    # -- definitions -------------------------------------------------------------------

    def _counter(self, name: str, doc: str, labels: Iterable[str] = ()) -> Counter:
        return Counter(PREFIX + name, doc, tuple(labels), registry=self.registry)

    def _gauge(self, name: str, doc: str, labels: Iterable[str] = ()) -> Gauge:
        return Gauge(PREFIX + name, doc, tuple(labels), registry=self.registry)

    def _histogram(
        self, name: str, doc: str, buckets: Sequence[float], labels: Iterable[str] = _REQUEST_LABELS
    ) -> Histogram:
        return Histogram(PREFIX + name, doc, tuple(labels), registry=self.registry, buckets=buckets)

    def _define_spec_metrics(self) -> None:
        # prometheus-client appends `_total` to counter names.
        self.num_drafts = self._counter(
            "spec_decode_num_drafts", "Number of speculative drafts verified.", _SPEC_LABELS
        )
        self.num_draft_tokens = self._counter(
            "spec_decode_num_draft_tokens", "Number of draft tokens proposed.", _SPEC_LABELS
        )
        self.num_accepted_tokens = self._counter(
            "spec_decode_num_accepted_tokens", "Number of draft tokens accepted.", _SPEC_LABELS
        )
        self.num_accepted_tokens_per_pos = self._counter(
            "spec_decode_num_accepted_tokens_per_pos",
            "Accepted draft tokens per draft position (0-based).",
            (*_SPEC_LABELS, "position"),
        )
        self.fallback = self._counter(
            "spec_decode_fallback",
            "Decode steps run without a drafter (drafter unavailable -> plain decoding).",
            _SPEC_LABELS,
        )
        self.verify_tokens = self._histogram(
            "verify_tokens_per_request_step",
            "Tokens the target verified for one request in one step (verification budget).",
            VERIFY_TOKENS_BUCKETS,
            _SPEC_LABELS,
        )
        self.propose_latency = self._histogram(
            "propose_latency_seconds", "Drafter propose call latency.", STEP_BUCKETS_S, _SPEC_LABELS
        )
        self.verify_latency = self._histogram(
            "verify_latency_seconds", "Target verify call latency.", STEP_BUCKETS_S, _SPEC_LABELS
        )

    def _define_request_metrics(self) -> None:
        self.ttft = self._histogram("time_to_first_token_seconds", "Time to first token.", TTFT_BUCKETS_S)
        self.itl = self._histogram(
            "inter_token_latency_seconds", "Latency between streamed tokens.", ITL_BUCKETS_S
        )
        self.e2e = self._histogram(
            "e2e_request_latency_seconds", "End-to-end request latency.", REQUEST_BUCKETS_S
        )
        self.queue_time = self._histogram(
            "request_queue_time_seconds", "Time a request waited before prefill.", REQUEST_BUCKETS_S
        )
        self.prefill_latency = self._histogram(
            "prefill_latency_seconds", "Prefill call latency (prompt forward + KV export).", STEP_BUCKETS_S
        )
        self.kv_transfer_bytes = self._counter(
            "kv_transfer_bytes", "KV cache bytes moved from prefill to target workers.", _REQUEST_LABELS
        )
        self.kv_transfer_seconds = self._histogram(
            "kv_transfer_seconds", "Duration of one KV cache transfer.", KV_TRANSFER_BUCKETS_S
        )
        self.requests_running = self._gauge(
            "num_requests_running", "Requests in the decode loop.", _REQUEST_LABELS
        )
        self.requests_waiting = self._gauge(
            "num_requests_waiting", "Requests queued before prefill.", _REQUEST_LABELS
        )
        self.request_errors = self._counter(
            "request_errors", "Failed requests by gRPC status code.", (*_REQUEST_LABELS, "code")
        )
        self.request_success = self._counter(
            "request_success", "Finished requests by finish reason.", (*_REQUEST_LABELS, "finish_reason")
        )
        self.request_failovers = self._counter(
            "request_failovers",
            "Requests re-prefilled on a healthy replica after a replica or KV hand-off failed mid-stream.",
            _REQUEST_LABELS,
        )
        self.request_takeovers = self._counter(
            "request_takeovers", "Requests continued from the token log after their router died.", _REQUEST_LABELS
        )

    def _define_pool_metrics(self) -> None:
        self.generation_tokens = self._counter(
            "generation_tokens",
            "Output tokens streamed to clients, by the pool that produced them.",
            ("pool",),
        )
        self.prompt_tokens = self._counter("prompt_tokens", "Prompt tokens processed, by pool.", ("pool",))
        self.pool_hourly_cost = self._gauge(
            "pool_hourly_cost_dollars", "Hourly cost of the whole pool (all replicas), USD.", ("pool",)
        )
        self.pool_replicas = self._gauge("pool_replicas", "Healthy replicas in the pool.", ("pool",))

    def _prime_label_sets(self) -> None:
        """Create every known series at 0 so rates and dashboards have data before events."""
        spec = (self.model, self.method)
        for metric in (self.num_drafts, self.num_draft_tokens, self.num_accepted_tokens, self.fallback):
            metric.labels(*spec)
        for code in ERROR_CODES:
            self.request_errors.labels(self.model, code)
        for reason in FINISH_REASONS:
            self.request_success.labels(self.model, reason)
        for pool in POOLS:
            self.generation_tokens.labels(pool)
            self.prompt_tokens.labels(pool)
        self.kv_transfer_bytes.labels(self.model)
        self.request_failovers.labels(self.model)
        self.request_takeovers.labels(self.model)

    # -- observations ------------------------------------------------------------------

    def observe_step(self, stats: Any) -> None:
        """Record one speculative step of one request (or a batch, see `num_drafts`).

        `stats` is a mapping or a stats dataclass with:
          drafted                 draft tokens proposed (0 = no draft this step)
          accepted                draft tokens accepted
          accepted_per_position   accepted count per draft position, index 0 first
          verify_tokens           tokens verified for this request (int), or one int per
                                  request when the stats cover a batch
          num_drafts              optional; drafts covered (default 1 if drafted else 0)
          propose_seconds, verify_seconds   optional call latencies
        """
        spec = (self.model, self.method)
        drafted = int(_field(stats, "drafted", 0))
        num_drafts = int(_field(stats, "num_drafts", 1 if drafted else 0))
        self.num_drafts.labels(*spec).inc(num_drafts)
        self.num_draft_tokens.labels(*spec).inc(drafted)
        self.num_accepted_tokens.labels(*spec).inc(int(_field(stats, "accepted", 0)))
        for position, count in enumerate(_field(stats, "accepted_per_position", None) or ()):
            self.num_accepted_tokens_per_pos.labels(*spec, _position_label(position)).inc(int(count))
        verify_tokens = _field(stats, "verify_tokens", None)
        if verify_tokens is not None:
            per_request = verify_tokens if isinstance(verify_tokens, Sequence) else (verify_tokens,)
            for tokens in per_request:
                self.verify_tokens.labels(*spec).observe(int(tokens))
        for key, histogram in (
            ("propose_seconds", self.propose_latency),
            ("verify_seconds", self.verify_latency),
        ):
            seconds = _field(stats, key, None)
            if seconds is not None:
                histogram.labels(*spec).observe(float(seconds))

    def observe_fallback(self, steps: int = 1) -> None:
        """Count decode steps that ran without a drafter (plain target decoding)."""
        self.fallback.labels(self.model, self.method).inc(steps)

    def observe_prefill(self, seconds: float) -> None:
        """Record one prefill call's latency."""
        self.prefill_latency.labels(self.model).observe(seconds)

    def observe_request(
        self,
        ttft: float | None,
        itl: Sequence[float],
        e2e: float,
        queue: float,
        finish_reason: str,
    ) -> None:
        """Record a finished request: TTFT (None if no token came), inter-token gaps, totals.

        Only a success (`finish_reason` in FINISH_REASONS) counts in request_success; the
        caller counts a cancelled or failed request with `observe_error`.
        """
        if ttft is not None:
            self.ttft.labels(self.model).observe(ttft)
        itl_histogram = self.itl.labels(self.model)
        for gap in itl:
            itl_histogram.observe(gap)
        self.e2e.labels(self.model).observe(e2e)
        self.queue_time.labels(self.model).observe(queue)
        if finish_reason in FINISH_REASONS:
            self.request_success.labels(self.model, finish_reason).inc()

    def observe_kv_transfer(self, num_bytes: int, seconds: float) -> None:
        """Record one prefill -> target KV cache transfer."""
        self.kv_transfer_bytes.labels(self.model).inc(num_bytes)
        self.kv_transfer_seconds.labels(self.model).observe(seconds)

    def observe_recovery(self, takeover: bool = False) -> None:
        """Count a request that went on after a fault: a failover to a healthy replica, or
        (`takeover`) a continuation from the log by another router."""
        (self.request_takeovers if takeover else self.request_failovers).labels(self.model).inc()

    def observe_error(self, code: str | int) -> None:
        """Count a failed request; `code` is a gRPC code name or an HTTP status."""
        self.request_errors.labels(self.model, normalize_error_code(code)).inc()

    def set_queue(self, running: int, waiting: int) -> None:
        """Set the number of requests decoding and waiting."""
        self.requests_running.labels(self.model).set(running)
        self.requests_waiting.labels(self.model).set(waiting)

    def set_pool(self, pool: str, hourly_cost: float, replicas: int) -> None:
        """Publish a pool's healthy replica count and its hourly cost (USD, whole pool)."""
        self._check_pool(pool)
        self.pool_hourly_cost.labels(pool).set(hourly_cost)
        self.pool_replicas.labels(pool).set(replicas)

    def count_tokens(self, pool: str, prompt: int, generated: int) -> None:
        """Count tokens a pool handled: prompt tokens processed and output tokens produced.

        Each output token is counted once, by the pool that produced it (prefill: the first
        token; target: the rest), so the sum over pools is the fleet's output.
        """
        self._check_pool(pool)
        self.prompt_tokens.labels(pool).inc(prompt)
        self.generation_tokens.labels(pool).inc(generated)

    @staticmethod
    def _check_pool(pool: str) -> None:
        if pool not in POOLS:
            raise ValueError(f"unknown pool {pool!r}; expected one of {POOLS}")

    # -- export ------------------------------------------------------------------------

    def render(self) -> tuple[bytes, str]:
        """Exposition body and Content-Type, for an existing HTTP server's /metrics route."""
        return render_latest(self.registry)

    def start_http_server(self, port: int, addr: str = "127.0.0.1") -> ThreadingHTTPServer:
        """Serve /metrics on addr:port in a daemon thread; port 0 picks a free port.

        Returns the server: `server.server_port` is the bound port; `server.shutdown()` then
        `server.server_close()` stop it.
        """
        return start_http_server(self.registry, port, addr)


class _MetricsHandler(BaseHTTPRequestHandler):
    registry: CollectorRegistry  # set on the per-server subclass

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        if self.path.split("?", 1)[0] not in ("/metrics", "/"):
            self.send_error(404)
            return
        body, content_type = render_latest(self.registry)
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - scrapes are not news
        pass


def start_http_server(registry: CollectorRegistry, port: int, addr: str = "127.0.0.1") -> ThreadingHTTPServer:
    """Serve `registry` at http://addr:port/metrics from a daemon thread; port 0 picks one.

    Returns the server: `server.server_port` is the bound port; `server.shutdown()` then
    `server.server_close()` stop it.
    """
    handler = type("MetricsHandler", (_MetricsHandler,), {"registry": registry})
    server = ThreadingHTTPServer((addr, port), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name=f"metrics-{server.server_port}", daemon=True).start()
    return server
