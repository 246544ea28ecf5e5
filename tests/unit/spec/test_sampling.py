from __future__ import annotations

import math

import pytest
import torch

from dspark.spec.sampling import (
    SamplingParams,
    draw,
    greedy,
    make_generator,
    one_hot_argmax,
    probs_from_logits,
    sample,
)

LOGITS = torch.tensor([[4.0, 2.0, 1.0, 1.0]]).log()  # softmax = [.5, .25, .125, .125]


def _probs(**kw: float) -> list[float]:
    return probs_from_logits(LOGITS, SamplingParams(**kw))[0].tolist()


def test_temperature_one_is_softmax() -> None:
    assert _probs(temperature=1.0) == pytest.approx([0.5, 0.25, 0.125, 0.125])


def test_untruncated_sampling_is_a_plain_softmax_without_ranking(monkeypatch) -> None:
    # No top-k and no top-p: nothing is cut, so nothing is sorted (a full-vocabulary sort per
    # row cost ~2 ms, most of a sampled draft block and of a sampled verification).
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(3, 49152, generator=g) * 3
    logits[1, ::3] = float("-inf")  # a restricted draft vocabulary
    monkeypatch.setattr(torch, "sort", lambda *a, **k: pytest.fail("sorted an untruncated row"))
    monkeypatch.setattr(torch, "topk", lambda *a, **k: pytest.fail("ranked an untruncated row"))
    probs = probs_from_logits(logits, SamplingParams(temperature=0.7))
    torch.testing.assert_close(probs, torch.softmax(logits / 0.7, dim=-1))
    assert bool((probs[1, ::3] == 0).all())


def test_temperature_scales_logits() -> None:
    # T = 0.5 squares the odds: 16 : 4 : 1 : 1.
    assert _probs(temperature=0.5) == pytest.approx([16 / 22, 4 / 22, 1 / 22, 1 / 22])
    # T = 2 takes square roots: 2 : sqrt2 : 1 : 1.
    z = 4 + math.sqrt(2)
    assert _probs(temperature=2.0) == pytest.approx([2 / z, math.sqrt(2) / z, 1 / z, 1 / z])


def test_top_k_keeps_k_and_breaks_ties_by_lowest_index() -> None:
    assert _probs(temperature=1.0, top_k=2) == pytest.approx([2 / 3, 1 / 3, 0, 0])
    # Tokens 2 and 3 tie for third place: exactly k survive, the lower index wins.
    assert _probs(temperature=1.0, top_k=3) == pytest.approx([4 / 7, 2 / 7, 1 / 7, 0])
    assert _probs(temperature=1.0, top_k=10) == pytest.approx([0.5, 0.25, 0.125, 0.125])


def test_top_p_keeps_smallest_set_reaching_p() -> None:
    assert _probs(temperature=1.0, top_p=0.5) == pytest.approx([1, 0, 0, 0])  # 0.5 >= 0.5
    assert _probs(temperature=1.0, top_p=0.6) == pytest.approx([2 / 3, 1 / 3, 0, 0])
    assert _probs(temperature=1.0, top_p=0.75) == pytest.approx([2 / 3, 1 / 3, 0, 0])
    assert _probs(temperature=1.0, top_p=0.8) == pytest.approx([4 / 7, 2 / 7, 1 / 7, 0])
    assert _probs(temperature=1.0, top_p=0.01) == pytest.approx([1, 0, 0, 0])  # argmax always kept


def test_top_p_applies_after_temperature_and_top_k() -> None:
    # T = 0.5: [16, 4, 1, 1]/22; top-k 3 -> [16, 4, 1]/21; top-p 0.9 -> 16/21 = .76 < .9, keep 2.
    assert _probs(temperature=0.5, top_k=3, top_p=0.9) == pytest.approx([0.8, 0.2, 0, 0])


def test_greedy_is_one_hot_of_lowest_argmax() -> None:
    logits = torch.tensor([[0.0, 3.0, 3.0, 1.0], [5.0, -1.0, 5.0, 0.0]])
    probs = probs_from_logits(logits, SamplingParams(temperature=0.0, top_k=1, top_p=0.3))
    assert probs.tolist() == [[0, 1, 0, 0], [1, 0, 0, 0]]
    assert probs.dtype == torch.float32
    assert greedy(logits).tolist() == [1, 0]
    assert torch.equal(one_hot_argmax(logits), probs)


def test_draw_is_the_argmax_when_greedy_and_a_sample_otherwise() -> None:
    logits = torch.tensor([[0.0, 3.0, 3.0, 1.0], [5.0, -1.0, 5.0, 0.0]], dtype=torch.bfloat16)
    plain = SamplingParams()
    assert draw(probs_from_logits(logits, plain), plain, None).tolist() == logits.float().argmax(-1).tolist()
    hot = SamplingParams(temperature=1.0, seed=3)
    probs = probs_from_logits(logits, hot)
    assert torch.equal(draw(probs, hot, make_generator(3)), sample(probs, make_generator(3)))


def test_rows_are_normalised_float32() -> None:
    logits = torch.randn(5, 50, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    probs = probs_from_logits(logits, SamplingParams(temperature=0.7, top_k=20, top_p=0.9))
    assert probs.dtype == torch.float32
    assert torch.allclose(probs.sum(-1), torch.ones(5))
    assert ((probs > 0).sum(-1) <= 20).all()


def test_sample_is_reproducible_with_generator() -> None:
    probs = torch.full((4, 10), 0.1)
    a = sample(probs, make_generator(7))
    b = sample(probs, make_generator(7))
    assert a.shape == (4,) and torch.equal(a, b)
    assert make_generator(None) is None


def test_sample_respects_zero_probabilities() -> None:
    probs = torch.tensor([[0.0, 1.0, 0.0], [0.5, 0.0, 0.5]]).repeat(200, 1)
    tokens = sample(probs, make_generator(0)).view(200, 2)
    assert (tokens[:, 0] == 1).all() and (tokens[:, 1] != 1).all()


def test_extreme_temperatures_never_produce_nan() -> None:
    logits = torch.tensor([[3.0, 1.0, -2.0, 3.0 - 1e-6]])
    for t in (1e-30, 1e-12, 1e-6, 1e6, 1e30):
        p = probs_from_logits(logits, SamplingParams(temperature=t, top_p=0.9, top_k=3))
        assert torch.isfinite(p).all() and abs(float(p.sum()) - 1) < 1e-5
        sample(p, torch.Generator().manual_seed(0))  # multinomial accepts it


def test_non_finite_sampling_parameters_are_rejected() -> None:
    import pytest

    from dspark.errors import UserError

    for kw in ({"temperature": float("inf")}, {"temperature": float("nan")}, {"top_p": float("nan")}):
        with pytest.raises(UserError):
            SamplingParams(**kw)


def _full_sort(logits: torch.Tensor, params: SamplingParams, monkeypatch) -> torch.Tensor:
    """The reference: the same function with the candidate shortcut switched off."""
    from dspark.spec import sampling

    with monkeypatch.context() as m:
        m.setattr(sampling, "CANDIDATES", logits.shape[-1])
        return probs_from_logits(logits, params)


@pytest.mark.parametrize("kw", [
    {"temperature": 0.2, "top_p": 0.9},  # SmolLM2's recommended sampling
    {"temperature": 1.0, "top_p": 0.5},
    {"temperature": 1.0, "top_k": 50},
    {"temperature": 0.7, "top_k": 400, "top_p": 0.95},  # k above the candidate count
    {"temperature": 3.0, "top_p": 0.999},  # flat: the nucleus outgrows the candidates
    # top-k below the candidate count AND top-p: found by the fleet's HTTP fuzz (HTTP 500, the
    # k top-k probabilities were multiplied by the edge mask of all CANDIDATES values).
    {"temperature": 1.5, "top_k": 9, "top_p": 0.95},
    {"temperature": 1.0, "top_k": 40, "top_p": 0.5},
])
def test_candidate_shortcut_equals_the_full_sort(kw, monkeypatch) -> None:
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(6, 5000, generator=g) * 4
    params = SamplingParams(**kw)
    fast, ref = probs_from_logits(logits, params), _full_sort(logits, params, monkeypatch)
    assert torch.equal(fast > 0, ref > 0)  # the same support, token for token
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-7)


def test_candidate_shortcut_keeps_lowest_index_ties_at_its_edge(monkeypatch) -> None:
    logits = torch.zeros(2, 3000)
    logits[1, 2990:] = 1.0  # ten best, then 2990 tied values across the candidate edge
    for params in (SamplingParams(temperature=1.0, top_k=300), SamplingParams(temperature=1.0, top_p=0.05)):
        fast = probs_from_logits(logits, params)
        torch.testing.assert_close(fast, _full_sort(logits, params, monkeypatch))
    kept = probs_from_logits(logits, SamplingParams(temperature=1.0, top_k=300))[0].nonzero().squeeze(1)
    assert kept.tolist() == list(range(300))


def test_candidate_shortcut_with_a_restricted_draft_vocabulary(monkeypatch) -> None:
    logits = torch.full((3, 4000), float("-inf"))
    logits[:, ::20] = torch.randn(3, 200, generator=torch.Generator().manual_seed(1))  # 200 finite
    for params in (SamplingParams(temperature=1.0, top_p=0.9), SamplingParams(temperature=0.5, top_k=100)):
        torch.testing.assert_close(probs_from_logits(logits, params), _full_sort(logits, params, monkeypatch))


def test_sample_matches_the_distribution_and_never_picks_zero_mass() -> None:
    probs = torch.tensor([0.0, 0.1, 0.0, 0.6, 0.3, 0.0]).repeat(20000, 1)
    tokens = sample(probs, make_generator(0))
    freq = torch.bincount(tokens, minlength=6).float() / tokens.numel()
    assert freq[[0, 2, 5]].sum() == 0
    torch.testing.assert_close(freq, probs[0], atol=0.01, rtol=0)
    edge = torch.tensor([[0.0, 1.0, 0.0, 0.0]])
    assert sample(edge, make_generator(1)).item() == 1


def test_sample_clamps_a_uniform_that_rounds_up_to_the_total(monkeypatch) -> None:
    monkeypatch.setattr(torch, "rand", lambda n, m, **kw: torch.ones(n, m))
    assert sample(torch.tensor([[0.2, 0.8, 0.0, 0.0]]), None).tolist() == [1]


def test_candidate_shortcut_decides_bf16_ties_below_the_nucleus(monkeypatch) -> None:
    """bf16 logits tie often; a tie across the candidate edge must not force the full sort
    when the tokens above it already hold top_p, and must when they do not."""
    from dspark.spec import sampling

    g = torch.Generator().manual_seed(5)
    logits = (torch.randn(4, 6000, generator=g) * 3).to(torch.bfloat16).float()  # many exact ties
    logits[:, :3] += 20  # a peaked head: T = 0.2, top-p 0.9 keeps a handful of tokens
    params = SamplingParams(temperature=0.2, top_p=0.9)
    calls = []
    real_sort = torch.sort
    def counting_sort(x, *a, **k):
        calls.append(x.shape[-1])
        return real_sort(x, *a, **k)

    monkeypatch.setattr(sampling.torch, "sort", counting_sort)
    fast = probs_from_logits(logits, params)
    assert 6000 not in calls  # decided from the candidates
    monkeypatch.undo()
    ref = _full_sort(logits, params, monkeypatch)
    assert torch.equal(fast > 0, ref > 0)
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-7)
    flat = torch.zeros(1, 3000)  # all tied: the nucleus needs an order among the tied tokens
    torch.testing.assert_close(probs_from_logits(flat, SamplingParams(temperature=1.0, top_p=0.5)),
                               _full_sort(flat, SamplingParams(temperature=1.0, top_p=0.5), monkeypatch))


def test_nth_offsets_the_seed_and_keeps_unseeded_runs_unseeded() -> None:
    p = SamplingParams(temperature=1.0, seed=7, max_new_tokens=3)
    assert [p.nth(i).seed for i in range(3)] == [7, 8, 9]
    assert p.nth(2).temperature == 1.0 and p.nth(2).max_new_tokens == 3
    unseeded = SamplingParams(temperature=1.0)
    assert unseeded.nth(5) is unseeded
