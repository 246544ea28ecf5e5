"""The `Proposer` protocol and registry: everything that drafts tokens for the target to verify.

Per round the engine hands each live sequence a `DraftRequest` and gets back a `Draft`.
Sequences are identified by an engine-assigned integer id; a proposer keeps whatever state
it needs per id (a draft model's KV, the DSpark drafter's context cache) between rounds.

Feature contract (for drafters that read the target, e.g. DSpark): the target's tapped
layer outputs of every *committed* position strictly before the anchor are delivered
exactly once, in order, through `DraftRequest.new_features`. The anchor is the last token
of `token_ids` (the target's own token from the previous round); its feature is never
available yet and must never be used.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Protocol, runtime_checkable

import torch

from dspark.spec.sampling import SamplingParams


@dataclasses.dataclass
class DraftRequest:
    seq_id: int
    token_ids: list[int]  # committed tokens: prompt + output; token_ids[-1] is the anchor x0
    max_tokens: int  # K: draft at most this many tokens (0 = skip this round)
    params: SamplingParams
    # (n, m, d) tapped target features for positions [len(token_ids)-1-n, len(token_ids)-1)
    new_features: torch.Tensor | None = None
    generator: torch.Generator | None = None  # per-request RNG for sampled drafts


@dataclasses.dataclass
class Draft:
    tokens: list[int]  # x_1..x_l, l <= max_tokens
    # (l, V) float32: the exact distribution each token was drawn from, after the request's
    # temperature/top-k/top-p. None means deterministic drafts (a one-hot q).
    probs: torch.Tensor | None = None
    confidences: torch.Tensor | None = None  # (l,) conditional acceptance estimates c_k


@runtime_checkable
class Proposer(Protocol):
    name: str
    feature_layers: tuple[int, ...]  # target layers to tap for this proposer (may be empty)

    def start(self, seq_id: int, prompt_ids: list[int]) -> None:
        """A new sequence; its prompt features arrive with the first DraftRequest."""

    def propose(self, requests: list[DraftRequest]) -> list[Draft]:
        """Draft for many sequences at once (batched when the proposer can)."""

    def finish(self, seq_id: int) -> None:
        """Free everything held for `seq_id`."""


# Filled from above: each proposer module registers itself when imported, and the floor that
# builds engines (`dspark.engine.build.register_builtin_proposers`) imports them all. This
# floor never names the modules that register, so it knows nothing of `dspark.drafter`.
ProposerFactory = Callable[..., Proposer]
_REGISTRY: dict[str, ProposerFactory] = {}


def register_proposer(name: str) -> Callable[[ProposerFactory], ProposerFactory]:
    def deco(factory: ProposerFactory) -> ProposerFactory:
        if name in _REGISTRY:
            raise ValueError(f"proposer {name!r} registered twice")
        _REGISTRY[name] = factory
        return factory
    return deco


def proposer_names() -> list[str]:
    return sorted(_REGISTRY)


def create_proposer(name: str, **kwargs: object) -> Proposer:
    if name not in _REGISTRY:
        raise KeyError(f"unknown method {name!r}; known: ar, {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name](**kwargs)


def take_features(pending: list[torch.Tensor]) -> torch.Tensor | None:
    """Pending tapped features, (n, m, d) each and in position order, as one (sum n, m, d)
    tensor for the drafter (None if there are none); the list is emptied. The embedded
    engine, the fleet's workers and its router keep features of positions the drafter has
    not seen yet in such lists: rounds without a drafting pass add to them, the next
    drafted round takes them all."""
    if not pending:
        return None
    features = torch.cat(pending)
    pending.clear()
    return features
