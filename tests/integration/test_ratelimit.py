"""Per-key token bucket in a real redis-server: burst, refill, isolation, atomicity, outage."""

from __future__ import annotations

import threading
import time
import uuid

import pytest
import redis

from services.state.ratelimit import RateLimitConfig, RateLimiter
from services.state.redis_state import StateUnavailable
from services.state.server import RedisServer, free_port

pytestmark = pytest.mark.integration


def limiter(url: str, rate: float, burst: int) -> RateLimiter:
    client = redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)
    return RateLimiter(client, RateLimitConfig(rate, burst, namespace=f"t{uuid.uuid4().hex[:8]}"))


def test_burst_then_refill(redis_server: RedisServer) -> None:
    rl = limiter(redis_server.url, rate=20.0, burst=3)
    assert [rl.allow("a")[0] for _ in range(3)] == [True] * 3
    ok, retry = rl.allow("a")
    assert not ok and 0 < retry <= 0.05 + 1e-9  # one token back after 1/20 s
    assert rl.allow("b") == (True, 0.0)  # keys have separate buckets
    time.sleep(retry + 0.02)
    assert rl.allow("a")[0]


def test_concurrent_callers_never_overdraw(redis_server: RedisServer) -> None:
    rl = limiter(redis_server.url, rate=0.001, burst=10)  # no refill during the test
    results: list[bool] = []

    def hammer() -> None:
        for _ in range(10):
            results.append(rl.allow("shared")[0])

    threads = [threading.Thread(target=hammer) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(results) == 10 and len(results) == 40


def test_bucket_expires_when_full_again(redis_server: RedisServer) -> None:
    rl = limiter(redis_server.url, rate=1000.0, burst=2)
    rl.allow("x")
    client = redis.Redis.from_url(redis_server.url)
    ttl_ms = client.pttl(f"{rl.config.namespace}:rl:x")
    assert 0 < ttl_ms <= 1001 + 1  # refill time of one token + 1 s slack


def test_redis_down_is_state_unavailable() -> None:
    rl = limiter(f"redis://127.0.0.1:{free_port()}/0", rate=1.0, burst=1)
    with pytest.raises(StateUnavailable):
        rl.allow("a")


def test_config_rejects_nonsense() -> None:
    for rate, burst in ((0, 1), (-1, 1), (1, 0)):
        with pytest.raises(ValueError):
            RateLimitConfig(rate, burst)
