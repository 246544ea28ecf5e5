"""The gRPC interceptor and HTTP middleware in front of a fake fleet: keys, rate limits,
malformed bytes, health exemption, and TLS on both fronts."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from dspark.errors import UserError
from dspark.v1 import generation_pb2 as pb
from dspark.v1 import generation_pb2_grpc as pb_grpc
from services.security.admission import Admission
from services.security.auth import ApiKeyAuth, add_key
from services.security.tls import (
    grpc_channel_credentials,
    grpc_server_credentials,
    http_client_context,
    http_server_context,
)
from services.state.redis_state import StateUnavailable
from tests.integration.fuzz.fake_fleet import FakeFleet
from tests.unit.services.security.certs import self_signed

REQ = pb.GenerateRequest(text="hi", sampling=pb.SamplingOptions(max_new_tokens=4))


class ScriptedLimiter:
    """allow() answers from a list: True, False (retry 1.5 s) or "down" (Redis gone)."""

    def __init__(self, answers: list[object]) -> None:
        self.answers, self.calls = answers, []

    def allow(self, key_name: str, cost: int = 1) -> tuple[bool, float]:
        self.calls.append(key_name)
        a = self.answers.pop(0) if self.answers else True
        if a == "down":
            raise StateUnavailable("redis unavailable: test")
        return bool(a), 0.0 if a else 1.5


@pytest.fixture(scope="module")
def key(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, ApiKeyAuth]:
    path = tmp_path_factory.mktemp("keys") / "keys"
    plain = add_key(path, "alice")
    return plain, ApiKeyAuth.from_file(path)


@pytest.fixture(scope="module")
def limiter() -> ScriptedLimiter:
    return ScriptedLimiter([])


@pytest.fixture(scope="module")
def fleet(key: tuple[str, ApiKeyAuth], limiter: ScriptedLimiter) -> Iterator[FakeFleet]:
    with FakeFleet(Admission(auth=key[1], limiter=limiter)) as f:
        yield f


def generate(port: int, metadata: tuple | None = None) -> list[pb.GenerateResponse]:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        return list(pb_grpc.GenerationStub(ch).Generate(REQ, metadata=metadata, timeout=10))


def code_of(fn, *a, **kw) -> grpc.RpcError:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.RpcError) as info:
        fn(*a, **kw)
    return info.value


def test_grpc_keys(fleet: FakeFleet, key: tuple[str, ApiKeyAuth]) -> None:
    good = (("authorization", f"Bearer {key[0]}"),)
    assert [m.offset for m in generate(fleet.grpc_port, good)] == [0, 3]
    assert fleet.state.key_names[-1] == "alice"  # the servicer sees who called
    for md in (None, (("authorization", "Bearer nope"),), (("authorization", key[0]),)):
        assert code_of(generate, fleet.grpc_port, md).code() == grpc.StatusCode.UNAUTHENTICATED
    with grpc.insecure_channel(f"127.0.0.1:{fleet.grpc_port}") as ch:  # unary method, same guard
        err = code_of(pb_grpc.GenerationStub(ch).ListModels, pb.ListModelsRequest(), timeout=10)
        assert err.code() == grpc.StatusCode.UNAUTHENTICATED
        health = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert health.status == health_pb2.HealthCheckResponse.SERVING  # exempt: probes have no key


def test_grpc_rate_limit_and_redis_down(fleet: FakeFleet, key: tuple[str, ApiKeyAuth],
                                        limiter: ScriptedLimiter) -> None:
    good = (("authorization", f"Bearer {key[0]}"),)
    limiter.answers[:] = [False, "down"]
    err = code_of(generate, fleet.grpc_port, good)
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert dict(err.trailing_metadata())["retry-after-ms"] == "1500"
    assert code_of(generate, fleet.grpc_port, good).code() == grpc.StatusCode.UNAVAILABLE
    assert len(generate(fleet.grpc_port, good)) == 2


def test_grpc_malformed_bytes_are_invalid_argument(fleet: FakeFleet, key: tuple[str, ApiKeyAuth]) -> None:
    # field 1 (text), wire type 2, length 2, bytes ff fe: a proto3 string that is not UTF-8.
    raw = bytes([0x0A, 0x02, 0xFF, 0xFE])
    with grpc.insecure_channel(f"127.0.0.1:{fleet.grpc_port}") as ch:
        call = ch.unary_stream("/dspark.v1.Generation/Generate")  # no serializers: raw bytes
        err = code_of(lambda: list(call(raw, metadata=(("authorization", f"Bearer {key[0]}"),), timeout=10)))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "malformed" in err.details()


def post(url: str, body: bytes, headers: dict[str, str], context: object = None) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json", **headers})
    try:
        with urllib.request.urlopen(req, timeout=10, context=context) as r:  # type: ignore[arg-type]
            return r.status, dict(r.headers) | {"_body": r.read()}
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers) | {"_body": e.read()}


def test_http_keys_and_rate_limit(fleet: FakeFleet, key: tuple[str, ApiKeyAuth], limiter: ScriptedLimiter) -> None:
    url = f"http://127.0.0.1:{fleet.http_port}/v1/completions"
    body = json.dumps({"prompt": "hi", "max_tokens": 4}).encode()
    status, resp = post(url, body, {})
    err = json.loads(resp["_body"])["error"]
    assert status == 401 and err["code"] == "invalid_api_key" and resp["WWW-Authenticate"].startswith("Bearer")
    auth = {"Authorization": f"Bearer {key[0]}"}
    status, resp = post(url, body, auth)
    assert status == 200 and json.loads(resp["_body"])["choices"][0]["token_ids"] == [0, 1, 2, 3]
    assert fleet.state.key_names[-1] == "alice"
    limiter.answers[:] = [False, "down"]
    status, resp = post(url, body, auth)
    assert status == 429 and resp["Retry-After"] == "2"
    assert json.loads(resp["_body"])["error"]["type"] == "rate_limit_error"
    assert post(url, body, auth)[0] == 503
    with urllib.request.urlopen(f"http://127.0.0.1:{fleet.http_port}/health", timeout=10) as r:
        assert r.status == 200  # exempt


def test_tls_both_fronts(tmp_path: Path) -> None:
    cert, keyfile = self_signed(tmp_path)
    with FakeFleet(grpc_credentials=grpc_server_credentials(cert, keyfile),
                   ssl_context=http_server_context(cert, keyfile)) as f:
        with grpc.secure_channel(f"localhost:{f.grpc_port}", grpc_channel_credentials(cert)) as ch:
            assert len(list(pb_grpc.GenerationStub(ch).Generate(REQ, timeout=10))) == 2
        with grpc.insecure_channel(f"127.0.0.1:{f.grpc_port}") as ch:  # plaintext to a TLS port fails
            assert code_of(lambda: list(pb_grpc.GenerationStub(ch).Generate(REQ, timeout=5))).code() \
                == grpc.StatusCode.UNAVAILABLE
        status, _ = post(f"https://127.0.0.1:{f.http_port}/v1/completions",
                         json.dumps({"prompt": "hi", "max_tokens": 2}).encode(), {},
                         context=http_client_context(cert))
        assert status == 200
    with pytest.raises(UserError, match="cannot"):
        http_server_context(tmp_path / "nope.pem", keyfile)
    with pytest.raises(UserError, match="cannot read"):
        grpc_server_credentials(tmp_path / "nope.pem", keyfile)


def test_cancel_mid_stream_frees_the_slot(fleet: FakeFleet, key: tuple[str, ApiKeyAuth]) -> None:
    import time

    req = pb.GenerateRequest(text="hi", sampling=pb.SamplingOptions(max_new_tokens=64))
    with grpc.insecure_channel(f"127.0.0.1:{fleet.grpc_port}") as ch:
        call = pb_grpc.GenerationStub(ch).Generate(req, metadata=(("authorization", f"Bearer {key[0]}"),),
                                                   timeout=10)
        next(call)
        assert fleet.state.used_slots == 1
        call.cancel()
    deadline = time.monotonic() + 2
    while fleet.state.used_slots and time.monotonic() < deadline:
        time.sleep(0.01)
    assert fleet.state.used_slots == 0
