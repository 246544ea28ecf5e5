"""Property-based fuzzing of the public APIs: random and malformed requests must get only
documented status codes, within a deadline, and leave the server healthy.

    fuzz_grpc(lambda: grpc.insecure_channel(addr), n=200, metadata=auth_md)
    fuzz_http("http://127.0.0.1:PORT", n=200, headers={"Authorization": "Bearer ..."})

Both are plain functions (hypothesis runs inside), so the same harness checks the fake
fleet here and the real fleet in its integration tests. Streams are cancelled after a few
messages: the fuzz is about admission and parsing, not long generations. Every stream that
succeeds is checked too: its offsets must be contiguous from the start (Generate: 0;
Resume: the requested offset), and, where the caller can say what a request must produce
(`reference`), its tokens must be exactly that output's prefix.
"""

from __future__ import annotations

import http.client
import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from dspark.v1 import generation_pb2 as pb
from dspark.v1 import generation_pb2_grpc as pb_grpc

GRPC_DOCUMENTED = frozenset({"OK", "INVALID_ARGUMENT", "NOT_FOUND", "RESOURCE_EXHAUSTED", "UNAUTHENTICATED"})
# 413: aiohttp refuses bodies over `client_max_size` before any handler runs.
HTTP_DOCUMENTED = frozenset({200, 400, 401, 404, 413, 429})
MAX_MESSAGES = 3  # read this many stream messages, then cancel
INT32 = st.integers(-(2**31), 2**31 - 1)
UINT64 = st.integers(0, 2**64 - 1)
NASTY_FLOATS = st.floats(allow_nan=True, allow_infinity=True, width=32) | st.sampled_from([0.0, -0.0, 1.0, 1e-45])
TEXT = st.text(st.characters(exclude_categories=("Cs",)), max_size=300)  # protobuf cannot hold surrogates


def _settings(n: int, derandomize: bool = False) -> settings:
    # No example database: the harness runs against live servers and must not write files.
    return settings(max_examples=n, deadline=None, database=None, derandomize=derandomize,
                    suppress_health_check=list(HealthCheck))


# -- gRPC ---------------------------------------------------------------------------------

@st.composite
def generate_requests(draw: st.DrawFn) -> pb.GenerateRequest:
    req = pb.GenerateRequest()
    kind = draw(st.sampled_from(["text", "messages", "token_ids", "none", "huge"]))
    if kind == "text":
        req.text = draw(TEXT)
    elif kind == "huge":
        req.text = "x" * draw(st.sampled_from([1025, 2_000_000]))  # over the byte limit; near gRPC's 4 MiB
    elif kind == "messages":
        for role, content in draw(st.lists(st.tuples(st.sampled_from(["user", "system", "assistant", "", "tool"]),
                                                     TEXT), max_size=5)):
            req.messages.messages.add(role=role, content=content)
        req.messages.SetInParent()
    elif kind == "token_ids":
        req.token_ids.ids.extend(draw(st.lists(INT32, max_size=50)))
        req.token_ids.SetInParent()
    s = req.sampling
    for name, strat in (("temperature", NASTY_FLOATS), ("top_p", NASTY_FLOATS), ("top_k", INT32),
                        ("seed", UINT64), ("max_new_tokens", INT32 | st.integers(1, 16))):
        if draw(st.booleans()):
            setattr(s, name, draw(strat))
    req.model = draw(st.sampled_from(["", "fake"]) | TEXT)
    req.speculation.method = draw(st.sampled_from(["", "ar", "dspark"]) | TEXT)
    req.stop.stop_token_ids.extend(draw(st.lists(INT32, max_size=5)))
    req.request_id = draw(st.just("") | TEXT)
    return req


def _invalid_utf8_text() -> st.SearchStrategy[bytes]:
    # field 1 (text), wire type 2: a string field whose bytes are not UTF-8.
    body = st.binary(min_size=1, max_size=50).filter(lambda b: not _is_utf8(b))
    return body.map(lambda b: bytes([0x0A, len(b)]) + b)


def _is_utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


# reference(request, n): the first n tokens `request` must produce, or None when that is
# not known (e.g. sampled without a seed).
GrpcReference = Callable[[pb.GenerateRequest, int], "list[int] | None"]
HttpReference = Callable[[str, Any, int], "list[int] | None"]  # (path, parsed body, n)


def fuzz_grpc(channel_factory: Callable[[], grpc.Channel], n: int = 100,
              metadata: tuple[tuple[str, str], ...] | None = None, timeout_s: float = 30.0,
              documented: frozenset[str] = GRPC_DOCUMENTED,
              reference: GrpcReference | None = None, stats: dict[str, int] | None = None,
              derandomize: bool = False, examples: Sequence[tuple[str, Any]] = ()) -> dict[str, int]:
    """Send ~n random Generate/Resume/ListModels calls (typed and raw bytes); returns the
    count per status code. Fails on an undocumented code, a deadline (hang), a successful
    stream with a gap or repeat in its offsets or with tokens other than `reference`'s, or
    a server that is not SERVING afterwards. `stats` (if given) counts the streams whose
    offsets ("offsets_checked") and tokens ("tokens_checked") were checked. `derandomize`
    fixes the examples (the harness's own tests must see the same streams every run).
    `examples` are calls (("generate", request), ("raw", bytes), ...) sent before the random
    ones on every run, and each must succeed with tokens: random calls are mostly invalid,
    and whether any of them streams is luck, so a caller that needs checked streams names some."""
    seen: dict[str, int] = {}
    stats = {} if stats is None else stats
    with channel_factory() as channel:
        stub = pb_grpc.GenerationStub(channel)
        raw_generate = channel.unary_stream("/dspark.v1.Generation/Generate")  # bytes in, bytes out

        def check(code: grpc.StatusCode, what: str, required: bool = False) -> None:
            seen[code.name] = seen.get(code.name, 0) + 1
            assert code.name in documented, f"{what} -> undocumented {code.name}"
            assert not required or code == grpc.StatusCode.OK, f"{what}: a named example failed with {code.name}"

        def stream(call: Any, what: str, start: int = 0, request: pb.GenerateRequest | None = None,
                   required: bool = False) -> None:
            ids: list[int] = []
            try:
                for i, m in enumerate(call):
                    assert m.offset == start + len(ids), f"{what}: offset {m.offset} after {len(ids)} tokens"
                    ids += m.token_ids
                    if i + 1 >= MAX_MESSAGES:
                        call.cancel()
                        break
                check(grpc.StatusCode.OK, what)
            except grpc.RpcError as e:
                if e.code() != grpc.StatusCode.CANCELLED or not call.cancelled():
                    check(e.code(), f"{what}: {e.details()}", required)
                    return
                check(grpc.StatusCode.OK, what)  # our own cancel after MAX_MESSAGES
            assert ids or not required, f"{what}: a named example streamed no tokens"
            stats["offsets_checked"] = stats.get("offsets_checked", 0) + 1
            expected = None if reference is None or request is None or not ids else reference(request, len(ids))
            if expected is not None:
                assert ids == expected, f"{what}: streamed {ids}, the reference says {expected}"
                stats["tokens_checked"] = stats.get("tokens_checked", 0) + 1

        calls = st.one_of(
            generate_requests().map(lambda r: ("generate", r)),
            (st.binary(max_size=200) | _invalid_utf8_text()).map(lambda b: ("raw", b)),
            st.tuples(TEXT, INT32).map(lambda t: ("resume", pb.ResumeRequest(request_id=t[0], offset=t[1]))),
            st.just(("models", pb.ListModelsRequest())),
        )

        def one(call: tuple[str, Any]) -> None:
            kind, msg = call
            required = any(call is named for named in examples)  # a named example must succeed
            kw = {"metadata": metadata, "timeout": timeout_s}
            if kind == "generate":
                stream(stub.Generate(msg, **kw), f"Generate({_short(msg)})", request=msg, required=required)
            elif kind == "raw":
                raw = raw_generate(msg, **kw)
                stream(_parsed_stream(raw), f"Generate(raw {msg[:40]!r})", request=_parse_request(msg),
                       required=required)
            elif kind == "resume":
                stream(stub.Resume(msg, **kw), f"Resume({_short(msg)})", start=msg.offset, required=required)
            else:
                try:
                    stub.ListModels(msg, **kw)
                    check(grpc.StatusCode.OK, "ListModels")
                except grpc.RpcError as e:
                    check(e.code(), "ListModels", required)

        run = given(calls)(one)
        for call in reversed(examples):
            run = example(call)(run)
        _settings(n, derandomize)(run)()
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert health.status == health_pb2.HealthCheckResponse.SERVING, "server not SERVING after fuzzing"
    return seen


class _parsed_stream:  # noqa: N801 - wraps a raw call like a typed one
    """A raw-bytes response stream read as GenerateResponse messages (cancel passes through)."""

    def __init__(self, call: Any) -> None:
        self.call = call

    def __iter__(self) -> Any:
        return (pb.GenerateResponse.FromString(raw) for raw in self.call)

    def cancel(self) -> bool:
        return self.call.cancel()

    def cancelled(self) -> bool:
        return self.call.cancelled()


def _parse_request(raw: bytes) -> pb.GenerateRequest | None:
    try:
        return pb.GenerateRequest.FromString(raw)
    except Exception:  # noqa: BLE001 - not a GenerateRequest at all: no reference
        return None


def _short(msg: Any) -> str:
    text = str(msg).replace("\n", " ")
    return text if len(text) <= 200 else text[:197] + "..."


# -- HTTP ---------------------------------------------------------------------------------

JSON_SCALARS = (st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.sampled_from([10**400, -(10**30)])
                | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=50))
JSON_ANY = st.recursive(JSON_SCALARS, lambda inner: st.lists(inner, max_size=4)
                        | st.dictionaries(st.text(max_size=10), inner, max_size=4), max_leaves=10)


@st.composite
def openai_bodies(draw: st.DrawFn, chat: bool) -> bytes:
    """Half the bodies are plausible (valid values, maybe a bad one by chance), half wild
    (any field may hold any JSON), so both admission and generation paths get exercised."""
    wild = draw(st.booleans())

    def field(plausible: st.SearchStrategy[Any]) -> Any:
        return draw(plausible | JSON_ANY if wild else plausible)

    message = st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant"]),
                                     "content": st.text(min_size=1, max_size=100)})
    body: dict[str, Any] = {}
    if chat:
        body["messages"] = field(st.lists(message, min_size=1, max_size=4))
    else:
        body["prompt"] = field(st.text(min_size=1, max_size=200) | st.lists(st.integers(0, 999), min_size=1,
                                                                              max_size=20))
    optional = {
        "model": st.sampled_from(["", "fake"]), "max_tokens": st.integers(1, 16),
        "temperature": st.floats(0, 2), "top_p": st.floats(0.01, 1), "top_k": st.integers(0, 50),
        "seed": st.integers(0, 2**32), "stream": st.booleans(),
        "stop_token_ids": st.lists(st.integers(0, 999), max_size=3),
    }
    for name, plausible in optional.items():
        if draw(st.booleans()):
            body[name] = field(plausible)
    if wild and draw(st.booleans()):
        body = draw(JSON_ANY)  # not even an object, sometimes
    return json.dumps(body, allow_nan=True).encode()  # ASCII: lone surrogates travel as \\ud800 escapes


def _raw_bodies() -> st.SearchStrategy[bytes]:
    nested = st.integers(1, 200_000).map(lambda k: b"[" * k + b"]" * k)  # deep nesting
    huge_int = st.integers(4000, 20_000).map(lambda k: b'{"prompt": "a", "max_tokens": ' + b"9" * k + b"}")
    return st.binary(max_size=300) | nested | huge_int | st.just(b"x" * (2 * 2**20))


def fuzz_http(base_url: str, n: int = 100, headers: Mapping[str, str] | None = None, timeout_s: float = 30.0,
              documented: frozenset[int] = HTTP_DOCUMENTED, health_path: str = "/v1/models",
              reference: HttpReference | None = None, stats: dict[str, int] | None = None) -> dict[int, int]:
    """POST ~n random bodies (JSON of wrong types, huge numbers, raw and invalid-UTF-8
    bytes, deep nesting) to the completions endpoints; returns the count per HTTP status.
    Fails on an undocumented status, a timeout (hang), a successful answer whose token ids
    (whole JSON body, or the complete SSE events read) differ from `reference`'s, or a
    failing `health_path` after. `stats` counts the answers whose tokens were checked."""
    url = urlsplit(base_url)
    headers = dict(headers or {})
    seen: dict[int, int] = {}
    stats = {} if stats is None else stats

    def request(method: str, path: str, body: bytes | None) -> tuple[int, bytes]:
        conn_cls = http.client.HTTPSConnection if url.scheme == "https" else http.client.HTTPConnection
        conn = conn_cls(url.hostname, url.port, timeout=timeout_s)
        try:
            conn.request(method, path, body=body, headers={"Content-Type": "application/json", **headers})
            resp = conn.getresponse()
            # Enough for an error body or the first SSE events; then hang up.
            return resp.status, resp.read(4096)
        finally:
            conn.close()

    bodies = st.one_of(
        st.tuples(st.just("/v1/completions"), openai_bodies(chat=False)),
        st.tuples(st.just("/v1/chat/completions"), openai_bodies(chat=True)),
        st.tuples(st.sampled_from(["/v1/completions", "/v1/chat/completions"]), _raw_bodies()),
    )

    @_settings(n)
    @given(bodies)
    def one(case: tuple[str, bytes]) -> None:
        path, body = case
        status, answer = request("POST", path, body)
        seen[status] = seen.get(status, 0) + 1
        assert status in documented, f"POST {path} {body[:200]!r} -> undocumented HTTP {status}"
        ids = _answer_token_ids(answer) if status == 200 and reference is not None else None
        if ids:
            expected = reference(path, _json_or_none(body), len(ids))
            if expected is not None:
                assert ids == expected, f"POST {path} {body[:200]!r}: token ids {ids}, the reference says {expected}"
                stats["tokens_checked"] = stats.get("tokens_checked", 0) + 1

    one()
    assert request("GET", health_path, None)[0] == 200, "server unhealthy after fuzzing"
    return seen


def _json_or_none(body: bytes) -> Any:
    try:
        return json.loads(body)
    except ValueError:
        return None


def _answer_token_ids(answer: bytes) -> list[int] | None:
    """Token ids of a completions answer: a whole JSON body, or the complete SSE events
    among the bytes read (None when neither can be read whole)."""
    try:
        return list(json.loads(answer)["choices"][0]["token_ids"])
    except (ValueError, KeyError, IndexError, TypeError):
        pass
    ids, events = [], answer.split(b"\n\n")
    for event in events[:-1]:  # the last piece may be cut off
        if not event.startswith(b"data: ") or event == b"data: [DONE]":
            continue
        try:
            ids += json.loads(event[6:])["choices"][0]["token_ids"]
        except (ValueError, KeyError, IndexError, TypeError):
            return None
    return ids or None

