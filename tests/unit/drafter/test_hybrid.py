from __future__ import annotations

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
