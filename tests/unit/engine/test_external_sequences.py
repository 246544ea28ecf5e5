"""What a fleet worker does with the engine, without touching its cache or its sequences: a
prefill engine fills a sequence's KV and exports it, another engine imports it and continues
with `verify_round`; everything the worker needs comes back in `RoundResult`s (tokens, finish
reason, next allowance, tapped features); the continuation equals the embedded engine's, and
slots come back."""

from __future__ import annotations

import pytest
import torch

from dspark.engine.engine import Engine, EngineConfig, RoundResult, StepStats
from dspark.spec.proposer import Draft
from dspark.spec.sampling import SamplingParams
from tests.tiny import tiny_model

MODEL = tiny_model(seed=3, num_layers=2)
PROMPT = [5, 9, 2, 17, 4, 11]
TAPS = (0, 1)


def engine(batch: int = 1) -> Engine:
    return Engine(MODEL, (), None, EngineConfig(max_batch_size=batch, max_seq_len=64, block_size=3))


def test_prefill_export_import_continue_equals_the_embedded_engine() -> None:
    params = SamplingParams(max_new_tokens=9)
    (reference,) = engine().generate([PROMPT], params)

    prefill = engine()
    seq = prefill.open_sequence(PROMPT, params)
    (first,) = prefill.prefill([seq], StepStats())
    assert first.tokens == reference.token_ids[:1] and first.drafted == 0 and first.finish_reason is None
    assert first.max_drafts == 3 and first.features is None  # no taps asked
    n, layers = prefill.export_kv(seq)
    assert n == len(PROMPT) and prefill.num_free_slots == 0
    layers = list(layers)
    prefill.close_sequence(seq)
    prefill.close_sequence(seq)  # idempotent: a retried release frees nothing twice
    assert prefill.num_free_slots == 1

    target = engine(batch=2)
    other = target.open_sequence([1, 2, 3], params)  # a neighbour in the next slot stays untouched
    cont = target.open_sequence(PROMPT, params)
    for i, (k, v) in enumerate(layers):
        target.import_kv_layer(cont, i, k, v)
    target.imported(cont, n, first.tokens)
    tokens, result = list(first.tokens), first
    while result.finish_reason is None:
        (result,) = target.verify_round([cont], [Draft([])], StepStats())
        tokens += result.tokens
    assert tokens == reference.token_ids
    assert result.finish_reason.value == "length" and result.max_drafts == 0
    target.close_sequence(cont)
    target.close_sequence(other)
    assert target.num_free_slots == 2 and target.max_context == 64


def test_round_results_carry_the_tapped_features_of_every_position_committed_to_the_kv() -> None:
    """Prefill's features cover the prompt; each round's cover the anchor and the accepted
    drafts (the positions it leaves in the KV). Concatenated, they equal one forward over the
    whole committed context: a drafter elsewhere sees exactly what an embedded one would."""
    params = SamplingParams(max_new_tokens=8)
    eng = engine()
    seq = eng.open_sequence(PROMPT, params, taps=TAPS)
    results: list[RoundResult] = eng.prefill([seq], StepStats())
    # A draft that is the target's own continuation (from a greedy reference) gets accepted.
    (ref,) = engine().generate([PROMPT], params)
    while results[-1].finish_reason is None:
        done = sum(len(r.tokens) for r in results)
        (r,) = eng.verify_round([seq], [Draft(ref.token_ids[done:done + 2] + [0])], StepStats())
        results.append(r)
    tokens = [t for r in results for t in r.tokens]
    assert tokens == ref.token_ids
    assert any(r.accepted >= 2 for r in results)  # some rounds committed several positions
    feats = torch.cat([r.features for r in results])  # type: ignore[misc]
    assert [len(r.features) for r in results[1:]] == [1 + r.accepted for r in results[1:]]  # type: ignore[arg-type]

    one = engine()
    whole = one.open_sequence(PROMPT + tokens[:-1], params, taps=TAPS)
    (all_at_once,) = one.prefill([whole], StepStats())
    assert all_at_once.features is not None and feats.shape == all_at_once.features.shape
    torch.testing.assert_close(feats, all_at_once.features, atol=1e-4, rtol=1e-4)


def test_only_sequences_with_taps_get_features_and_one_forward_taps_one_set() -> None:
    eng = engine(batch=3)
    params = SamplingParams(max_new_tokens=4)
    tapped, plain = eng.open_sequence(PROMPT, params, taps=TAPS), eng.open_sequence(PROMPT, params)
    a, b = eng.prefill([tapped, plain], StepStats())
    assert a.features is not None and a.features.shape[0] == len(PROMPT) and b.features is None
    a, b = eng.verify_round([tapped, plain], [Draft([]), Draft([])], StepStats())
    assert a.features is not None and a.features.shape[0] == 1 and b.features is None
    odd = eng.open_sequence(PROMPT, params, taps=(1,))
    with pytest.raises(ValueError, match="different target layers"):
        eng.verify_round([tapped, odd], [Draft([]), Draft([])], StepStats())
