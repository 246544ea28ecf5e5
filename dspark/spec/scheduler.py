"""Verification scheduling: how many drafts l_r of each request the target verifies this step.

The confidence policy (DSPARK.md section 4) maximises expected tokens per second

    Theta = (sum_r (1 + sum_{j<=l_r} s_{r,j})) * SPS(B),   B = sum_r (1 + l_r),

where s_{r,j} = prod_{i<=j} c_{r,i} is the predicted probability that drafts 1..j of
request r all survive, and SPS(B) is the engine's measured steps per second when verifying
B tokens. The greedy search admits (r, j) in descending s and stops at the first admission
that does not improve Theta. That early stop is what keeps scheduling lossless: c_{r,j}
for j >= 2 depends on the sampled draft x_{r,j-1}, so the decision to verify x_{r,j} may
depend on x_{r,<j} but never on x_{r,j} itself; a search that looks past a non-improving
admission would let a later confidence (a function of x_{r,j}) decide whether x_{r,j} is
verified, and that biases the output distribution.
"""

from __future__ import annotations

import bisect
import dataclasses
import json
from collections.abc import Callable
from typing import Protocol

import torch

from dspark.errors import UserError


def survival_products(confidences: list[torch.Tensor]) -> list[torch.Tensor]:
    """Per request (l_r,) conditional confidences c -> (l_r,) survival s_j = prod_{i<=j} c_i."""
    return [torch.cumprod(c.float(), dim=0) for c in confidences]


@dataclasses.dataclass(frozen=True)
class StepCostProfile:
    """Measured verification steps per second SPS(B), B = tokens in the verification batch.

    Linear interpolation between measured points; outside them the nearest measured value
    (clamped, so SPS is flat beyond the largest profiled batch).
    """

    batch_tokens: tuple[int, ...]  # strictly increasing
    steps_per_second: tuple[float, ...]

    def __post_init__(self) -> None:
        if not self.batch_tokens or len(self.batch_tokens) != len(self.steps_per_second):
            raise UserError("a step-cost profile needs one SPS value per measured batch size")
        if any(b <= a for a, b in zip(self.batch_tokens, self.batch_tokens[1:], strict=False)):
            raise UserError(f"profile batch sizes must increase strictly: {self.batch_tokens}")
        if self.batch_tokens[0] < 1 or not all(v > 0 for v in self.steps_per_second):
            raise UserError("profile batch sizes must be >= 1 and steps per second > 0")

    @classmethod
    def from_points(cls, points: dict[int, float]) -> StepCostProfile:
        keys = sorted(points)
        return cls(tuple(int(b) for b in keys), tuple(float(points[b]) for b in keys))

    def to_json(self) -> str:
        return json.dumps({"points": [[b, v] for b, v in zip(self.batch_tokens, self.steps_per_second,
                                                                 strict=True)]})

    @classmethod
    def from_json(cls, text: str) -> StepCostProfile:
        try:
            points = {int(b): float(v) for b, v in json.loads(text)["points"]}
        except (ValueError, KeyError, TypeError) as e:
            raise UserError(f"bad step-cost profile JSON: {e}") from e
        return cls.from_points(points)

    def __call__(self, num_tokens: int) -> float:
        xs, ys = self.batch_tokens, self.steps_per_second
        if num_tokens <= xs[0]:
            return ys[0]
        if num_tokens >= xs[-1]:
            return ys[-1]
        i = bisect.bisect_right(xs, num_tokens)  # xs[i-1] <= B < xs[i]
        w = (num_tokens - xs[i - 1]) / (xs[i] - xs[i - 1])
        return ys[i - 1] + w * (ys[i] - ys[i - 1])


def schedule_confidence(survival: list[torch.Tensor], sps: StepCostProfile, max_lengths: list[int],
                        *, base_tokens: int = 0, base_expected: float = 0.0) -> list[int]:
    """Greedy Theta maximisation with stop-at-first-non-improvement; returns l_r per request.

    l_r <= min(max_lengths[r], len(survival[r])). `base_tokens` / `base_expected` account
    for verification work that is not scheduled here (e.g. requests without confidences):
    they add to B and to the expected-token sum respectively.
    """
    lengths = [0] * len(survival)
    expected = base_expected + len(survival)  # every request emits at least one token
    num_tokens = base_tokens + len(survival)  # B: the anchor of every request
    theta = expected * sps(num_tokens)
    for s, j, r in _admission_order(survival, max_lengths):
        if j != lengths[r] + 1:  # prefix order; cannot trigger for non-increasing survival
            continue
        new_theta = (expected + s) * sps(num_tokens + 1)
        if not new_theta > theta:
            break  # the first non-improving admission ends the search (losslessness)
        lengths[r], expected, num_tokens, theta = j, expected + s, num_tokens + 1, new_theta
    return lengths


def _admission_order(survival: list[torch.Tensor], max_lengths: list[int]) -> list[tuple[float, int, int]]:
    """(s_{r,j}, j, r) sorted by s descending, then smaller j, then smaller r (j is 1-based).

    Survival is made non-increasing per row (running minimum, a no-op for products of
    c in [0, 1]) so that the order always admits (r, j-1) before (r, j).
    """
    candidates = []
    for r, s_row in enumerate(survival):
        n = min(max_lengths[r], s_row.shape[0])
        s_row = torch.cummin(s_row[:n].double(), dim=0).values
        candidates += [(s, j + 1, r) for j, s in enumerate(s_row.tolist())]
    return sorted(candidates, key=lambda c: (-c[0], c[1], c[2]))


def schedule_threshold(confidences: list[torch.Tensor], threshold: float) -> list[int]:
    """l_r = number of leading positions whose calibrated conditional confidence c_k >= threshold."""
    return [int((c >= threshold).long().cumprod(dim=0).sum()) for c in confidences]


def schedule_fixed(max_lengths: list[int]) -> list[int]:
    """Verify every draft."""
    return list(max_lengths)


class VerifyPolicy(Protocol):
    def __call__(self, confidences: list[torch.Tensor | None], max_lengths: list[int],
                 sps: StepCostProfile | None) -> list[int]:
        """Lengths to verify; requests whose confidences are None always get max_lengths[r]."""


PolicyFactory = Callable[..., VerifyPolicy]
_REGISTRY: dict[str, PolicyFactory] = {}


def register_policy(name: str) -> Callable[[PolicyFactory], PolicyFactory]:
    def deco(factory: PolicyFactory) -> PolicyFactory:
        if name in _REGISTRY:
            raise ValueError(f"verify policy {name!r} registered twice")
        _REGISTRY[name] = factory
        return factory
    return deco


def policy_names() -> list[str]:
    return sorted(_REGISTRY)


def create_policy(name: str, **kwargs: object) -> VerifyPolicy:
    if name not in _REGISTRY:
        raise UserError(f"unknown verify policy {name!r}; known: {', '.join(policy_names())}")
    return _REGISTRY[name](**kwargs)


@register_policy("fixed")
def fixed_policy() -> VerifyPolicy:
    def policy(confidences: list[torch.Tensor | None], max_lengths: list[int],
               sps: StepCostProfile | None) -> list[int]:
        return schedule_fixed(max_lengths)
    return policy


@register_policy("threshold")
def threshold_policy(threshold: float = 0.5) -> VerifyPolicy:
    def policy(confidences: list[torch.Tensor | None], max_lengths: list[int],
               sps: StepCostProfile | None) -> list[int]:
        lengths = list(max_lengths)
        for r, c in enumerate(confidences):
            if c is not None:
                lengths[r] = min(max_lengths[r], schedule_threshold([c[: max_lengths[r]]], threshold)[0])
        return lengths
    return policy


@register_policy("confidence")
def confidence_policy() -> VerifyPolicy:
    def policy(confidences: list[torch.Tensor | None], max_lengths: list[int],
               sps: StepCostProfile | None) -> list[int]:
        lengths = list(max_lengths)
        scored = [r for r, c in enumerate(confidences) if c is not None]
        if sps is None or not scored:
            return lengths  # no step-cost table: verify all
        # Requests without confidences are verified in full; they occupy 1 + l_r tokens of B
        # and are credited only their guaranteed token (their acceptance is unknown).
        unscored = [r for r, c in enumerate(confidences) if c is None]
        survival = survival_products([confidences[r] for r in scored])
        chosen = schedule_confidence(survival, sps, [max_lengths[r] for r in scored],
                                     base_tokens=sum(1 + max_lengths[r] for r in unscored),
                                     base_expected=float(len(unscored)))
        for r, length in zip(scored, chosen, strict=True):
            lengths[r] = length
        return lengths
    return policy
