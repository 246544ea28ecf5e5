"""Per-API-key rate limit in Redis: a token bucket shared by every router replica.

Each key name owns a bucket of `burst` tokens refilled at `requests_per_s`; a request
takes one token or is refused with the time until one is back. The read-refill-take step
is one Lua script, so concurrent routers can neither overdraw a bucket nor lose a refill,
and the clock is Redis's own `TIME`, so routers with skewed clocks agree. Buckets expire
once full again (no state is kept for idle keys).
"""

from __future__ import annotations

import dataclasses

import redis

from services.state.redis_state import StateUnavailable

# KEYS: bucket   ARGV: burst, refill per second, cost
# Returns {1, 0} when allowed, {0, retry_after_ms} when not.
TOKEN_BUCKET = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local burst = tonumber(ARGV[1])
local per_ms = tonumber(ARGV[2]) / 1000
local cost = tonumber(ARGV[3])
local b = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens = tonumber(b[1]) or burst
local ts = tonumber(b[2]) or now
tokens = math.min(burst, tokens + math.max(0, now - ts) * per_ms)
local allowed, wait = 0, 0
if tokens >= cost then
  tokens = tokens - cost
  allowed = 1
else
  wait = math.ceil((cost - tokens) / per_ms)
end
redis.call('HSET', KEYS[1], 'tokens', string.format('%.6f', tokens), 'ts', now)
redis.call('PEXPIRE', KEYS[1], math.ceil((burst - tokens) / per_ms) + 1000)
return {allowed, wait}
"""


@dataclasses.dataclass(frozen=True)
class RateLimitConfig:
    requests_per_s: float = 10.0  # sustained rate per key
    burst: int = 20  # requests a key may send at once after being idle
    namespace: str = "dspark"

    def __post_init__(self) -> None:
        if not self.requests_per_s > 0 or self.burst < 1:
            raise ValueError("rate limit needs requests_per_s > 0 and burst >= 1")


class RateLimiter:
    """`allow(key_name) -> (allowed, retry_after_s)`; raises StateUnavailable when Redis is
    unreachable (callers answer UNAVAILABLE / 503 rather than letting traffic through)."""

    def __init__(self, client: redis.Redis, config: RateLimitConfig | None = None) -> None:
        self.config = config or RateLimitConfig()
        self._script = client.register_script(TOKEN_BUCKET)

    def allow(self, key_name: str, cost: int = 1) -> tuple[bool, float]:
        c = self.config
        try:
            allowed, wait_ms = self._script(keys=[f"{c.namespace}:rl:{key_name}"],
                                            args=[c.burst, c.requests_per_s, cost])
        except (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError) as e:
            raise StateUnavailable(f"redis unavailable: {e}") from e
        return bool(int(allowed)), int(wait_ms) / 1000.0
