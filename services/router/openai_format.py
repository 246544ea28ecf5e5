"""OpenAI response shapes for /v1/completions and /v1/chat/completions, streamed or not.

One `Reply` per request fixes what every chunk repeats (id, one `created`, model,
`system_fingerprint`). Each choice also carries `token_ids` (an extension, like vLLM's) so
clients can check exactness; `usage.mean_accepted_length` is the speculation extension.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from dspark.spec.logits import TokenLogprob
from services.router.loop import StepEvent


@dataclasses.dataclass
class Choice:
    """What one of the n choices has produced so far."""

    index: int
    text: str = ""
    token_ids: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[TokenLogprob] = dataclasses.field(default_factory=list)
    finish_reason: str | None = None
    num_target_forwards: int = 0
    sent_role: bool = False  # chat streams announce the role in a choice's first chunk only

    def add(self, ev: StepEvent) -> None:
        self.text += ev.text
        self.token_ids += ev.token_ids
        self.logprobs += ev.logprobs or []
        if ev.finish_reason:
            self.finish_reason = ev.finish_reason
            self.num_target_forwards = ev.num_target_forwards


@dataclasses.dataclass(frozen=True)
class Reply:
    chat: bool
    request_id: str
    created: int
    model: str
    fingerprint: str
    want_logprobs: bool
    token_text: Callable[[int], str]

    def _head(self, obj: str) -> dict[str, Any]:
        return {"id": self.request_id, "object": obj, "created": self.created, "model": self.model,
                "system_fingerprint": self.fingerprint}

    # -- whole responses ---------------------------------------------------------------------
    def body(self, choices: list[Choice], prompt_tokens: int) -> dict[str, Any]:
        out = self._head("chat.completion" if self.chat else "text_completion")
        out["choices"] = [self._choice(c, c.text, c.token_ids, c.logprobs, c.finish_reason, delta=False)
                          for c in choices]
        out["usage"] = usage(choices, prompt_tokens)
        return out

    # -- stream chunks -----------------------------------------------------------------------
    def chunk(self, choice: Choice, ev: StepEvent, include_usage: bool) -> dict[str, Any]:
        out = self._head("chat.completion.chunk" if self.chat else "text_completion")
        out["choices"] = [self._choice(choice, ev.text, ev.token_ids, ev.logprobs or [], ev.finish_reason,
                                       delta=True)]
        if include_usage:
            out["usage"] = None  # OpenAI: null on every chunk but the final usage chunk
        return out

    def usage_chunk(self, choices: list[Choice], prompt_tokens: int) -> dict[str, Any]:
        out = self._head("chat.completion.chunk" if self.chat else "text_completion")
        out["choices"] = []
        out["usage"] = usage(choices, prompt_tokens)
        return out

    def _choice(self, choice: Choice, text: str, token_ids: list[int], logprobs: list[TokenLogprob],
                finish_reason: str | None, delta: bool) -> dict[str, Any]:
        out: dict[str, Any] = {"index": choice.index}
        if not self.chat:
            out["text"] = text
        elif delta:
            out["delta"] = {"content": text} if choice.sent_role else {"role": "assistant", "content": text}
            choice.sent_role = True
        else:
            out["message"] = {"role": "assistant", "content": text, "refusal": None}
        out["logprobs"] = self._logprobs(logprobs, choice, text) if self.want_logprobs else None
        out["finish_reason"] = finish_reason
        out["token_ids"] = list(token_ids)
        return out

    def _logprobs(self, logprobs: list[TokenLogprob], choice: Choice, text: str) -> dict[str, Any]:
        if self.chat:
            return {"content": [self._chat_entry(lp) for lp in logprobs], "refusal": None}
        tokens = [self.token_text(lp.token_id) for lp in logprobs]
        offsets, at = [], len(choice.text) - len(text)  # where this chunk's text starts (added already)
        for t in tokens:
            offsets.append(at)
            at += len(t)
        return {"tokens": tokens, "token_logprobs": [lp.logprob for lp in logprobs],
                "top_logprobs": [{self.token_text(t): v for t, v in lp.top} for lp in logprobs],
                "text_offset": offsets}

    def _chat_entry(self, lp: TokenLogprob) -> dict[str, Any]:
        return {**self._token(lp.token_id, lp.logprob),
                "top_logprobs": [self._token(t, v) for t, v in lp.top]}

    def _token(self, token_id: int, logprob: float) -> dict[str, Any]:
        text = self.token_text(token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}


def usage(choices: list[Choice], prompt_tokens: int) -> dict[str, Any]:
    """The prompt counts once however many choices share it (OpenAI's rule for n > 1)."""
    completion = sum(len(c.token_ids) for c in choices)
    forwards = sum(c.num_target_forwards for c in choices)
    # Tokens per target forward; each choice's first token comes from prefill (tau).
    tau = (completion - len(choices)) / forwards if forwards else 0.0
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
            "total_tokens": prompt_tokens + completion, "mean_accepted_length": tau}
