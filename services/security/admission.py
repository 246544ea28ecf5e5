"""Admission shared by both fronts: who is calling (API key) and may they call now (rate
limit). Returns the key name or raises `RequestError`, so the gRPC interceptor and the
HTTP middleware only translate the outcome to their transport."""

from __future__ import annotations

import asyncio
import dataclasses
import math
from typing import Protocol

from services.security.auth import ANONYMOUS, ApiKeyAuth
from services.security.validation import RequestError
from services.state.redis_state import StateUnavailable


class Limiter(Protocol):
    def allow(self, key_name: str, cost: int = 1) -> tuple[bool, float]: ...


class ErrorSink(Protocol):  # services.metrics.FleetMetrics fits
    def observe_error(self, code: str | int) -> None: ...


class RateLimited(RequestError):
    def __init__(self, key_name: str, retry_after_s: float) -> None:
        super().__init__("RESOURCE_EXHAUSTED",
                         f"rate limit exceeded for key {key_name!r}; retry after {retry_after_s:.2f} s")
        self.retry_after_s = retry_after_s

    @property
    def retry_after_header(self) -> str:  # HTTP Retry-After takes whole seconds
        return str(max(1, math.ceil(self.retry_after_s)))


@dataclasses.dataclass
class Admission:
    """auth None = no keys required (everyone is `anonymous`); limiter None = no limit."""

    auth: ApiKeyAuth | None = None
    limiter: Limiter | None = None
    metrics: ErrorSink | None = None

    async def admit(self, bearer_token: str | None) -> str:
        try:
            name = self._authenticate(bearer_token)
            if self.limiter is not None:
                try:
                    # redis-py is synchronous: keep the event loop free while it waits.
                    allowed, retry_s = await asyncio.to_thread(self.limiter.allow, name)
                except StateUnavailable as e:
                    raise RequestError("UNAVAILABLE", f"rate limiter unavailable: {e}") from None
                if not allowed:
                    raise RateLimited(name, retry_s)
            return name
        except RequestError as e:
            self.observe(e.code)
            raise

    def _authenticate(self, token: str | None) -> str:
        if self.auth is None:
            return ANONYMOUS
        name = self.auth.check(token)
        if name is None:
            raise RequestError("UNAUTHENTICATED", "missing or invalid API key (send `authorization: Bearer <key>`)")
        return name

    def observe(self, code: str) -> None:
        if self.metrics is not None:
            self.metrics.observe_error(code)

