from __future__ import annotations

import pytest
import torch

from dspark.drafter.hybrid import HybridProposer
from dspark.drafter.proposer import DrafterProposer
from dspark.engine.engine import Engine, EngineConfig
from dspark.spec.proposer import DraftRequest
from dspark.spec.sampling import SamplingParams
from tests.unit.drafter.helpers import tiny_drafter, tiny_target

K = 4


def _hybrid(conf_bias: float):
    target = tiny_target()
    d = tiny_drafter(target)
    with torch.no_grad():
        d.conf.weight.zero_()
        d.conf.bias.fill_(conf_bias)  # every confidence = sigmoid(bias)
    return HybridProposer(DrafterProposer(d, "dspark")), d


def _request(tokens: list[int], feats: torch.Tensor | None) -> DraftRequest:
    return DraftRequest(0, tokens, K, SamplingParams(), new_features=feats)


REPEAT = [5, 6, 7, 8, 9, 10, 11, 12, 5, 6]  # the suffix [5, 6] occurred before: lookup drafts 7, 8, 9, 10


def test_lookup_wins_when_the_drafter_doubts_and_loses_when_it_is_sure() -> None:
    h, _ = _hybrid(conf_bias=-8.0)  # E_ds ~ 0
    h.start(0, REPEAT[:-1])
    (draft,) = h.propose([_request(REPEAT, torch.randn(len(REPEAT) - 1, 3, 32))])
    assert draft.tokens == [7, 8, 9, 10] and draft.probs is None  # one-hot q: deterministic lookup
    sure, _ = _hybrid(conf_bias=8.0)  # E_ds ~ K > E_ng(4) with the prior p = 0.5
    sure.start(0, REPEAT[:-1])
    (draft,) = sure.propose([_request(REPEAT, torch.randn(len(REPEAT) - 1, 3, 32))])
    assert sure.rounds["drafter"] == 1 and len(draft.tokens) == K


def test_lookup_acceptance_is_read_from_the_feature_contract_and_skips_the_drafter() -> None:
    h, d = _hybrid(conf_bias=-8.0)
    h.clock = lambda: 0.0  # the pass's cost stays unmeasured: it runs whenever a sequence wants it
    tokens = list(REPEAT)
    h.start(0, tokens[:-1])
    feats = torch.randn(64, 3, 32)
    (draft,) = h.propose([_request(tokens, feats[: len(tokens) - 1])])
    assert h.rounds["lookup"] == 1 and h.rounds["lookup_skipped_drafter"] == 0  # the drafter ran to compare
    tokens += [7, 8, 9, 10, 11]  # all four accepted + the target's own token
    (draft,) = h.propose([_request(tokens, feats[len(REPEAT) - 1: len(tokens) - 1])])
    st = h._stats[0]
    assert (st.hits, st.trials) == (4.0, 4.0)
    # Lookup promises more than the drafter has been delivering: its pass is skipped (not
    # even called), and the five new features wait for the next pass.
    assert h.rounds["lookup_skipped_drafter"] == 1 and draft.tokens
    assert h.drafter._caches[0].length == len(REPEAT) - 1
    assert sum(f.shape[0] for f in h._stats[0].backlog) == 5
    tokens += [30, 31]  # lookup rejected at once: no match now, so the drafter drafts again
    (draft,) = h.propose([_request(tokens, feats[len(tokens) - 3: len(tokens) - 1])])
    assert h.rounds["drafter"] == 1 and h._stats[0].backlog == []
    assert h.drafter._caches[0].length == len(tokens) - 1  # caught up in one extension


def test_hybrid_greedy_output_equals_ar() -> None:
    target = tiny_target()
    prompts = [[3, 4, 5, 6, 3, 4, 5, 6, 3, 4], [9, 1, 2, 9, 1, 2, 9, 1], [17, 30, 2]]
    params = SamplingParams(max_new_tokens=24)
    ar = Engine(target, (), None, EngineConfig(max_batch_size=4, block_size=K)).generate(prompts, params)
    h = HybridProposer(DrafterProposer(tiny_drafter(target), "dspark"))
    spec = Engine(target, (), h, EngineConfig(max_batch_size=4, block_size=K)).generate(prompts, params)
    assert [o.token_ids for o in spec] == [o.token_ids for o in ar]
    assert h.rounds["drafter"] + h.rounds["lookup"] > 0


class _Clock:
    """A fake clock: the drafter's pass advances it by `pass_s`, and each round's rest
    (verification) by `rest_s` between proposals. `ran[i]`: whether round i called the
    drafter at all (a round without the pass must not)."""

    def __init__(self, h: HybridProposer, pass_s: float, rest_s: float) -> None:
        self.now, self.rest_s, self.calls = 0.0, rest_s, 0
        h.clock = lambda: self.now
        inner = h.drafter.propose

        def timed(reqs: list[DraftRequest]) -> list:
            self.calls += 1
            self.now += pass_s
            return inner(reqs)
        h.drafter.propose = timed  # type: ignore[method-assign]

    def round(self) -> None:
        self.now += self.rest_s


class _TwoRests(_Clock):
    """A round's rest is `rest_with` after a round that ran the pass (a drafter block verifies
    more tokens), `rest_s` after one that did not."""

    def __init__(self, h: HybridProposer, pass_s: float, rest_s: float, rest_with: float) -> None:
        super().__init__(h, pass_s, rest_s)
        self.h, self.rest_with = h, rest_with

    def round(self) -> None:
        self.now += self.rest_with if self.h._last_ran else self.rest_s


NO_MATCH = [3, 14, 15, 9, 2, 6, 5]  # no repeated suffix: lookup has nothing to offer


def _rounds(h: HybridProposer, clock: _Clock, n: int) -> tuple[list[bool], list[int]]:
    """n rounds of one sequence, each accepting nothing (one new feature a round): whether
    each round ran the drafter's pass, and its draft's length."""
    tokens = list(NO_MATCH)
    h.start(0, tokens[:-1])
    feats = torch.randn(64, 3, 32)
    ran, lengths = [], []
    new = feats[: len(tokens) - 1]
    for i in range(n):
        if i:
            clock.round()
            tokens.append(40 + len(tokens))
            new = feats[len(tokens) - 2: len(tokens) - 1]
        calls = clock.calls
        (d,) = h.propose([_request(tokens, new)])
        ran.append(clock.calls > calls)
        lengths.append(len(d.tokens))
        if ran[-1]:  # the pass extended the context with every feature it had missed
            assert h.drafter._caches[0].length == len(tokens) - 1
    return ran, lengths


def test_a_pass_that_costs_more_than_it_promises_is_skipped_and_probed_again() -> None:
    """The drafter doubts (E_ds ~ 0) and its pass costs 3 rounds' rest: lookup-only rounds
    (no match here: plain rounds) emit more per second, so the pass stops; probes re-measure
    after 4 rounds, then 8 (the gap doubles while they keep not paying)."""
    h, _ = _hybrid(conf_bias=-8.0)
    h.probe_every = h._probe_gap = 4
    clock = _Clock(h, pass_s=3.0, rest_s=1.0)
    ran, lengths = _rounds(h, clock, 16)
    assert h.round_times == pytest.approx((4.0, 1.0))  # with the pass: 3 + 1; without: 1
    # Round 1 measures the pass, round 2 the rest and skips; 4 skipped, a probe, 8, a probe.
    assert ran == [True] + [False] * 4 + [True] + [False] * 8 + [True, False]
    assert h.rounds["pass_skipped"] == 13
    assert all(n == 0 for n, r in zip(lengths, ran) if not r)


def test_a_pass_that_pays_for_itself_keeps_running() -> None:
    """A sure drafter (E_ds ~ K = 4) whose pass costs half a round's rest: 5 / 1.5 > 1."""
    h, _ = _hybrid(conf_bias=8.0)
    ran, lengths = _rounds(h, _Clock(h, pass_s=0.5, rest_s=1.0), 10)
    assert all(ran) and h.rounds["pass_skipped"] == 0 and lengths == [K] * 10
    # The same drafter whose pass costs 5 rounds' rest does not pay (5 / 6 < 1).
    slow, _ = _hybrid(conf_bias=8.0)
    ran, _ = _rounds(slow, _Clock(slow, pass_s=5.0, rest_s=1.0), 10)
    assert slow.rounds["pass_skipped"] > 0 and not all(ran)


def test_the_rest_of_a_round_is_measured_apart_after_rounds_with_and_without_the_pass() -> None:
    """Verifying a drafter block costs more than a plain or lookup round: each kind of round
    is timed apart, so the comparison is tokens per second of each kind."""
    h, _ = _hybrid(conf_bias=-8.0)
    _rounds(h, _TwoRests(h, pass_s=1.0, rest_s=1.0, rest_with=2.5), 6)
    assert h.round_times == pytest.approx((3.5, 1.0))
