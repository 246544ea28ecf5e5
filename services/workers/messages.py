"""What the router and the workers hand each other (internal: Ray pickles these between
fleet processes; nothing a client sends is ever unpickled)."""

from __future__ import annotations

import dataclasses

import torch

from dspark.engine.engine import RoundResult
from dspark.spec.logits import TokenLogprob
from dspark.spec.proposer import Draft
from dspark.spec.sampling import SamplingParams


class StateLost(RuntimeError):
    """A worker holds no state for the request (it restarted, or the request was freed):
    the router re-prefills prompt + committed tokens and continues."""


@dataclasses.dataclass(frozen=True)
class WorkerInfo:
    deployment: str
    peer_id: str  # unique per replica process: names it in KV-transport pairs
    feature_layers: tuple[int, ...] = ()  # drafter: target layers it reads
    has_proposer: bool = True  # drafter: False for method "ar"
    eos_token_ids: tuple[int, ...] = ()
    max_context: int = 0
    num_free_slots: int = 0
    vocab_size: int = 0


@dataclasses.dataclass(frozen=True)
class PrefillResult:
    first_token: int
    finish_reason: str | None  # the first token already ended the request (stop / length)
    num_tokens: int  # KV rows shipped
    kv_bytes: int
    prefill_s: float
    transfer_s: float
    logprobs: list[TokenLogprob] | None = None  # of the first token, when the request asks


@dataclasses.dataclass(frozen=True)
class PrefillCall:
    """Prefill worker: run the target over `token_ids`, stream the KV to `target_peer` and
    (for a feature-reading drafter) the tapped features to `drafter_peer`."""
    request_id: str
    token_ids: list[int]  # prompt (+ committed[:-1] when re-prefilling after a failover)
    params: SamplingParams
    target_peer: str
    drafter_peer: str | None = None
    feature_layers: tuple[int, ...] = ()


@dataclasses.dataclass(frozen=True)
class ReceiveCall:
    """Target worker: import the KV a prefill worker streams; with `committed` (failover)
    the request resumes after those logged tokens."""
    request_id: str
    prefill_peer: str
    prompt_ids: list[int]
    params: SamplingParams
    committed: list[int] | None = None
    feature_layers: tuple[int, ...] = ()


@dataclasses.dataclass(frozen=True)
class ReceiveReply:
    max_drafts: int  # drafts the first step can use
    draft_next: bool = True  # the target's draft gate: whether the first step drafts


@dataclasses.dataclass(frozen=True)
class StartCall:
    """Drafter worker: begin drafting for a request; with `prefill_peer`, first receive the
    prompt's tapped features from that prefill worker."""
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    prefill_peer: str | None = None


@dataclasses.dataclass(frozen=True)
class ProposeCall:
    request_id: str
    token_ids: list[int]  # committed tokens; the last one is the anchor
    max_tokens: int
    new_features: torch.Tensor | None = None  # (n, m, d) committed positions since last call


@dataclasses.dataclass(frozen=True)
class VerifyCall:
    request_id: str
    draft: Draft
    propose_s: float | None = None  # the drafter call's time, as the router measured it; None: not called


@dataclasses.dataclass(frozen=True)
class VerifyReply:
    """One request's share of a verify batch: the target engine's own `RoundResult` for it
    (committed tokens, drafts verified and accepted, finish reason, next allowance, tapped
    features), plus what the batch looked like."""
    round: RoundResult
    batch_size: int  # requests in the batched forward
    verify_s: float
    draft_next: bool = True  # the target's draft gate: whether the next step drafts (False: skip the drafter)

    @property
    def finish_reason(self) -> str | None:
        return None if self.round.finish_reason is None else self.round.finish_reason.value
