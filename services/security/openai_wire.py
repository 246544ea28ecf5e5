"""OpenAI `/v1/completions` and `/v1/chat/completions` bodies -> the neutral request mapping
of `validation.py`, refusing with a 400 that names it every field the fleet does not honour.

Each field of OpenAI's request schema is in one of three sets: honoured (mapped below),
`INERT` (identifiers that change no output, accepted), or refused unless it holds its
no-op value (`NO_OP`, e.g. `tools: []`, `response_format: {"type": "text"}`, `n`...).
A field in none of them is refused as unknown. docs/openai-compat.md lists them all.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from services.security.validation import invalid

_NONE = (None,)
# Refused fields, with the values that ask for nothing and are therefore accepted.
NO_OP: dict[str, Callable[[Any], bool]] = {
    "tools": lambda v: v in (None, []),
    "tool_choice": lambda v: v in (None, "none", "auto"),  # with no tools both mean "answer in text"
    "parallel_tool_calls": lambda v: v is None or isinstance(v, bool),  # meaningless without tools
    "functions": lambda v: v in (None, []),
    "function_call": lambda v: v in (None, "none", "auto"),
    "response_format": lambda v: v is None or v == {"type": "text"},
    "store": lambda v: v in (None, False),
    "metadata": lambda v: v in (None, {}),
    "service_tier": lambda v: v in (None, "auto", "default"),
    "modalities": lambda v: v in (None, ["text"]),
    "audio": lambda v: v in _NONE,
    "prediction": lambda v: v in _NONE,
    "reasoning_effort": lambda v: v in _NONE,
    "web_search_options": lambda v: v in _NONE,
    "verbosity": lambda v: v in _NONE,
    "echo": lambda v: v in (None, False),
    "best_of": lambda v: v in (None, 1),
    "suffix": lambda v: v in (None, ""),
}
# Identifiers for abuse monitoring or caching: they change no output.
INERT = frozenset({"user", "safety_identifier", "prompt_cache_key"})
COMMON = frozenset({"model", "stream", "stream_options", "temperature", "top_p", "n", "stop", "max_tokens",
                    "presence_penalty", "frequency_penalty", "logit_bias", "seed", "logprobs",
                    "top_k", "stop_token_ids", "ignore_eos"})  # the last three: vLLM's extensions
CHAT_ONLY = frozenset({"messages", "max_completion_tokens", "top_logprobs"})
COMPLETIONS_ONLY = frozenset({"prompt"})
CHAT_REFUSED = frozenset(NO_OP) - {"echo", "best_of", "suffix"}
COMPLETIONS_REFUSED = frozenset({"echo", "best_of", "suffix"})
MESSAGE_NO_OP: dict[str, Callable[[Any], bool]] = {
    "tool_calls": lambda v: v in (None, []), "function_call": lambda v: v is None,
    "refusal": lambda v: v is None, "audio": lambda v: v is None,
}
MAX_COMPLETION_LOGPROBS = 5  # OpenAI's limit for /v1/completions


def from_openai(body: Any, chat: bool) -> dict[str, Any]:
    """An OpenAI request body -> the neutral mapping (`validation.validate_request`)."""
    if not isinstance(body, Mapping):
        raise invalid("the body must be a JSON object")
    _check_fields(body, chat)
    out: dict[str, Any] = {k: body.get(k) for k in ("model", "top_p", "top_k", "stop_token_ids", "n",
                                                     "presence_penalty", "frequency_penalty", "logit_bias")}
    out["temperature"] = body.get("temperature", 1.0)  # OpenAI's default samples; gRPC's is greedy
    if out["temperature"] is None:
        out["temperature"] = 1.0
    out["max_new_tokens"] = body.get("max_completion_tokens", body.get("max_tokens")) if chat \
        else body.get("max_tokens")
    out["seed"] = _seed(body.get("seed"))
    out["stop"] = body.get("stop")
    out["ignore_eos"] = body.get("ignore_eos")
    out["stream"] = body.get("stream")
    out["include_usage"] = _stream_options(body)
    out["logprobs"] = _chat_logprobs(body) if chat else _completion_logprobs(body.get("logprobs"))
    if chat:
        out["messages"] = _messages(body.get("messages"))
    else:
        _prompt(body.get("prompt"), out)
    return out


def openai_param(param: str | None, body: Any) -> str | None:
    """The OpenAI name of a neutral field that `validate_request` refused."""
    if param == "max_new_tokens" and isinstance(body, Mapping):
        return "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    return "prompt" if param in ("text", "token_ids") else param


def _check_fields(body: Mapping[str, Any], chat: bool) -> None:
    known = COMMON | INERT | (CHAT_ONLY | CHAT_REFUSED if chat else COMPLETIONS_ONLY | COMPLETIONS_REFUSED)
    for name, value in body.items():
        if name not in known:
            raise invalid(f"unrecognized request argument supplied: {name}", name)
        if name in NO_OP and not NO_OP[name](value):
            raise invalid(f"`{name}` is not supported by this server", name)
        if name in INERT and value is not None and not isinstance(value, str):
            raise invalid(f"{name} must be a string", name)


def _seed(value: Any) -> Any:
    # OpenAI's seed is any int64; the RNG takes 64 bits, so a negative seed is its two's complement.
    if isinstance(value, int) and not isinstance(value, bool) and -(2**63) <= value < 0:
        return value + 2**64
    return value


def _stream_options(body: Mapping[str, Any]) -> Any:
    opts = body.get("stream_options")
    if opts is None:
        return None
    if not isinstance(opts, Mapping):
        raise invalid("stream_options must be an object", "stream_options")
    if body.get("stream") is not True:
        raise invalid("stream_options is only allowed with stream: true", "stream_options")
    for key, value in opts.items():
        if key != "include_usage" and not (key == "include_obfuscation" and value in (None, False)):
            raise invalid(f"stream_options.{key} is not supported", f"stream_options.{key}")
    return opts.get("include_usage")


def _chat_logprobs(body: Mapping[str, Any]) -> Any:
    """Chat: `logprobs: true` turns them on, `top_logprobs` (0-20) adds alternatives."""
    on, top = body.get("logprobs"), body.get("top_logprobs")
    if on is not None and not isinstance(on, bool):
        raise invalid("logprobs must be true or false", "logprobs")
    if top is not None and not on:
        raise invalid("top_logprobs requires logprobs: true", "top_logprobs")
    if not on:
        return None
    if top is None:
        return 0
    if isinstance(top, bool) or not isinstance(top, int):
        raise invalid("top_logprobs must be an integer", "top_logprobs")
    if not 0 <= top <= 20:
        raise invalid("top_logprobs must be in [0, 20]", "top_logprobs")
    return top


def _completion_logprobs(value: Any) -> Any:
    """Completions: `logprobs: k` (0-5) returns the chosen token and k alternatives."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_COMPLETION_LOGPROBS:
        raise invalid(f"logprobs must be an integer in [0, {MAX_COMPLETION_LOGPROBS}]", "logprobs")
    return value


def _prompt(p: Any, out: dict[str, Any]) -> None:
    if isinstance(p, list) and len(p) == 1 and isinstance(p[0], str | list):
        p = p[0]  # a batch of one prompt
    if isinstance(p, list) and p and all(isinstance(t, list) for t in p) or \
            isinstance(p, list) and len(p) > 1 and all(isinstance(t, str) for t in p):
        raise invalid("a batch of several prompts is not supported: send one request per prompt", "prompt")
    if isinstance(p, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
        out["token_ids"] = p
    elif isinstance(p, str):
        out["text"] = p
    else:
        raise invalid("`prompt` must be a string or a list of token ids", "prompt")


def _messages(messages: Any) -> Any:
    """Content-part arrays become plain text (parts joined by newlines); only text parts and
    the roles system, developer, user and assistant are accepted."""
    if messages is None:
        raise invalid("`messages` is required", "messages")
    if not isinstance(messages, list):
        return messages  # validate_request names the type error
    return [_message(m, i) for i, m in enumerate(messages)]


def _message(m: Any, i: int) -> Any:
    if not isinstance(m, Mapping):
        return m
    for key, value in m.items():
        if key in ("role", "content"):
            continue
        if key not in MESSAGE_NO_OP or not MESSAGE_NO_OP[key](value):
            raise invalid(f"messages[{i}].{key} is not supported", f"messages[{i}].{key}")
    if m.get("role") in ("tool", "function"):
        raise invalid(f"messages[{i}].role {m['role']!r} is not supported (no tool calling)", f"messages[{i}].role")
    content = m.get("content")
    if isinstance(content, list):
        content = "\n".join(_text_part(part, i, j) for j, part in enumerate(content))
    return {"role": m.get("role"), "content": content}


def _text_part(part: Any, i: int, j: int) -> str:
    where = f"messages[{i}].content[{j}]"
    if not isinstance(part, Mapping) or part.get("type") != "text":
        kind = part.get("type") if isinstance(part, Mapping) else type(part).__name__
        raise invalid(f"{where}: only text content parts are supported, not {kind!r}", f"{where}.type")
    if set(part) - {"type", "text"}:
        raise invalid(f"{where}: unsupported keys {sorted(set(part) - {'type', 'text'})}", where)
    if not isinstance(part.get("text"), str):
        raise invalid(f"{where}.text must be a string", f"{where}.text")
    return part["text"]
