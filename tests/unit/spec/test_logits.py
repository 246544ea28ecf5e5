"""Logit processing (penalties, logit bias) and reported log-probabilities."""

from __future__ import annotations

import pytest
import torch

from dspark.errors import UserError
from dspark.spec.logits import process_logits, token_logprobs
from dspark.spec.sampling import SamplingParams

V = 10


def by_hand(logits: torch.Tensor, history: list[int], p: SamplingParams) -> torch.Tensor:
    """OpenAI's formula for one row, written out token by token."""
    out = logits.clone()
    for j in range(V):
        c = history.count(j)
        out[j] -= c * p.frequency_penalty + (c > 0) * p.presence_penalty
    for j, b in p.logit_bias:
        out[j] += b
    return out


def test_each_round_row_counts_the_output_and_the_drafts_before_it() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, V, generator=g)  # a round of 3 drafts
    p = SamplingParams(presence_penalty=0.7, frequency_penalty=-0.4, logit_bias=((3, 5.0), (9, -100.0)))
    output, drafts = [1, 3, 3], [3, 5, 1]
    got = process_logits(logits, p, output, drafts)
    for k in range(4):
        torch.testing.assert_close(got[k], by_hand(logits[k], output + drafts[:k], p))


def test_requests_without_processing_get_their_logits_back_untouched() -> None:
    logits = torch.randn(2, V)
    assert process_logits(logits, SamplingParams(), [1, 2]) is logits


def test_token_logprobs_are_log_softmax_with_sorted_alternatives() -> None:
    logits = torch.tensor([[0.0, 1.0, 2.0, -1.0], [3.0, 0.0, 0.0, 0.0]])
    got = token_logprobs(logits, [1, 0], num_top=2)
    ref = torch.log_softmax(logits, -1)
    assert [g.token_id for g in got] == [1, 0]
    assert got[0].logprob == pytest.approx(float(ref[0, 1]))
    assert [t for t, _ in got[0].top] == [2, 1] and got[0].top[0][1] == pytest.approx(float(ref[0, 2]))
    assert token_logprobs(logits, [2], num_top=0)[0].top == ()


@pytest.mark.parametrize("kw", [{"presence_penalty": 2.5}, {"frequency_penalty": float("nan")},
                                {"logit_bias": ((1, 101.0),)}, {"logprobs": 21}, {"stop": ("",)}])
def test_out_of_range_options_are_refused(kw: dict) -> None:
    with pytest.raises(UserError):
        SamplingParams(**kw)
