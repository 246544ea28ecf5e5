"""What a fleet worker does with the engine, without touching its cache: a prefill engine
fills a sequence's KV and exports it, another engine imports it and continues with
`verify_round`; the continuation equals the embedded engine's, and slots come back."""

from __future__ import annotations

from dspark.engine.engine import Engine, EngineConfig, StepStats
from dspark.spec.proposer import Draft
from dspark.spec.sampling import SamplingParams
from tests.tiny import tiny_model

MODEL = tiny_model(seed=3, num_layers=2)
PROMPT = [5, 9, 2, 17, 4, 11]


def test_prefill_export_import_continue_equals_the_embedded_engine() -> None:
    params = SamplingParams(max_new_tokens=9)
    (reference,) = Engine(MODEL, (), None, EngineConfig(max_batch_size=1, max_seq_len=64)).generate([PROMPT], params)

    prefill = Engine(MODEL, (), None, EngineConfig(max_batch_size=1, max_seq_len=64))
    seq = prefill.open_sequence(PROMPT, params)
    prefill.prefill([seq], StepStats())
    n, layers = prefill.export_kv(seq)
    assert n == len(PROMPT) and prefill.num_free_slots == 0
    layers = list(layers)
    prefill.close_sequence(seq)
    prefill.close_sequence(seq)  # idempotent: a retried release frees nothing twice
    assert prefill.num_free_slots == 1

    target = Engine(MODEL, (), None, EngineConfig(max_batch_size=2, max_seq_len=64))
    other = target.open_sequence([1, 2, 3], params)  # a neighbour in the next slot stays untouched
    cont = target.open_sequence(PROMPT, params)
    for i, (k, v) in enumerate(layers):
        target.import_kv_layer(cont, i, k, v)
    target.imported(cont, n, seq.output_ids)
    while not cont.finished:
        target.verify_round([cont], [Draft([])], StepStats())
    assert cont.output_ids == reference.token_ids
    target.close_sequence(cont)
    target.close_sequence(other)
    assert target.num_free_slots == 2 and target.max_context == 64
