"""services/router/security.py: config validation and the checks the router's fronts call."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest
from pydantic import ValidationError

from dspark.v1 import generation_pb2 as pb
from services.router.errors import RouterError
from services.router.security import EdgeSecurity, SecurityConfig
from services.router.validate import Limits
from services.security.auth import add_key
from services.security.grpc_guard import GrpcGuard
from tests.unit.services.security.certs import self_signed

LIMITS = Limits(model="tiny", method="ngram", max_context=32, max_new_tokens=16, default_max_new_tokens=4,
                vocab_size=100)


class Errors:
    def __init__(self) -> None:
        self.codes: list[str | int] = []

    def observe_error(self, code: str | int) -> None:
        self.codes.append(code)


def test_defaults_are_open_and_plaintext() -> None:
    edge = EdgeSecurity.from_config(SecurityConfig())
    assert edge.admission.auth is None and edge.admission.limiter is None
    assert edge.http_ssl_context() is None
    assert isinstance(edge.grpc_interceptors()[0], GrpcGuard) and len(edge.http_middlewares()) == 1


def test_config_rules(tmp_path: Path) -> None:
    with pytest.raises(ValidationError):
        SecurityConfig(tls_cert_file=tmp_path / "c")
    with pytest.raises(ValidationError):
        SecurityConfig(unknown=1)  # type: ignore[call-arg]
    with pytest.raises(ValueError, match="needs Redis"):
        EdgeSecurity.from_config(SecurityConfig(rate_limit_per_s=5))
    add_key(tmp_path / "keys", "a")
    cert, key = self_signed(tmp_path)
    edge = EdgeSecurity.from_config(SecurityConfig(api_key_file=tmp_path / "keys", tls_cert_file=cert,
                                                   tls_key_file=key))
    assert edge.admission.auth is not None and edge.http_ssl_context() is not None

    async def bind() -> int:
        server = grpc.aio.server()
        try:
            return edge.add_grpc_port(server, "127.0.0.1:0")
        finally:
            await server.stop(None)

    assert asyncio.run(bind()) > 0


def test_checks_raise_router_errors() -> None:
    errors = Errors()
    edge = EdgeSecurity.from_config(SecurityConfig(max_prompt_bytes=10), metrics=errors)
    edge.check_grpc(pb.GenerateRequest(text="hello"), LIMITS)
    edge.check_openai({"prompt": [1, 2], "max_tokens": 3}, False, LIMITS)
    cases = [
        (lambda: edge.check_grpc(pb.GenerateRequest(text="x" * 11), LIMITS), "INVALID_ARGUMENT"),
        (lambda: edge.check_grpc(pb.GenerateRequest(text="a", model="big"), LIMITS), "NOT_FOUND"),
        (lambda: edge.check_openai({"prompt": "a", "max_tokens": 17}, False, LIMITS), "INVALID_ARGUMENT"),
        (lambda: edge.check_openai({"messages": [{"role": "user", "content": "\ud800"}]}, True, LIMITS),
         "INVALID_ARGUMENT"),
        (lambda: edge.parse_body(b"[" * 50_000), "INVALID_ARGUMENT"),
    ]
    for call, code in cases:
        with pytest.raises(RouterError) as info:
            call()
        assert info.value.code == code
    assert errors.codes == []  # the fronts count RouterErrors from spec building themselves
