"""Wires `services/security` into the router: one `SecurityConfig`, and `EdgeSecurity`
holding what both fronts need (interceptor, middleware, TLS, request checks).

Integration (the router's server.py and fronts), all opt-in through the config:

    edge = EdgeSecurity.from_config(cfg.security, state.client, metrics)
    server = grpc.aio.server(interceptors=edge.grpc_interceptors())
    port = edge.add_grpc_port(server, f"{host}:{grpc_port}")          # TLS when configured
    app = web.Application(middlewares=edge.http_middlewares())
    site = web.TCPSite(runner, host, http_port, ssl_context=edge.http_ssl_context())
    # in GenerationService._spec / OpenAIFront._spec, before tokenizing:
    edge.check_grpc(request, limits)      /    body = edge.parse_body(await request.read())
                                               edge.check_openai(body, chat, limits)
"""

from __future__ import annotations

from typing import Any

import grpc

from services.router.errors import RouterError
from services.router.validate import Limits
from services.security import tls
from services.security.admission import Admission, ErrorSink
from services.security.auth import ApiKeyAuth
from services.security.config import SecurityConfig
from services.security.grpc_guard import GrpcGuard
from services.security.http_guard import http_guard
from services.security.validation import (
    RequestError,
    RequestLimits,
    from_openai,
    from_proto,
    parse_json,
    validate_request,
)
from services.state.ratelimit import RateLimitConfig, RateLimiter


class EdgeSecurity:
    def __init__(self, cfg: SecurityConfig, admission: Admission) -> None:
        self.cfg, self.admission = cfg, admission

    @classmethod
    def from_config(cls, cfg: SecurityConfig, redis_client: Any = None,
                    metrics: ErrorSink | None = None) -> EdgeSecurity:
        auth = ApiKeyAuth.from_file(cfg.api_key_file) if cfg.api_key_file else None
        limiter = None
        if cfg.rate_limit_per_s is not None:
            if redis_client is None:
                raise ValueError("a rate limit needs Redis")
            limiter = RateLimiter(redis_client, RateLimitConfig(cfg.rate_limit_per_s, cfg.rate_limit_burst))
        return cls(cfg, Admission(auth, limiter, metrics))

    # -- transports -----------------------------------------------------------------------
    def grpc_interceptors(self) -> list[grpc.aio.ServerInterceptor]:
        return [GrpcGuard(self.admission)]

    def http_middlewares(self) -> list[Any]:
        return [http_guard(self.admission)]

    def add_grpc_port(self, server: grpc.aio.Server, address: str) -> int:
        c = self.cfg
        if c.tls_cert_file is None or c.tls_key_file is None:
            return server.add_insecure_port(address)
        return server.add_secure_port(address, tls.grpc_server_credentials(c.tls_cert_file, c.tls_key_file,
                                                                            c.tls_client_ca_file))

    def http_ssl_context(self) -> Any:
        c = self.cfg
        if c.tls_cert_file is None or c.tls_key_file is None:
            return None
        return tls.http_server_context(c.tls_cert_file, c.tls_key_file, c.tls_client_ca_file)

    # -- request checks: raise RouterError, which the fronts already answer and count --
    def request_limits(self, limits: Limits) -> RequestLimits:
        return RequestLimits(max_context=limits.max_context, max_new_tokens=limits.max_new_tokens,
                             default_max_new_tokens=limits.default_max_new_tokens,
                             max_prompt_bytes=self.cfg.max_prompt_bytes, max_messages=self.cfg.max_messages,
                             vocab_size=limits.vocab_size, models=frozenset({limits.model}))

    def check_grpc(self, request: Any, limits: Limits) -> None:
        self._check(lambda: from_proto(request), limits)

    def check_openai(self, body: Any, chat: bool, limits: Limits) -> None:
        self._check(lambda: from_openai(body, chat), limits)

    @staticmethod
    def parse_body(data: bytes) -> Any:
        try:
            return parse_json(data)
        except RequestError as e:
            raise RouterError(e.code, e.message) from None

    def _check(self, raw: Any, limits: Limits) -> None:
        # Not counted here: the fronts count every RouterError raised while building a spec.
        try:
            validate_request(raw(), self.request_limits(limits))
        except RequestError as e:
            raise RouterError(e.code, e.message) from None

