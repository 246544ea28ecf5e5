"""Wires `services/security` into the router: one `SecurityConfig`, and `EdgeSecurity`
holding what both fronts need (interceptor, middleware, TLS, request checks).

Integration (the router's server.py and fronts), all opt-in through the config:

    edge = EdgeSecurity.from_config(cfg.security, state.client, metrics)
    server = grpc.aio.server(interceptors=edge.grpc_interceptors())
    port = edge.add_grpc_port(server, f"{host}:{grpc_port}")          # TLS when configured
    app = web.Application(middlewares=edge.http_middlewares())
    site = web.TCPSite(runner, host, http_port, ssl_context=edge.http_ssl_context())
    # in GenerationService._spec / OpenAIFront._spec, before tokenizing:
    req = edge.check_grpc(request, limits)   /   body = edge.parse_body(await request.read())
                                                 req = edge.check_openai(body, chat, limits)
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
from services.security.openai_wire import from_openai, openai_param
from services.security.validation import (
    RequestError,
    RequestLimits,
    ValidRequest,
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
                             vocab_size=limits.vocab_size, models=frozenset({limits.model}),
                             methods=frozenset({limits.method}), max_block_size=limits.block_size,
                             verify_policies=frozenset({limits.verify_policy}),
                             confidence_threshold=limits.confidence_threshold
                             if limits.verify_policy == "threshold" else None)

    def check_grpc(self, request: Any, limits: Limits) -> ValidRequest:
        return self._check(lambda: from_proto(request), limits)

    def check_openai(self, body: Any, chat: bool, limits: Limits) -> ValidRequest:
        try:
            return self._check(lambda: from_openai(body, chat), limits)
        except RouterError as e:  # name the field as the client spelled it
            param = openai_param(e.param, body)
            if param == e.param or e.param is None or param is None:
                raise
            raise RouterError(e.code, e.message.replace(e.param, param), param) from None

    @staticmethod
    def parse_body(data: bytes) -> Any:
        try:
            return parse_json(data)
        except RequestError as e:
            raise RouterError(e.code, e.message, e.param) from None

    def _check(self, raw: Any, limits: Limits) -> ValidRequest:
        # Not counted here: the fronts count every RouterError raised while building a spec.
        try:
            return validate_request(raw(), self.request_limits(limits))
        except RequestError as e:
            raise RouterError(e.code, e.message, e.param) from None

