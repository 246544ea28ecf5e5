"""Per-request state inside the embedded engine."""

from __future__ import annotations

import dataclasses
import enum
import time
from collections.abc import Callable

import torch

from dspark.engine.stop import TextStream
from dspark.spec.logits import TokenLogprob
from dspark.spec.sampling import SamplingParams


class FinishReason(str, enum.Enum):
    STOP = "stop"  # EOS, a stop token or a stop string
    LENGTH = "length"  # max_new_tokens or the context limit
    ABORT = "abort"


# on_tokens(seq_id, new_token_ids, finished)
StreamCallback = Callable[[int, list[int], bool], None]


def stop_token_ids(params: SamplingParams, eos_token_ids: tuple[int, ...]) -> frozenset[int]:
    """Tokens that end a request: its own stop ids, plus the model's EOS unless ignore_eos."""
    return frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos else frozenset(eos_token_ids))


def finish_reason_of(output_ids: list[int], stop_ids: frozenset[int], max_new_tokens: int) -> FinishReason | None:
    """The stop rule on committed output: a stop token last, else the length limit.
    (The engine adds one more reason of its own: the KV context is full.)"""
    if output_ids and output_ids[-1] in stop_ids:
        return FinishReason.STOP
    return FinishReason.LENGTH if len(output_ids) >= max_new_tokens else None


@dataclasses.dataclass
class Sequence:
    seq_id: int
    prompt_ids: list[int]
    params: SamplingParams
    stop_ids: frozenset[int]
    generator: torch.Generator | None
    on_tokens: StreamCallback | None = None
    slot: int = -1
    output_ids: list[int] = dataclasses.field(default_factory=list)
    finish_reason: FinishReason | None = None
    text: TextStream | None = None  # with stop strings: the output text, cut before the first one
    logprobs: list[TokenLogprob] = dataclasses.field(default_factory=list)  # per output token, when asked
    taps: tuple[int, ...] = ()  # target layers whose outputs this sequence's drafter reads
    # Tapped target features of committed positions not yet handed to the proposer.
    pending_features: list[torch.Tensor] = dataclasses.field(default_factory=list)
    # Speculation bookkeeping.
    num_verify_steps: int = 0
    num_drafted: int = 0
    num_accepted: int = 0
    accepted_per_position: list[int] = dataclasses.field(default_factory=list)
    drafted_per_position: list[int] = dataclasses.field(default_factory=list)
    reached_per_position: list[int] = dataclasses.field(default_factory=list)
    arrival_s: float = dataclasses.field(default_factory=time.perf_counter)
    admit_s: float | None = None
    first_token_s: float | None = None
    finish_s: float | None = None

    @property
    def token_ids(self) -> list[int]:
        """Committed tokens; the last one is the pending anchor (not yet in the KV cache)."""
        return self.prompt_ids + self.output_ids

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def record_round(self, drafted: int, accepted: int) -> None:
        self.num_verify_steps += 1
        self.num_drafted += drafted
        self.num_accepted += accepted
        while len(self.drafted_per_position) < drafted:
            self.drafted_per_position.append(0)
            self.accepted_per_position.append(0)
            self.reached_per_position.append(0)
        for j in range(drafted):
            self.drafted_per_position[j] += 1
        for j in range(accepted):
            self.accepted_per_position[j] += 1
        # Position j was *reached* (judged with drafts 0..j-1 already accepted) when j <= accepted.
        for j in range(min(accepted + 1, drafted)):
            self.reached_per_position[j] += 1


@dataclasses.dataclass
class RequestOutput:
    seq_id: int
    prompt_ids: list[int]
    token_ids: list[int]
    finish_reason: str
    num_verify_steps: int
    num_drafted: int
    num_accepted: int
    accepted_per_position: list[int]
    drafted_per_position: list[int]
    reached_per_position: list[int]
    ttft_s: float
    e2e_s: float
    decode_s: float  # admission to finish: what the user waits once the request is scheduled
    admit_time: float = 0.0  # perf_counter() at admission and at finish (for aggregating runs)
    finish_time: float = 0.0
    text: str | None = None  # with stop strings: the text, cut before the stop (else decode token_ids)
    logprobs: list[TokenLogprob] | None = None  # one per token, when params.logprobs is set

    @property
    def mean_accepted_length(self) -> float:
        """Tokens per target verification, bonus included (tau). The first token comes
        from prefill and is not counted."""
        if self.num_verify_steps == 0:
            return 0.0
        return (len(self.token_ids) - 1) / self.num_verify_steps

    @classmethod
    def from_sequence(cls, seq: Sequence) -> RequestOutput:
        end = seq.finish_s or time.perf_counter()
        return cls(
            seq_id=seq.seq_id, prompt_ids=list(seq.prompt_ids), token_ids=list(seq.output_ids),
            finish_reason=(seq.finish_reason or FinishReason.ABORT).value,
            num_verify_steps=seq.num_verify_steps, num_drafted=seq.num_drafted,
            num_accepted=seq.num_accepted, accepted_per_position=list(seq.accepted_per_position),
            drafted_per_position=list(seq.drafted_per_position),
            reached_per_position=list(seq.reached_per_position),
            ttft_s=(seq.first_token_s or end) - seq.arrival_s, e2e_s=end - seq.arrival_s,
            decode_s=end - (seq.admit_s or seq.arrival_s),
            admit_time=seq.admit_s or seq.arrival_s, finish_time=end,
            text=seq.text.text if seq.text is not None else None,
            logprobs=list(seq.logprobs) if seq.params.logprobs is not None else None,
        )
