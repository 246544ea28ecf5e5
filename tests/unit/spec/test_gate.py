"""Draft gating: back off exponentially while drafting does not pay, recover when it does."""

from __future__ import annotations

from dspark.spec.gate import DraftGate
from dspark.spec.scheduler import StepCostProfile

FLAT = StepCostProfile.from_points({1: 10.0, 64: 10.0})  # verification cost independent of B


def drafted_pattern(gate: DraftGate, steps: int, emitted_per_seq: float, propose_s: float) -> str:
    """'D' for a drafted step, '.' for a gated (plain) step; one sequence, K = 4."""
    out = []
    for _ in range(steps):
        if gate.should_draft():
            out.append("D")
            gate.observe(1, round(emitted_per_seq), propose_s, verify_tokens=5)
        else:
            out.append(".")
    return "".join(out)


def test_losing_drafter_backs_off_exponentially_up_to_max_skip() -> None:
    # AR: 10 tok/s. Speculative: 1 token / (0.05 + 0.1) s = 6.7 tok/s -> skip 1, 2, 4, 4, ...
    gate = DraftGate(FLAT, max_skip=4)
    assert drafted_pattern(gate, 16, 1, 0.05) == "D.D..D....D....D"
    assert gate.skipped_rounds == 11 and gate.drafted_rounds == 5


def test_paying_drafter_is_never_gated() -> None:
    # 3 tokens / 0.15 s = 20 tok/s > 10 tok/s AR
    gate = DraftGate(FLAT)
    assert drafted_pattern(gate, 20, 3, 0.05) == "D" * 20
    assert gate.ratio is not None and gate.ratio > 1.9


def test_backoff_resets_once_drafting_pays_again() -> None:
    gate = DraftGate(FLAT, max_skip=8, smoothing=1.0)  # no smoothing: react to the last round
    assert drafted_pattern(gate, 7, 1, 0.05) == "D.D..D."
    assert drafted_pattern(gate, 4, 3, 0.0) == "...D"  # still skipping, then a probe that pays
    assert gate.backoff == 1 and drafted_pattern(gate, 3, 3, 0.0) == "DDD"


def test_ar_rate_uses_the_batch_size_not_one_sequence() -> None:
    # 4 sequences: AR verifies 4 tokens per step at SPS(4); a round emitting 8 tokens with
    # 12 verified tokens at SPS(12) is compared against 4 * SPS(4), not SPS(1).
    sps = StepCostProfile.from_points({1: 20.0, 4: 20.0, 12: 10.0})
    gate = DraftGate(sps, smoothing=1.0)
    gate.observe(4, 8, 0.0, verify_tokens=12)  # 8 / 0.1 = 80 tok/s == 4 * 20: break-even, keep drafting
    assert gate.skip_left == 0 and abs(gate.ratio - 1.0) < 1e-9
    gate.observe(4, 7, 0.0, verify_tokens=12)  # 70 < 80: back off
    assert gate.skip_left == 1
