from __future__ import annotations

import json

import pytest
import torch

from dspark.errors import UserError
from dspark.spec.scheduler import (
    StepCostProfile,
    create_policy,
    policy_names,
    schedule_confidence,
    schedule_fixed,
    schedule_threshold,
    survival_products,
)


def _t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


# -- survival and the step-cost profile --------------------------------------------------------

def test_survival_products_are_monotone_cumulative_products() -> None:
    c = torch.rand(4, 7, generator=torch.Generator().manual_seed(0))
    for c_row, s in zip(c, survival_products(list(c)), strict=True):
        assert torch.allclose(s, torch.cumprod(c_row, 0))
        assert (s[1:] <= s[:-1]).all()
    assert survival_products([_t(0.5, 0.5, 1.0)])[0].tolist() == [0.5, 0.25, 0.25]


def test_profile_interpolates_and_clamps() -> None:
    sps = StepCostProfile.from_points({8: 40.0, 2: 100.0, 4: 80.0})
    assert sps.batch_tokens == (2, 4, 8)
    assert sps(1) == 100.0 and sps(2) == 100.0  # clamped below
    assert sps(3) == pytest.approx(90.0)
    assert sps(6) == pytest.approx(60.0)
    assert sps(8) == 40.0 and sps(100) == 40.0  # clamped above


def test_profile_json_round_trip_and_validation() -> None:
    sps = StepCostProfile.from_points({1: 50.0, 16: 45.5})
    assert StepCostProfile.from_json(sps.to_json()) == sps
    assert json.loads(sps.to_json()) == {"points": [[1, 50.0], [16, 45.5]]}
    for bad in ({}, {0: 1.0}, {1: -1.0}):
        with pytest.raises(UserError):
            StepCostProfile.from_points(bad)
    with pytest.raises(UserError):
        StepCostProfile.from_json('{"pts": []}')


# -- the greedy confidence scheduler -----------------------------------------------------------

def test_ties_go_to_the_smaller_position_then_the_smaller_request() -> None:
    # Theta: 2*100 = 200 -> (0,1): 2.5*90 = 225 -> (1,1): 3.0*80 = 240 -> (0,2): 3.5*50 stops.
    # Tie-breaking by request first would admit (0,1), (0,2) and return [2, 0].
    sps = StepCostProfile.from_points({2: 100.0, 3: 90.0, 4: 80.0, 5: 50.0})
    assert schedule_confidence([_t(0.5, 0.5), _t(0.5)], sps, [2, 1]) == [1, 1]


def schedule_lookahead(survival: list[torch.Tensor], sps: StepCostProfile,
                       max_lengths: list[int]) -> list[int]:
    """The lossy variant: same admission order, but keep the best Theta over *all* prefixes."""
    order = sorted(((float(s), j + 1, r) for r, row in enumerate(survival)
                    for j, s in enumerate(row[: max_lengths[r]].tolist())),
                   key=lambda c: (-c[0], c[1], c[2]))
    expected, lengths = float(len(survival)), [0] * len(survival)
    best, best_lengths = expected * sps(len(survival)), list(lengths)
    for i, (s, j, r) in enumerate(order):
        expected, lengths[r] = expected + s, j
        theta = expected * sps(len(survival) + i + 1)
        if theta > best:
            best, best_lengths = theta, list(lengths)
    return best_lengths


def test_stops_at_first_non_improving_admission() -> None:
    # Theta: 1*100 -> 1.9*60 = 114 -> 2.8*40 = 112 (stop) ... 3.7*40 = 148 would be better.
    sps = StepCostProfile.from_points({1: 100.0, 2: 60.0, 3: 40.0, 4: 40.0})
    survival = [_t(0.9, 0.9, 0.9)]
    assert schedule_confidence(survival, sps, [3]) == [1]
    assert schedule_lookahead(survival, sps, [3]) == [3]


def test_zero_gain_admission_is_not_taken() -> None:
    flat = StepCostProfile.from_points({1: 10.0})
    assert schedule_confidence([_t(0.7, 0.0, 0.0)], flat, [3]) == [1]  # needs a strict gain


def test_lengths_respect_max_lengths_and_flat_profile_verifies_all() -> None:
    flat = StepCostProfile.from_points({1: 10.0})
    survival = survival_products([_t(0.9, 0.8, 0.7, 0.6), _t(0.5, 0.5)])
    assert schedule_confidence(survival, flat, [2, 5]) == [2, 2]


def test_budget_shrinks_as_step_cost_grows_with_batch() -> None:
    survival = survival_products([torch.full((7,), c) for c in (0.9, 0.8, 0.7, 0.5)])
    totals = []
    for slope in (0.0, 0.01, 0.03, 0.1, 0.3):
        sps = StepCostProfile.from_points({b: 100.0 / (1 + slope * (b - 4)) for b in range(4, 33)})
        totals.append(sum(schedule_confidence(survival, sps, [7] * 4)))
    assert totals[0] == 28  # no cost to extra tokens: verify everything
    assert all(a >= b for a, b in zip(totals, totals[1:], strict=False)), totals
    assert totals[-1] < totals[1] < totals[0], totals


# -- policies ----------------------------------------------------------------------------------

def test_policy_registry() -> None:
    assert {"fixed", "threshold", "confidence"} <= set(policy_names())
    with pytest.raises(UserError):
        create_policy("nope")


def test_threshold_stops_at_first_low_confidence() -> None:
    assert schedule_threshold([_t(0.9, 0.4, 0.95), _t(0.3), _t(0.8, 0.8)], 0.5) == [1, 0, 2]
    policy = create_policy("threshold", threshold=0.5)
    assert policy([_t(0.9, 0.8, 0.95), None, _t(0.2)], [2, 4, 1], None) == [2, 4, 0]


def test_requests_without_confidences_get_full_length_under_every_policy() -> None:
    steep = StepCostProfile.from_points({1: 100.0, 20: 5.0})
    confidences = [None, _t(0.1, 0.1), None]
    for name in ("fixed", "threshold", "confidence"):
        lengths = create_policy(name)(confidences, [3, 2, 5], steep)
        assert lengths[0] == 3 and lengths[2] == 5, name
    assert schedule_fixed([3, 2, 5]) == [3, 2, 5]


def test_confidence_policy_without_profile_verifies_all() -> None:
    policy = create_policy("confidence")
    assert policy([_t(0.1, 0.1), _t(0.9)], [2, 1], None) == [2, 1]


def test_unscored_requests_occupy_batch_capacity() -> None:
    policy = create_policy("confidence")
    sps = StepCostProfile.from_points({b: 100.0 - 2.5 * b for b in range(1, 40)})
    alone = policy([_t(0.9, 0.9, 0.9, 0.9)], [4], sps)[0]
    # 31 unscored tokens: B starts at 32 where each extra token costs 1/8 of the throughput.
    crowded = policy([_t(0.9, 0.9, 0.9, 0.9), None], [4, 30], sps)[0]
    assert (alone, crowded) == (4, 2)


# -- losslessness: stop-at-first-non-improvement vs look-ahead ---------------------------------
# One request, V = 3, K = 2, first-order Markov target P and drafter Q, anchor 0. c_1 is
# fixed; c_2 depends on the *sampled* x_1 (as the DSpark confidence head does). For every x_1
# the scheduler picks l(x_1); the joint law of the first two emitted tokens is computed
# exactly (two rounds when the first emits one token) and compared with P(y1|0) P(y2|y1).

P = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.6, 0.3], [0.3, 0.3, 0.4]], dtype=torch.float64)
Q = torch.tensor([[0.2, 0.3, 0.5], [0.4, 0.4, 0.2], [0.1, 0.2, 0.7]], dtype=torch.float64)
C1, C2 = 0.6, [0.1, 0.1, 0.9]  # c_2(x_1)
# A: admitting x_1 alone does not pay, x_1 and x_2 together do when c_2(x_1) is high.
PROFILE_A = StepCostProfile.from_points({1: 100.0, 2: 60.0, 3: 50.0})
# B: x_1 always pays; x_2 pays only when c_2(x_1) is high (lengths depend on x_1).
PROFILE_B = StepCostProfile.from_points({1: 100.0, 2: 80.0, 3: 70.0})


def _residual(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    r = (p - q).clamp_min(0)
    return r / r.sum() if r.sum() > 0 else p


def _after_draft(prev: int, x: int) -> torch.Tensor:
    """Law of the token emitted at a verified draft x ~ Q[prev] given x: x if accepted, else residual."""
    a = _acceptance(prev, x)
    accepted = torch.nn.functional.one_hot(torch.tensor(x), 3).double()
    return a * accepted + (1 - a) * _residual(P[prev], Q[prev])


def _acceptance(prev: int, x: int) -> float:
    return min(1.0, float(P[prev, x] / Q[prev, x]))


def _round_first_token(anchor: int, length_of: dict[int, int]) -> torch.Tensor:
    law = torch.zeros(3, dtype=torch.float64)
    for x1 in range(3):
        law += Q[anchor, x1] * (P[anchor] if length_of[x1] == 0 else _after_draft(anchor, x1))
    return law


def exact_joint(length_of: dict[int, int]) -> torch.Tensor:
    """(3, 3) law of (y1, y2) when a round from anchor a verifies l = length_of[x_1] drafts."""
    next_round = torch.stack([_round_first_token(a, length_of) for a in range(3)])  # (3, 3)
    joint = torch.zeros(3, 3, dtype=torch.float64)
    for x1 in range(3):
        q1, num_drafts = float(Q[0, x1]), length_of[x1]
        if num_drafts == 0:  # y1 ~ P[0]; y2 from the next round
            joint += q1 * P[0].unsqueeze(1) * next_round
            continue
        a = _acceptance(0, x1)
        joint += q1 * (1 - a) * _residual(P[0], Q[0]).unsqueeze(1) * next_round  # reject x_1
        second = P[x1] if num_drafts == 1 else sum(Q[x1, x2] * _after_draft(x1, x2) for x2 in range(3))
        joint[x1] += q1 * a * second  # accept x_1; y2 is the bonus or the verified x_2
    return joint


def _lengths(scheduler: object, sps: StepCostProfile) -> dict[int, int]:
    return {x1: scheduler([_t(C1, C1 * C2[x1])], sps, [2])[0] for x1 in range(3)}


def test_greedy_scheduler_is_lossless_lookahead_is_not() -> None:
    truth = P[0].unsqueeze(1) * P  # (3, 3): P(y1 | 0) P(y2 | y1)
    for sps in (PROFILE_A, PROFILE_B):
        ours = exact_joint(_lengths(schedule_confidence, sps))
        assert torch.allclose(ours, truth, atol=1e-12)
    assert len(set(_lengths(schedule_confidence, PROFILE_B).values())) == 2  # l depends on x_1

    lookahead = _lengths(schedule_lookahead, PROFILE_A)
    assert lookahead == {0: 0, 1: 0, 2: 2}  # x_1 = 2 decides its own admission
    tv = 0.5 * (exact_joint(lookahead) - truth).abs().sum()
    assert tv > 0.05, tv
    # Its first token alone is already biased: 0.5 P[0] + 0.5 [0.6, 0, 0.4] = [.55, .15, .3].
    assert torch.allclose(exact_joint(lookahead).sum(1), torch.tensor([0.55, 0.15, 0.3], dtype=torch.float64))
