"""The one stop rule shared by the engine and the fleet router (dspark/engine/sequence.py)."""

from __future__ import annotations

from dspark.engine.sequence import FinishReason, finish_reason_of, stop_token_ids
from dspark.spec.sampling import SamplingParams


def test_stop_ids_add_eos_unless_ignored() -> None:
    assert stop_token_ids(SamplingParams(stop_token_ids=(7,)), (2,)) == {2, 7}
    assert stop_token_ids(SamplingParams(stop_token_ids=(7,), ignore_eos=True), (2,)) == {7}


def test_stop_token_wins_over_length_and_only_the_last_token_counts() -> None:
    stops = frozenset({2})
    assert finish_reason_of([5, 2], stops, 2) is FinishReason.STOP
    assert finish_reason_of([2, 5], stops, 2) is FinishReason.LENGTH  # a stop id earlier is not the end
    assert finish_reason_of([2, 5], stops, 3) is None
    assert finish_reason_of([], stops, 1) is None
