from __future__ import annotations

import dataclasses

import torch

from dspark.drafter.checkpoint import save_drafter
from dspark.drafter.proposer import DrafterProposer
from dspark.spec.proposer import DraftRequest, create_proposer
from dspark.spec.sampling import SamplingParams, probs_from_logits
from tests.unit.drafter.helpers import VOCAB, tiny_drafter, tiny_target


def _setup(**kw: object):
    target = tiny_target()
    d = tiny_drafter(target, **kw)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, VOCAB - 2, (14,), generator=g)
    feats = torch.randn(14, 3, 32, generator=g)
    return d, ids, feats


def _teacher_forced_probs(d, ids, feats, a, drafted, params) -> torch.Tensor:
    """Training pass with the drafted tokens as the teacher-forced prefix: (K, V)."""
    seq = torch.cat([ids[: a + 1], torch.tensor(drafted)])
    f = torch.cat([feats[:a], torch.zeros(len(seq) - a, *feats.shape[1:])])
    z = d.forward_train(f[None], seq[None], torch.tensor([[a]])).logits[0, 0]  # (K, Vd)
    return probs_from_logits(d.to_full_vocab(z), params)


def test_greedy_tokens_are_the_argmax_of_the_markov_corrected_distribution() -> None:
    d, ids, feats = _setup(draft_vocab_size=40)
    prop = DrafterProposer(d, "dspark")
    prop.start(0, ids[:9].tolist())
    params = SamplingParams()
    (draft,) = prop.propose([DraftRequest(0, ids[:10].tolist(), 4, params, new_features=feats[:9])])
    assert len(draft.tokens) == 4 and draft.probs is None  # greedy: a one-hot q, left implicit
    assert all(t % 2 == 0 and t < 80 for t in draft.tokens)  # inside the draft vocabulary
    ref = _teacher_forced_probs(d, ids, feats, 9, draft.tokens, params)  # (K, V) one-hots
    assert ref.argmax(-1).tolist() == draft.tokens
    assert draft.confidences.shape == (4,) and ((draft.confidences > 0) & (draft.confidences < 1)).all()


def test_greedy_ties_go_to_the_lowest_target_id() -> None:
    d, ids, feats = _setup(draft_vocab_size=40)
    with torch.no_grad():  # every draft logit equal: argmax over the full vocabulary is its lowest id
        d.target.lm_head.weight.zero_()
        d.markov_w2.weight.zero_()
    prop = DrafterProposer(d, "dspark")
    prop.start(0, ids[:9].tolist())
    (draft,) = prop.propose([DraftRequest(0, ids[:10].tolist(), 3, SamplingParams(), new_features=feats[:9])])
    assert draft.tokens == [int(d.draft_vocab_ids.min())] * 3


def test_greedy_and_sampled_rows_in_one_batch_draft_as_they_would_alone() -> None:
    d, ids, feats = _setup(draft_vocab_size=40)
    sampled = SamplingParams(temperature=0.9, seed=1)

    def run(rows: list[int]) -> dict[int, object]:
        prop = DrafterProposer(d, "dspark")
        reqs = []
        for sid in rows:
            prop.start(sid, ids[:9].tolist())
            params = sampled if sid == 1 else SamplingParams()
            reqs.append(DraftRequest(sid, ids[:10].tolist(), 4, params, new_features=feats[:9],
                                     generator=torch.Generator().manual_seed(7)))
        return {sid: dr for sid, dr in zip(rows, prop.propose(reqs), strict=True)}

    both, alone = run([0, 1]), {**run([0]), **run([1])}
    assert both[0].tokens == alone[0].tokens and both[0].probs is None
    assert both[1].tokens == alone[1].tokens
    torch.testing.assert_close(both[1].probs, alone[1].probs)
    assert both[1].probs.shape == (4, VOCAB)


def test_sampled_drafts_return_the_markov_corrected_distribution() -> None:
    d, ids, feats = _setup()
    prop = DrafterProposer(d, "dspark")
    params = SamplingParams(temperature=0.8, top_k=20, top_p=0.9)
    prop.start(0, ids[:9].tolist())
    req = DraftRequest(0, ids[:10].tolist(), 4, params, new_features=feats[:9],
                       generator=torch.Generator().manual_seed(0))
    (draft,) = prop.propose([req])
    assert all(draft.probs[k, t] > 0 for k, t in enumerate(draft.tokens))
    torch.testing.assert_close(draft.probs, _teacher_forced_probs(d, ids, feats, 9, draft.tokens, params))


def test_incremental_rounds_match_a_fresh_proposer_and_batching() -> None:
    d, ids, feats = _setup()
    params = SamplingParams()
    inc = DrafterProposer(d, "dspark")
    inc.start(0, ids[:5].tolist())
    inc.propose([DraftRequest(0, ids[:6].tolist(), 4, params, new_features=feats[:5])])
    inc.propose([DraftRequest(0, ids[:9].tolist(), 0, params, new_features=feats[5:8])])
    (a,) = inc.propose([DraftRequest(0, ids[:13].tolist(), 3, params, new_features=feats[8:12])])
    fresh = DrafterProposer(d, "dspark")
    fresh.start(1, ids[:7].tolist())
    fresh.start(2, ids[:12].tolist())
    b, c = fresh.propose([DraftRequest(1, ids[:7].tolist(), 2, params, new_features=feats[:6]),
                          DraftRequest(2, ids[:13].tolist(), 3, params, new_features=feats[:12])])
    assert a.tokens == c.tokens and len(b.tokens) == 2
    torch.testing.assert_close(a.confidences, c.confidences)


def test_registered_factories_load_a_checkpoint(tmp_path) -> None:
    d, ids, feats = _setup(markov_rank=0, confidence_head=False)
    save_drafter(d, tmp_path, dtype=torch.float32)
    target = dataclasses.make_dataclass("T", ["name", "model", "config"])("tiny", d.target, d.target.cfg)
    prop = create_proposer("dflash", target=target, checkpoint=str(tmp_path), block_size=3)
    assert prop.feature_layers == (1, 2, 3)
    prop.start(0, [])
    (draft,) = prop.propose([DraftRequest(0, ids[:10].tolist(), 7, SamplingParams(), new_features=feats[:9])])
    assert len(draft.tokens) == 3 and draft.confidences is None


def test_gated_rounds_hand_their_features_to_the_next_drafted_round() -> None:
    """With the draft gate skipping rounds, features of the skipped positions reach the
    drafter at the next probe (the proposer raises if its context falls behind), and greedy
    output stays identical to AR."""
    from dspark.engine.engine import Engine, EngineConfig
    from dspark.spec.gate import DraftGate
    from dspark.spec.sampling import SamplingParams
    from dspark.spec.scheduler import StepCostProfile

    target = tiny_target()
    prompts = [[5, 6, 7, 8], [9, 10], [11, 12, 13]]
    params = SamplingParams(max_new_tokens=20)
    ar = Engine(target, (), None, EngineConfig(max_batch_size=3, max_seq_len=64)).generate(prompts, params)
    proposer = DrafterProposer(tiny_drafter(target), "dspark")
    # Verification cost explodes with B: drafting never pays, so most rounds are gated off.
    gate = DraftGate(StepCostProfile.from_points({1: 100.0, 3: 100.0, 16: 1.0}), max_skip=3)
    eng = Engine(target, (), proposer, EngineConfig(max_batch_size=3, max_seq_len=64, block_size=4), gate=gate)
    assert [o.token_ids for o in eng.generate(prompts, params)] == [o.token_ids for o in ar]
    assert gate.drafted_rounds >= 3 and gate.skipped_rounds >= gate.drafted_rounds


def test_greedy_and_sampled_rows_use_their_own_calibration(tmp_path) -> None:
    from dspark.drafter.checkpoint import load_drafter, save_calibration

    d, ids, feats = _setup()
    save_drafter(d, tmp_path, dtype=torch.float32)
    K = d.cfg.block_size
    save_calibration(tmp_path, torch.ones(K), torch.full((K,), -2.0), greedy=True)
    save_calibration(tmp_path, torch.ones(K), torch.full((K,), 2.0), greedy=False)
    back = load_drafter(tmp_path, d.target, dtype=torch.float32)
    z = torch.zeros(2, K)
    c = back.calibrated(z, torch.tensor([True, False]))
    torch.testing.assert_close(c[0], torch.sigmoid(torch.full((K,), -2.0)))
    torch.testing.assert_close(c[1], torch.sigmoid(torch.full((K,), 2.0)))
    prop = DrafterProposer(back, "dspark")
    for seq in (0, 1):
        prop.start(seq, ids[:9].tolist())
    greedy, sampled = SamplingParams(), SamplingParams(temperature=1.0, seed=1)
    drafts = prop.propose([DraftRequest(0, ids[:10].tolist(), K, greedy, new_features=feats[:9]),
                           DraftRequest(1, ids[:10].tolist(), K, sampled, new_features=feats[:9],
                                        generator=torch.Generator().manual_seed(0))])
    raw0, raw1 = prop.last_conf_logits[0], prop.last_conf_logits[1]
    torch.testing.assert_close(drafts[0].confidences, torch.sigmoid(raw0 - 2.0))
    torch.testing.assert_close(drafts[1].confidences, torch.sigmoid(raw1 + 2.0))
