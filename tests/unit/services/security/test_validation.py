"""Request validation: every refusal has a documented code and a message naming the field."""

from __future__ import annotations

import pytest

from dspark.v1 import generation_pb2 as pb
from services.security.openai_wire import from_openai
from services.security.validation import (
    CODES,
    RequestError,
    RequestLimits,
    from_proto,
    grpc_status,
    http_status,
    parse_json,
    validate_request,
)

LIMITS = RequestLimits(max_context=64, max_new_tokens=32, default_max_new_tokens=8, max_prompt_bytes=100,
                       vocab_size=1000, models=frozenset({"tiny"}), methods=frozenset({"ar", "dspark"}))


def refused(raw: object, code: str = "INVALID_ARGUMENT", match: str | None = None, **kw: object) -> RequestError:
    with pytest.raises(RequestError, match=match) as info:
        validate_request(raw, LIMITS, **kw)  # type: ignore[arg-type]
    assert info.value.code == code
    return info.value


def test_valid_text_gets_defaults() -> None:
    r = validate_request({"text": "hello"}, LIMITS)
    assert (r.text, r.temperature, r.top_p, r.top_k, r.seed, r.max_new_tokens) == ("hello", 0.0, 1.0, 0, None, 8)
    assert r.num_prompt_tokens is None


def test_token_ids_and_counter_check_context() -> None:
    assert validate_request({"token_ids": [1, 2, 3]}, LIMITS).num_prompt_tokens == 3
    refused({"token_ids": list(range(64))}, match="context holds 64")
    refused({"text": "hi"}, match="context holds", count_tokens=lambda r: 64)
    refused({"text": "hi"}, match="empty", count_tokens=lambda r: 0)
    assert validate_request({"text": "hi"}, LIMITS, count_tokens=lambda r: 5).num_prompt_tokens == 5


@pytest.mark.parametrize("raw, match", [
    ({}, "exactly one"),
    ({"text": "a", "token_ids": [1]}, "exactly one"),
    ({"text": ""}, "empty"),
    ({"token_ids": []}, "empty"),
    ({"messages": []}, "non-empty list"),
    ({"messages": [{"role": "user", "content": ""}]}, "empty"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "role"),
    ({"messages": [{"role": "user", "content": 5}]}, "string"),
    ({"messages": "hi"}, "list"),
    ({"text": "x" * 101}, "101 bytes"),
    ({"text": "é" * 51}, "102 bytes"),  # the limit counts UTF-8 bytes, not characters
    ({"text": b"\xff\xfe"}, "UTF-8"),
    ({"text": "\ud800"}, "surrogate"),
    ({"text": 12}, "string"),
    ({"token_ids": [1, 1000]}, "token_ids"),
    ({"token_ids": [-1]}, "token_ids"),
    ({"token_ids": [1.5]}, "integer"),
    ({"token_ids": "abc"}, "list of integers"),
    ({"text": "a", "temperature": -0.1}, "temperature"),
    ({"text": "a", "temperature": float("nan")}, "temperature"),
    ({"text": "a", "temperature": float("inf")}, "temperature"),
    ({"text": "a", "temperature": 1e-45}, "temperature"),  # overflows logits / T to inf
    ({"text": "a", "temperature": "hot"}, "number"),
    ({"text": "a", "temperature": True}, "number"),
    ({"text": "a", "temperature": 10**400}, "out of range"),
    ({"text": "a", "top_p": 0}, "top_p"),
    ({"text": "a", "top_p": 1.5}, "top_p"),
    ({"text": "a", "top_k": -1}, "top_k"),
    ({"text": "a", "top_k": 2**31}, "top_k"),
    ({"text": "a", "seed": -5}, "seed"),
    ({"text": "a", "seed": 2**64}, "seed"),
    ({"text": "a", "max_new_tokens": 0}, "max_new_tokens"),
    ({"text": "a", "max_new_tokens": 33}, "limit 32"),
    ({"text": "a", "max_new_tokens": "8"}, "integer"),
    ({"text": "a", "method": "magic"}, "not this fleet's"),
    ({"text": "a", "method": 3}, "method"),
    ({"text": "a", "stop_token_ids": [5000]}, "stop_token_ids"),
    ({"text": "a", "stop_token_ids": list(range(65))}, "limit is 64"),
])
def test_invalid_argument(raw: dict, match: str) -> None:
    refused(raw, match=match)


def test_unknown_model_is_not_found() -> None:
    refused({"text": "a", "model": "huge"}, code="NOT_FOUND")
    assert validate_request({"text": "a", "model": ""}, LIMITS).model == ""


def test_non_mapping_and_bytes_ok() -> None:
    refused(["text"], match="object")
    assert validate_request({"text": "é".encode()}, LIMITS).text == "é"


def test_status_mappings_cover_every_code() -> None:
    expected = {"INVALID_ARGUMENT": 400, "UNAUTHENTICATED": 401, "RESOURCE_EXHAUSTED": 429,
                "UNAVAILABLE": 503, "DEADLINE_EXCEEDED": 504, "CANCELLED": 499, "NOT_FOUND": 404}
    assert {c: http_status(c) for c in CODES} == expected
    assert {c: grpc_status(c).name for c in CODES} == {c: c for c in CODES}
    with pytest.raises(ValueError):
        RequestError("INTERNAL", "no such documented code")


def test_from_proto_keeps_presence() -> None:
    req = pb.GenerateRequest(messages=pb.ChatMessages(messages=[pb.ChatMessage(role="user", content="hi")]),
                             sampling=pb.SamplingOptions(temperature=0.5, max_new_tokens=4),
                             speculation=pb.SpeculationOptions(method="dspark"))
    raw = from_proto(req)
    assert raw["top_p"] is None and raw["temperature"] == 0.5 and raw["method"] == "dspark"
    r = validate_request(raw, LIMITS)
    assert r.messages == (("user", "hi"),) and r.max_new_tokens == 4
    assert validate_request(from_proto(pb.GenerateRequest(token_ids=pb.TokenIds(ids=[3]))), LIMITS).token_ids == (3,)
    refused(from_proto(pb.GenerateRequest()), match="exactly one")


def test_from_openai() -> None:
    r = validate_request(from_openai({"prompt": "hi", "max_tokens": 4}, chat=False), LIMITS)
    assert r.text == "hi" and r.max_new_tokens == 4 and r.temperature == 1.0
    assert validate_request(from_openai({"prompt": [1, 2]}, chat=False), LIMITS).token_ids == (1, 2)
    with pytest.raises(RequestError, match="prompt"):
        from_openai({"prompt": [True]}, chat=False)
    with pytest.raises(RequestError, match="messages"):
        from_openai({}, chat=True)
    with pytest.raises(RequestError, match="object"):
        from_openai([1], chat=True)


def test_parse_json_never_raises_anything_but_request_error() -> None:
    assert parse_json(b'{"a": [1]}') == {"a": [1]}
    for bad in (b"", b"{", b"\xff\xfe", b"[" * 100_000 + b"]" * 100_000, b"9" * 5000):
        with pytest.raises(RequestError, match="not valid JSON"):
            parse_json(bad)
