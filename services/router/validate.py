"""Turn a validated request (`services.security.validation.ValidRequest`, from gRPC or OpenAI
JSON) into the router's `RequestSpec`: prompt token ids and the library's `SamplingParams`."""

from __future__ import annotations

import dataclasses
import json
import uuid
from typing import Any

from dspark.errors import UserError
from dspark.models.tokenizer import Tokenizer
from dspark.spec.sampling import SamplingParams
from services.config import FleetConfig
from services.router.errors import RouterError
from services.security.validation import ValidRequest

MAX_REQUEST_ID_LEN = 128


@dataclasses.dataclass(frozen=True)
class RequestSpec:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    owner: str = ""  # API key name that sent it: only that key may Resume it
    block_size: int | None = None  # at most this many drafts per step (None: the fleet's K)

    @property
    def worker_params(self) -> SamplingParams:
        """What prefill / target / drafter workers get: stop strings are the router's job
        (it detokenizes), so workers see none and never need a tokenizer."""
        return dataclasses.replace(self.params, stop=()) if self.params.stop else self.params


@dataclasses.dataclass(frozen=True)
class Limits:
    model: str
    method: str
    max_context: int  # tokens a target KV slot holds
    max_new_tokens: int
    default_max_new_tokens: int
    vocab_size: int
    block_size: int = 7
    verify_policy: str = "fixed"
    confidence_threshold: float = 0.5

    @classmethod
    def of(cls, cfg: FleetConfig, max_context: int, vocab_size: int) -> Limits:
        return cls(cfg.model, cfg.method, max_context, cfg.max_new_tokens, cfg.default_max_new_tokens,
                   vocab_size, cfg.block_size, cfg.verify_policy, cfg.confidence_threshold)


def invalid(message: str, param: str | None = None) -> RouterError:
    return RouterError("INVALID_ARGUMENT", message, param)


def encode_prompt(tokenizer: Tokenizer, req: ValidRequest) -> list[int]:
    if req.messages is not None:
        return tokenizer.apply_chat_template([{"role": r, "content": c} for r, c in req.messages])
    if req.token_ids is not None:
        return list(req.token_ids)
    return tokenizer.encode(req.text or "")


def make_spec(limits: Limits, req: ValidRequest, prompt_ids: list[int], request_id: str = "",
              owner: str = "", choice: int = 0) -> RequestSpec:
    """`choice` > 0 is the choice-th of n parallel sequences: its own request id and, with a
    seed, its own seed (seed + choice), so the n choices differ but replay exactly."""
    if not prompt_ids:
        raise invalid("the prompt is empty", "prompt")
    if len(prompt_ids) >= limits.max_context:
        raise invalid(f"prompt has {len(prompt_ids)} tokens; the context holds {limits.max_context}", "prompt")
    if any(not 0 <= t < limits.vocab_size for t in prompt_ids):
        raise invalid(f"token ids must be in [0, {limits.vocab_size})", "prompt")
    if len(request_id) > MAX_REQUEST_ID_LEN or not request_id.isprintable():
        raise invalid("request_id must be printable and at most 128 characters", "request_id")
    seed = None if req.seed is None else (req.seed + choice) % 2**64
    try:
        params = SamplingParams(
            temperature=req.temperature, top_p=req.top_p, top_k=req.top_k, seed=seed,
            max_new_tokens=req.max_new_tokens, stop_token_ids=req.stop_token_ids, ignore_eos=req.ignore_eos,
            stop=req.stop, presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty,
            logit_bias=req.logit_bias, logprobs=req.logprobs)
    except (UserError, TypeError, ValueError) as e:
        raise invalid(str(e)) from None
    rid = request_id or uuid.uuid4().hex
    return RequestSpec(rid if choice == 0 else f"{rid}-{choice}", list(prompt_ids), params, owner or "",
                       req.block_size)


def params_to_json(params: SamplingParams) -> str:
    return json.dumps(dataclasses.asdict(params))


def params_from_json(text: str) -> SamplingParams:
    """Inverse of `params_to_json` (JSON turned the tuples into lists)."""
    p: dict[str, Any] = json.loads(text)
    for name in ("stop_token_ids", "stop"):
        p[name] = tuple(p.get(name) or ())
    p["logit_bias"] = tuple((int(t), float(b)) for t, b in p.get("logit_bias") or ())
    return SamplingParams(**p)
