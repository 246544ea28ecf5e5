"""Validate one generation request at the fleet's edge, before any tokenizer or worker runs.

Both fronts first turn their wire format into one neutral mapping (`from_proto` here,
`from_openai` in `openai_wire.py`, which also refuses OpenAI fields the fleet does not
honour), then call `validate_request`, which either returns a `ValidRequest` or raises
`RequestError(code, message, param)`; `param` names the offending field. Codes are gRPC status names; `grpc_status` and
`http_status` map them onto each transport so both fronts answer the same failure alike.

Everything here is a pure function of its inputs: no I/O, no clock, no model.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

# The only codes a client of the public API may see (besides OK); docs and fuzz tests use it.
HTTP_STATUS: dict[str, int] = {
    "INVALID_ARGUMENT": 400,
    "UNAUTHENTICATED": 401,
    "NOT_FOUND": 404,
    "RESOURCE_EXHAUSTED": 429,
    "CANCELLED": 499,  # nginx's "client closed request": the client went away
    "UNAVAILABLE": 503,
    "DEADLINE_EXCEEDED": 504,
}
CODES = frozenset(HTTP_STATUS)

ROLES = frozenset({"system", "developer", "user", "assistant"})  # developer = system (OpenAI)
INT32_MAX = 2**31 - 1
# Below this, logits / temperature overflows float32 to inf and sampling turns to NaN (found
# by fuzzing the real fleet with temperature=1e-45); 0 means greedy.
MIN_TEMPERATURE = 1e-3
MAX_TEMPERATURE = 2.0  # OpenAI's range, on both fronts
UINT64_MAX = 2**64 - 1
MAX_LOGPROBS = 20  # alternatives per token (OpenAI's top_logprobs limit)
MAX_BLOCK_SIZE = 64


class RequestError(Exception):
    """A request the fleet refuses; `code` is one of `CODES` (a gRPC status name), `param`
    the request field at fault (OpenAI's error `param`), when there is one."""

    def __init__(self, code: str, message: str, param: str | None = None) -> None:
        if code not in CODES:
            raise ValueError(f"undocumented status code {code!r}")
        super().__init__(message)
        self.code, self.message, self.param = code, message, param

    @property
    def http_status(self) -> int:
        return http_status(self.code)


def http_status(code: str) -> int:
    return HTTP_STATUS[code]


def grpc_status(code: str) -> Any:  # -> grpc.StatusCode; grpc imported lazily (pure module)
    import grpc

    if code not in CODES:
        raise ValueError(f"undocumented status code {code!r}")
    return getattr(grpc.StatusCode, code)


def invalid(message: str, param: str | None = None) -> RequestError:
    return RequestError("INVALID_ARGUMENT", message, param)


@dataclasses.dataclass(frozen=True)
class RequestLimits:
    """What this fleet accepts; the router fills it from its config and the target's info."""

    max_context: int  # tokens one KV slot holds (prompt + output)
    max_new_tokens: int  # hard cap per request
    default_max_new_tokens: int = 128
    max_prompt_bytes: int = 1 << 20  # UTF-8 bytes of text, or summed message contents
    max_messages: int = 1024
    max_stop_token_ids: int = 64
    max_stop_strings: int = 64
    max_stop_chars: int = 256  # per stop string
    max_logit_bias: int = 1024  # entries
    max_n: int = 16  # parallel choices per request
    vocab_size: int | None = None  # token ids must lie in [0, vocab_size) when known
    models: frozenset[str] = frozenset()  # empty = any name accepted ("" = default model)
    methods: frozenset[str] = frozenset()  # empty = any method accepted ("" = default)
    max_block_size: int = MAX_BLOCK_SIZE  # the fleet's own K: a request may ask for fewer drafts
    verify_policies: frozenset[str] = frozenset()  # accepted names; empty = any
    confidence_threshold: float | None = None  # the one threshold accepted; None = any


@dataclasses.dataclass(frozen=True)
class ValidRequest:
    """Exactly one of text / messages / token_ids is set."""

    text: str | None
    messages: tuple[tuple[str, str], ...] | None  # (role, content)
    token_ids: tuple[int, ...] | None
    model: str
    method: str
    temperature: float
    top_p: float
    top_k: int
    seed: int | None
    max_new_tokens: int
    stop_token_ids: tuple[int, ...]
    num_prompt_tokens: int | None  # known for token_ids, or when a counter was given
    stop: tuple[str, ...] = ()
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    logprobs: int | None = None  # None: off; k: chosen token + k alternatives
    n: int = 1
    ignore_eos: bool = False
    block_size: int | None = None  # None: the fleet's
    stream: bool = False  # OpenAI presentation: SSE
    include_usage: bool = False  # OpenAI presentation: a final usage chunk


def validate_request(raw: Mapping[str, Any], limits: RequestLimits,
                     count_tokens: Callable[[ValidRequest], int] | None = None) -> ValidRequest:
    """`raw` holds at most one of `text` (str, or bytes that must be UTF-8), `messages`
    (list of {role, content}) and `token_ids`, plus optional `model`, `method`,
    `temperature`, `top_p`, `top_k`, `seed`, `max_new_tokens`, `stop_token_ids`, `stop`,
    `presence_penalty`, `frequency_penalty`, `logit_bias` ({token id: bias}), `logprobs`,
    `n`, `ignore_eos`, `block_size`, `verify_policy`, `confidence_threshold`, `stream`,
    `include_usage`. `None` means "use the default". `count_tokens` (e.g. the tokenizer)
    lets the prompt-vs-context check run for text and chat prompts too."""
    if not isinstance(raw, Mapping):
        raise invalid("the request must be an object")
    text, messages, token_ids = _prompt(raw, limits)
    _check_speculation(raw, limits)
    req = ValidRequest(
        text=text, messages=messages, token_ids=token_ids,
        model=_name(raw.get("model"), "model"), method=_name(raw.get("method"), "method"),
        temperature=_float(raw.get("temperature"), "temperature", 0.0, lo=0.0, hi=MAX_TEMPERATURE),
        top_p=_float(raw.get("top_p"), "top_p", 1.0, lo=0.0, hi=1.0, lo_open=True),
        top_k=_int(raw.get("top_k"), "top_k", 0, lo=0, hi=INT32_MAX),
        seed=_int(raw.get("seed"), "seed", None, lo=0, hi=UINT64_MAX),
        max_new_tokens=_int(raw.get("max_new_tokens"), "max_new_tokens", limits.default_max_new_tokens,
                            lo=1, hi=INT32_MAX),
        stop_token_ids=_ids(raw.get("stop_token_ids"), "stop_token_ids", limits, limits.max_stop_token_ids,
                            allow_empty=True),
        num_prompt_tokens=len(token_ids) if token_ids is not None else None,
        stop=_stop(raw.get("stop"), limits),
        presence_penalty=_float(raw.get("presence_penalty"), "presence_penalty", 0.0, lo=-2.0, hi=2.0),
        frequency_penalty=_float(raw.get("frequency_penalty"), "frequency_penalty", 0.0, lo=-2.0, hi=2.0),
        logit_bias=_logit_bias(raw.get("logit_bias"), limits),
        logprobs=_int(raw.get("logprobs"), "logprobs", None, lo=0, hi=MAX_LOGPROBS),
        n=_int(raw.get("n"), "n", 1, lo=1, hi=limits.max_n),
        ignore_eos=_bool(raw.get("ignore_eos"), "ignore_eos"),
        block_size=_int(raw.get("block_size"), "block_size", None, lo=0, hi=limits.max_block_size),
        stream=_bool(raw.get("stream"), "stream"),
        include_usage=_bool(raw.get("include_usage"), "stream_options.include_usage"))
    if 0 < req.temperature < MIN_TEMPERATURE:
        raise invalid(f"temperature must be 0 (greedy) or at least {MIN_TEMPERATURE}, got {req.temperature!r}",
                      "temperature")
    if limits.models and req.model and req.model not in limits.models:
        raise RequestError("NOT_FOUND", f"model {req.model!r} is not served here", "model")
    if limits.methods and req.method and req.method not in limits.methods:
        raise invalid(f"method {req.method!r} is not this fleet's: it runs "
                      f"{'|'.join(sorted(limits.methods))}", "method")
    if req.max_new_tokens > limits.max_new_tokens:
        raise invalid(f"max_new_tokens {req.max_new_tokens} exceeds this fleet's limit {limits.max_new_tokens}",
                      "max_new_tokens")
    if req.num_prompt_tokens is None and count_tokens is not None:
        req = dataclasses.replace(req, num_prompt_tokens=count_tokens(req))
    if req.num_prompt_tokens is not None:
        check_prompt_tokens(req.num_prompt_tokens, limits)
    return req


def _check_speculation(raw: Mapping[str, Any], limits: RequestLimits) -> None:
    """The target verifies a whole batch with one policy: a request may name it, not change it."""
    policy = _name(raw.get("verify_policy"), "verify_policy")
    if policy and limits.verify_policies and policy not in limits.verify_policies:
        raise invalid(f"verify_policy {policy!r} is not this fleet's: it verifies with "
                      f"{'|'.join(sorted(limits.verify_policies))}", "verify_policy")
    threshold = raw.get("confidence_threshold")
    if threshold is not None:
        t = _float(threshold, "confidence_threshold", 0.0, lo=0.0, hi=1.0)
        if limits.confidence_threshold is not None and t != limits.confidence_threshold:
            raise invalid(f"this fleet's confidence threshold is {limits.confidence_threshold}; a request "
                          "cannot change it", "confidence_threshold")
        if limits.verify_policies and "threshold" not in limits.verify_policies:
            raise invalid("confidence_threshold applies to the threshold policy, which this fleet does not run",
                          "confidence_threshold")


def _stop(value: Any, limits: RequestLimits) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, Sequence) or isinstance(value, bytes):
        raise invalid("stop must be a string or a list of strings", "stop")
    if len(value) > limits.max_stop_strings:
        raise invalid(f"stop has {len(value)} strings; the limit is {limits.max_stop_strings}", "stop")
    out = []
    for s in value:
        s = _utf8(s, "stop")
        if not s or len(s) > limits.max_stop_chars:
            raise invalid(f"each stop string must have 1-{limits.max_stop_chars} characters", "stop")
        out.append(s)
    return tuple(out)


def _logit_bias(value: Any, limits: RequestLimits) -> tuple[tuple[int, float], ...]:
    """{token id (int, or its decimal string as JSON keys are): bias in [-100, 100]}."""
    if value is None:
        return ()
    if not isinstance(value, Mapping):
        raise invalid("logit_bias must map token ids to numbers", "logit_bias")
    if len(value) > limits.max_logit_bias:
        raise invalid(f"logit_bias has {len(value)} entries; the limit is {limits.max_logit_bias}", "logit_bias")
    hi = (limits.vocab_size or INT32_MAX + 1) - 1
    out = {}
    for key, bias in value.items():
        token = int(key) if isinstance(key, str) and key.strip().isdigit() else key
        out[_int(token, "logit_bias", 0, lo=0, hi=hi)] = _float(bias, "logit_bias", 0.0, lo=-100.0, hi=100.0)
    return tuple(sorted(out.items()))


def _bool(value: Any, field: str) -> bool:
    if value is None:
        return False
    if not isinstance(value, bool):
        raise invalid(f"{field} must be true or false", field)
    return value


def check_prompt_tokens(num_prompt_tokens: int, limits: RequestLimits) -> None:
    """After tokenization: the prompt must be non-empty and leave room for >= 1 new token."""
    if num_prompt_tokens == 0:
        raise invalid("the prompt is empty")
    if num_prompt_tokens >= limits.max_context:
        raise invalid(f"prompt has {num_prompt_tokens} tokens; the context holds {limits.max_context}")


def _prompt(raw: Mapping[str, Any], limits: RequestLimits
            ) -> tuple[str | None, tuple[tuple[str, str], ...] | None, tuple[int, ...] | None]:
    given = [k for k in ("text", "messages", "token_ids") if raw.get(k) is not None]
    if len(given) != 1:
        raise invalid("give exactly one of text, messages, token_ids")
    kind = given[0]
    if kind == "text":
        text = _utf8(raw["text"], "text")
        if not text:
            raise invalid("the prompt is empty")
        _check_size(len(text.encode("utf-8")), limits)
        return text, None, None
    if kind == "messages":
        return None, _messages(raw["messages"], limits), None
    ids = _ids(raw["token_ids"], "token_ids", limits, limits.max_context, allow_empty=False)
    return None, None, ids


def _utf8(value: Any, field: str) -> str:
    # Bytes come from transports that do not decode for us; reject, never replace, bad UTF-8.
    if isinstance(value, bytes | bytearray):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError as e:
            raise invalid(f"{field} is not valid UTF-8 (byte {e.start})", field) from None
    if not isinstance(value, str):
        raise invalid(f"{field} must be a string", field)
    try:
        value.encode("utf-8")  # lone surrogates (e.g. from JSON "\ud800") cannot be encoded
    except UnicodeEncodeError:
        raise invalid(f"{field} is not valid UTF-8 (lone surrogate)", field) from None
    return value


def _check_size(num_bytes: int, limits: RequestLimits) -> None:
    if num_bytes > limits.max_prompt_bytes:
        raise invalid(f"prompt is {num_bytes} bytes; the limit is {limits.max_prompt_bytes}")


def _messages(value: Any, limits: RequestLimits) -> tuple[tuple[str, str], ...]:
    if not isinstance(value, Sequence) or isinstance(value, str | bytes) or not value:
        raise invalid("messages must be a non-empty list", "messages")
    if len(value) > limits.max_messages:
        raise invalid(f"{len(value)} messages; the limit is {limits.max_messages}", "messages")
    out, size = [], 0
    for m in value:
        if not isinstance(m, Mapping) or m.get("role") not in ROLES:
            raise invalid("each message needs a role (system|developer|user|assistant) and string content",
                          "messages")
        content = _utf8(m.get("content"), "messages")
        size += len(content.encode("utf-8"))
        out.append(("system" if m["role"] == "developer" else m["role"], content))
    _check_size(size, limits)
    if not any(c for _, c in out):
        raise invalid("the prompt is empty")
    return tuple(out)


def _ids(value: Any, field: str, limits: RequestLimits, max_len: int, allow_empty: bool) -> tuple[int, ...]:
    if value is None:
        value = ()
    if not isinstance(value, Sequence) or isinstance(value, str | bytes):
        raise invalid(f"{field} must be a list of integers", field)
    if not value and not allow_empty:
        raise invalid("the prompt is empty")
    if len(value) > max_len:
        raise invalid(f"{field} has {len(value)} entries; the limit is {max_len}", field)
    hi = (limits.vocab_size or INT32_MAX + 1) - 1
    return tuple(_int(v, field, 0, lo=0, hi=hi) for v in value)


def _name(value: Any, field: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str) or len(value) > 256 or not value.isprintable():
        raise invalid(f"{field} must be a printable string of at most 256 characters", field)
    return value


def _float(value: Any, field: str, default: float, *, lo: float, hi: float, lo_open: bool = False) -> float:
    if value is None:
        return default
    # bool is an int subclass: `true` as a temperature is a type error, not 1.0.
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise invalid(f"{field} must be a number", field)
    try:
        x = float(value)
    except OverflowError:  # an int too large for a double
        raise invalid(f"{field} is out of range", field) from None
    if not math.isfinite(x) or x < lo or x > hi or (lo_open and x == lo):
        raise invalid(f"{field} must be in {'(' if lo_open else '['}{lo}, {hi}], got {value!r}", field)
    return x


def _int(value: Any, field: str, default: int | None, *, lo: int, hi: int) -> Any:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise invalid(f"{field} must be an integer", field)
    if not lo <= value <= hi:
        raise invalid(f"{field} must be in [{lo}, {hi}]", field)
    return int(value)


# -- wire formats -> the neutral mapping --------------------------------------------------

def parse_json(data: bytes) -> Any:
    """HTTP body -> JSON value, or INVALID_ARGUMENT. Catches RecursionError too: a body of
    100k nested `[` (well under 1 MiB) exhausts the C decoder's stack limit, and aiohttp's
    `request.json()` would let that escape as HTTP 500."""
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError):  # JSONDecodeError is a ValueError
        raise invalid("the body is not valid JSON") from None


def from_proto(req: Any) -> dict[str, Any]:
    """`dspark.v1.GenerateRequest` -> mapping; unset optional fields become None (defaults)."""
    kind = req.WhichOneof("prompt")
    s, sp = req.sampling, req.speculation
    out: dict[str, Any] = {name: getattr(s, name) if s.HasField(name) else None
                           for name in ("temperature", "top_p", "top_k", "seed", "max_new_tokens",
                                        "presence_penalty", "frequency_penalty", "logprobs")}
    out.update(model=req.model, method=sp.method, stop_token_ids=list(req.stop.stop_token_ids),
               stop=list(req.stop.stop), ignore_eos=req.stop.ignore_eos, logit_bias=dict(s.logit_bias),
               block_size=sp.block_size if sp.HasField("block_size") else None, verify_policy=sp.verify_policy,
               confidence_threshold=sp.confidence_threshold if sp.HasField("confidence_threshold") else None)
    if kind == "text":
        out["text"] = req.text
    elif kind == "messages":
        out["messages"] = [{"role": m.role, "content": m.content} for m in req.messages.messages]
    elif kind == "token_ids":
        out["token_ids"] = list(req.token_ids.ids)
    return out
