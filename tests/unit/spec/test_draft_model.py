"""The draft-model proposer's own KV cache: after every round `_sync` rolls it back to the
longest prefix it shares with the committed tokens. A wrong rollback length keeps the
output lossless (the target verifies everything) and only lowers acceptance, so output
equality cannot see it: these tests check the cache bookkeeping, the drafts against a
proposer rebuilt from scratch every round, and acceptance with a perfect draft model."""

from __future__ import annotations

import pytest
import torch

from dspark.engine.engine import Engine, EngineConfig
from dspark.spec.draft_model import DraftModelProposer
from dspark.spec.proposer import Draft, DraftRequest
from dspark.spec.sampling import SamplingParams
from tests.tiny import tiny_model

TARGET = tiny_model("llama", seed=1)
DRAFTER = tiny_model("llama", seed=2, num_layers=1)  # a worse model with the same vocabulary
PROMPTS = [[3, 17, 42, 5, 8], [1, 2, 3, 1, 2, 3, 1, 2], [77]]
K = 4


def fresh_drafts(model: torch.nn.Module, token_ids: list[int], max_tokens: int) -> list[int]:
    """What a proposer with an empty cache drafts after `token_ids` (greedy)."""
    prop = DraftModelProposer(model, max_batch_size=1, max_seq_len=256, stop_below=0.0)
    prop.start(0, token_ids)
    return prop.propose([DraftRequest(0, token_ids, max_tokens, SamplingParams(), None, None)])[0].tokens


class CheckedProposer(DraftModelProposer):
    """The real proposer; after every round it checks its cache against a rebuilt one."""

    rounds = 0
    rolled_back = 0  # tokens the rollbacks removed, over all rounds

    def propose(self, requests: list[DraftRequest]) -> list[Draft]:
        before = {r.seq_id: list(self.seqs[r.seq_id].cached_ids) for r in requests}
        drafts = super().propose(requests)
        for r, d in zip(requests, drafts):
            if r.max_tokens == 0:
                continue
            state = self.seqs[r.seq_id]
            # The cache holds the committed tokens, then every draft but the last (never fed).
            assert state.cached_ids == r.token_ids + d.tokens[:-1]
            assert self.cache.lengths[state.slot] == len(state.cached_ids)
            # Rolled back to the longest common prefix, not one token more or less.
            shared = 0
            while (shared < min(len(before[r.seq_id]), len(r.token_ids) - 1)
                   and before[r.seq_id][shared] == r.token_ids[shared]):
                shared += 1
            self.rolled_back += len(before[r.seq_id]) - shared
            assert d.tokens == fresh_drafts(self.model, r.token_ids, r.max_tokens), "stale or missing KV"
            self.rounds += 1
        return drafts


def run(proposer: DraftModelProposer, new_tokens: int = 16) -> list:  # noqa: ANN001
    eng = Engine(TARGET, TARGET.cfg.eos_token_ids, proposer,
                 EngineConfig(max_batch_size=len(PROMPTS), max_seq_len=256, block_size=K))
    return eng.generate(PROMPTS, SamplingParams(max_new_tokens=new_tokens, ignore_eos=True))


def test_sync_rolls_back_to_the_common_prefix_and_drafts_like_a_fresh_cache() -> None:
    prop = CheckedProposer(DRAFTER, max_batch_size=len(PROMPTS), max_seq_len=256, stop_below=0.0)
    outs = run(prop)
    assert prop.rounds >= 3 * len(PROMPTS)
    # A worse drafter is rejected mid-block: rollbacks really removed cached drafts.
    assert prop.rolled_back > 0 and sum(o.num_accepted for o in outs) < sum(o.num_drafted for o in outs)


def test_sync_unit_cases() -> None:
    prop = DraftModelProposer(DRAFTER, max_batch_size=1, max_seq_len=64, stop_below=0.0)
    prop.start(0, [5, 6])
    state = prop.seqs[0]
    d = prop.propose([DraftRequest(0, [5, 6], 3, SamplingParams(), None, None)])[0].tokens
    assert state.cached_ids == [5, 6, *d[:2]] and prop.cache.lengths[state.slot] == 4
    # The target kept the first draft and corrected the second: roll back to [5, 6, d0].
    wrong = (d[1] + 1) % 96
    assert prop._sync(DraftRequest(0, [5, 6, d[0], wrong], 3, SamplingParams())) == [wrong]
    assert state.cached_ids == [5, 6, d[0]] and prop.cache.lengths[state.slot] == 3
    # Everything accepted plus a bonus: nothing to roll back, feed the last draft and the bonus.
    prop.propose([DraftRequest(0, [5, 6, d[0], wrong], 2, SamplingParams(), None, None)])
    cached = list(state.cached_ids)
    assert prop._sync(DraftRequest(0, [*cached, 11, 12], 2, SamplingParams())) == [11, 12]
    assert prop.cache.lengths[state.slot] == len(cached)
    # The anchor is never kept in the cache, even when it repeats a cached token.
    assert prop._sync(DraftRequest(0, cached[:2], 2, SamplingParams())) == [cached[1]]
    assert prop.cache.lengths[state.slot] == 1


class SpoilsSecondDraft(DraftModelProposer):
    """Drafts with the target itself, then replaces every second draft with a wrong token:
    the target accepts the first, rejects the second and emits its own token there (the
    original draft), so each round's rollback removes the last two cached drafts."""

    def propose(self, requests: list[DraftRequest]) -> list[Draft]:
        drafts = super().propose(requests)
        for d in drafts:
            if len(d.tokens) >= 2:
                d.tokens[1] = (d.tokens[1] + 1) % TARGET.cfg.vocab_size
        return drafts


@pytest.mark.parametrize("batch", [1, len(PROMPTS)])
def test_acceptance_of_the_target_drafting_for_itself_is_exact(batch: int) -> None:
    """With the target as its own draft model every draft is the target's greedy token:
    full acceptance (tau = K + 1); with every second draft spoiled, exactly one accepted
    draft per round. A rollback that keeps one token too many or too few shifts the
    draft model's context, and its drafts stop matching."""
    new_tokens = 1 + 3 * (K + 1)
    for cls, accepted_per_round in ((DraftModelProposer, K), (SpoilsSecondDraft, 1)):
        prop = cls(TARGET, max_batch_size=batch, max_seq_len=256, stop_below=0.0)
        eng = Engine(TARGET, (), prop, EngineConfig(max_batch_size=batch, max_seq_len=256, block_size=K))
        for o in eng.generate(PROMPTS[:batch], SamplingParams(max_new_tokens=new_tokens)):
            assert len(o.token_ids) == new_tokens
            rounds = o.drafted_per_position[0]  # rounds that verified at least one draft
            assert rounds >= 3 and o.num_accepted == accepted_per_round * rounds, (cls.__name__, o)
            assert o.accepted_per_position[:accepted_per_round] == [rounds] * accepted_per_round
