"""Turn a client's request (gRPC or OpenAI JSON) into a validated `RequestSpec`."""

from __future__ import annotations

import dataclasses
import uuid
from typing import Any

from dspark.errors import UserError
from dspark.models.tokenizer import Tokenizer
from dspark.spec.sampling import SamplingParams
from services.config import FleetConfig
from services.router.errors import RouterError

MAX_REQUEST_ID_LEN = 128


@dataclasses.dataclass(frozen=True)
class RequestSpec:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    owner: str = ""  # API key name that sent it: only that key may Resume it


@dataclasses.dataclass(frozen=True)
class Limits:
    model: str
    method: str
    max_context: int  # tokens a target KV slot holds
    max_new_tokens: int
    default_max_new_tokens: int
    vocab_size: int

    @classmethod
    def of(cls, cfg: FleetConfig, max_context: int, vocab_size: int) -> Limits:
        return cls(cfg.model, cfg.method, max_context, cfg.max_new_tokens, cfg.default_max_new_tokens,
                   vocab_size)


def invalid(message: str) -> RouterError:
    return RouterError("INVALID_ARGUMENT", message)


def encode_prompt(tokenizer: Tokenizer, text: str | None = None,
                  messages: list[dict[str, Any]] | None = None,
                  token_ids: list[int] | None = None) -> list[int]:
    if messages is not None:
        for m in messages:
            if not isinstance(m, dict) or not isinstance(m.get("content"), str) or \
                    m.get("role") not in ("system", "user", "assistant"):
                raise invalid("each message needs a role (system|user|assistant) and string content")
        return tokenizer.apply_chat_template(messages) if messages else []
    if token_ids is not None:
        return [int(t) for t in token_ids]
    return tokenizer.encode(text or "")


def make_spec(limits: Limits, prompt_ids: list[int], *, model: str = "", method: str = "",
              temperature: float | None = None, top_p: float | None = None, top_k: int | None = None,
              seed: int | None = None, max_new_tokens: int | None = None,
              stop_token_ids: tuple[int, ...] = (), ignore_eos: bool = False,
              request_id: str = "", owner: str = "") -> RequestSpec:
    if model and model != limits.model:
        raise RouterError("NOT_FOUND", f"model {model!r} is not served here (serving {limits.model!r})")
    if method and method != limits.method:
        raise invalid(f"this fleet runs method {limits.method!r}, not {method!r}")
    if not prompt_ids:
        raise invalid("the prompt is empty")
    if len(prompt_ids) >= limits.max_context:
        raise invalid(f"prompt has {len(prompt_ids)} tokens; the context holds {limits.max_context}")
    if any(not 0 <= t < limits.vocab_size for t in (*prompt_ids, *stop_token_ids)):
        raise invalid(f"token ids must be in [0, {limits.vocab_size})")
    n = limits.default_max_new_tokens if max_new_tokens is None else max_new_tokens
    if n > limits.max_new_tokens:
        raise invalid(f"max_new_tokens {n} exceeds this fleet's limit {limits.max_new_tokens}")
    if len(request_id) > MAX_REQUEST_ID_LEN or not request_id.isprintable():
        raise invalid("request_id must be printable and at most 128 characters")
    try:
        params = SamplingParams(
            temperature=0.0 if temperature is None else float(temperature),
            top_p=1.0 if top_p is None else float(top_p), top_k=top_k or 0,
            seed=seed, max_new_tokens=n, stop_token_ids=tuple(stop_token_ids), ignore_eos=ignore_eos)
    except (UserError, TypeError, ValueError) as e:
        raise invalid(str(e)) from None
    return RequestSpec(request_id or uuid.uuid4().hex, list(prompt_ids), params, owner or "")
