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
    assert draft.probs is not None and len(draft.tokens) == K


def test_lookup_acceptance_is_read_from_the_feature_contract_and_skips_the_drafter() -> None:
    h, d = _hybrid(conf_bias=-8.0)
    tokens = list(REPEAT)
    h.start(0, tokens[:-1])
    feats = torch.randn(64, 3, 32)
    (draft,) = h.propose([_request(tokens, feats[: len(tokens) - 1])])
    assert h.rounds["lookup"] == 1 and h.rounds["lookup_skipped_drafter"] == 0  # the drafter ran to compare
    tokens += [7, 8, 9, 10, 11]  # all four accepted + the target's own token
    (draft,) = h.propose([_request(tokens, feats[len(REPEAT) - 1: len(tokens) - 1])])
    st = h._stats[0]
    assert (st.hits, st.trials) == (4.0, 4.0)
    # Lookup promises more than the drafter has been delivering: its pass is skipped, but its
    # context still took the five new features.
    assert h.rounds["lookup_skipped_drafter"] == 1 and draft.tokens
    assert h.drafter._caches[0].length == len(tokens) - 1


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
    """A fake clock: the drafter's pass advances it by `pass_s` when it drafts a block, and
    each round's rest (verification) by `rest_s` between proposals."""

    def __init__(self, h: HybridProposer, pass_s: float, rest_s: float) -> None:
        self.now, self.rest_s = 0.0, rest_s
        h.clock = lambda: self.now
        inner = h.drafter.propose
        self.drafted: list[bool] = []

        def timed(reqs: list[DraftRequest]) -> list:
            drafting = any(r.max_tokens > 0 for r in reqs)
            self.drafted.append(drafting)
            self.now += pass_s if drafting else 0.0
            return inner(reqs)
        h.drafter.propose = timed  # type: ignore[method-assign]

    def round(self) -> None:
        self.now += self.rest_s


NO_MATCH = [3, 14, 15, 9, 2, 6, 5]  # no repeated suffix: lookup has nothing to offer


def _rounds(h: HybridProposer, clock: _Clock, n: int) -> list[int]:
    """n rounds of one sequence, each accepting nothing (one new feature a round)."""
    tokens = list(NO_MATCH)
    h.start(0, tokens[:-1])
    feats = torch.randn(64, 3, 32)
    lengths = []
    (d,) = h.propose([_request(tokens, feats[: len(tokens) - 1])])
    lengths.append(len(d.tokens))
    for _ in range(n - 1):
        clock.round()
        tokens.append(40 + len(tokens))
        (d,) = h.propose([_request(tokens, feats[len(tokens) - 2: len(tokens) - 1])])
        lengths.append(len(d.tokens))
        assert h.drafter._caches[0].length == len(tokens) - 1  # skipped or not, the context keeps up
    return lengths


def test_a_pass_that_costs_more_than_it_promises_is_skipped_and_probed_again() -> None:
    """The drafter doubts (E_ds ~ 0) and its pass costs 3 rounds' rest: lookup-only rounds
    (no match here: plain rounds) emit more per second, so the pass stops, and runs again
    every `probe_every` rounds to re-measure."""
    h, _ = _hybrid(conf_bias=-8.0)
    h.probe_every = 4
    clock = _Clock(h, pass_s=3.0, rest_s=1.0)
    lengths = _rounds(h, clock, 12)
    assert h.pass_cost == pytest.approx(3.0)
    # Round 1 measures the pass, round 2 the rest and skips; 4 skipped, a probe, 4, a probe.
    assert clock.drafted == [True, False, False, False, False, True, False, False, False, False, True, False]
    assert h.rounds["pass_skipped"] == 9
    assert all(n == 0 for n, ran in zip(lengths, clock.drafted) if not ran)


def test_a_pass_that_pays_for_itself_keeps_running() -> None:
    """A sure drafter (E_ds ~ K = 4) whose pass costs half a round's rest: 5 / 1.5 > 1."""
    h, _ = _hybrid(conf_bias=8.0)
    clock = _Clock(h, pass_s=0.5, rest_s=1.0)
    lengths = _rounds(h, clock, 10)
    assert all(clock.drafted) and h.rounds["pass_skipped"] == 0 and lengths == [K] * 10
    # The same drafter whose pass costs 5 rounds' rest does not pay (5 / 6 < 1).
    slow, _ = _hybrid(conf_bias=8.0)
    _rounds(slow, _Clock(slow, pass_s=5.0, rest_s=1.0), 10)
    assert slow.rounds["pass_skipped"] > 0
