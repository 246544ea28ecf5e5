from __future__ import annotations

import pytest
import torch

from dspark.kv.cache import KVCache, KVCacheFull
from dspark.models.runner import ModelRunner, SeqInput
from tests.tiny import tiny_model


def _logits_after(model, tokens: list[int]) -> torch.Tensor:
    """Recompute from scratch: fresh cache, one forward over all tokens."""
    runner = ModelRunner(model, model.new_cache(1, 128))
    slot = runner.cache.allocate()
    return runner.forward([SeqInput(slot, tokens)], last_only=True).logits[0][-1]


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_rollback_then_decode_equals_recompute(family: str) -> None:
    model = tiny_model(family)
    runner = ModelRunner(model, model.new_cache(2, 128))
    slot = runner.cache.allocate()
    prompt = list(range(3, 15))
    runner.forward([SeqInput(slot, prompt)])
    runner.forward([SeqInput(slot, [20, 21, 22, 23])])  # speculative tokens ...
    runner.cache.rollback(slot, len(prompt) + 1)  # ... only the first is kept
    got = runner.forward([SeqInput(slot, [30])], last_only=True).logits[0][-1]
    want = _logits_after(model, prompt + [20, 30])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_export_import_into_other_cache_equals_recompute() -> None:
    model = tiny_model("qwen3")
    a = ModelRunner(model, model.new_cache(2, 64))
    b = ModelRunner(model, model.new_cache(3, 64))
    sa = a.cache.allocate()
    prompt = [5, 9, 2, 7, 7, 1, 3]
    a.forward([SeqInput(sa, prompt)])
    b.cache.allocate()
    sb = b.cache.allocate()  # a different slot index on purpose
    for layer, (k, v) in enumerate(a.cache.export_layers(sa)):
        b.cache.import_layer(sb, layer, k, v)
    b.cache.set_length(sb, len(prompt))
    got = b.forward([SeqInput(sb, [11, 12])]).logits[0]
    want = a.forward([SeqInput(sa, [11, 12])]).logits[0]
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got[-1], _logits_after(model, prompt + [11, 12]), atol=1e-5, rtol=1e-5)


def test_slot_bookkeeping() -> None:
    cache = KVCache(num_layers=1, num_slots=2, max_len=4, num_kv_heads=1, head_dim=2)
    s0, s1 = cache.allocate(), cache.allocate()
    assert {s0, s1} == {0, 1} and cache.num_free == 0
    with pytest.raises(KVCacheFull):
        cache.allocate()
    cache.set_length(s0, 3)
    with pytest.raises(ValueError):
        cache.rollback(s0, 4)  # cannot roll forward
    cache.rollback(s0, 1)
    assert cache.lengths[s0] == 1
    with pytest.raises(KVCacheFull):
        cache.reserve(s0, 4)
    cache.free(s0)
    with pytest.raises(ValueError):
        cache.free(s0)
    with pytest.raises(ValueError):
        cache.import_layer(s1, 0, torch.zeros(2, 3, 2), torch.zeros(2, 3, 2))


def test_batched_forward_matches_single() -> None:
    model = tiny_model("gemma3")  # sliding window 8 < prompt lengths
    runner = ModelRunner(model, model.new_cache(3, 64))
    prompts = [list(range(1, 20)), [4, 5, 6], list(range(30, 42))]
    slots = [runner.cache.allocate() for _ in prompts]
    out = runner.forward([SeqInput(s, p) for s, p in zip(slots, prompts)])
    for p, logits in zip(prompts, out.logits):
        torch.testing.assert_close(logits[-1], _logits_after(model, p), atol=1e-5, rtol=1e-5)
    # then one decode token each, batched with different cache lengths
    out2 = runner.forward([SeqInput(s, [7]) for s in slots])
    for p, logits in zip(prompts, out2.logits):
        torch.testing.assert_close(logits[-1], _logits_after(model, p + [7]), atol=1e-5, rtol=1e-5)


def test_head_major_store_and_its_views_share_memory() -> None:
    """Attention reads a slot's keys per head as one contiguous (S, hd) block; `k[layer]`
    indexes the same memory as (slot, position, head, dim); spare rows sit past max_len."""
    cache = KVCache(num_layers=2, num_slots=3, max_len=6, num_kv_heads=2, head_dim=4, spare=5)
    store, view = cache.k_store[1], cache.k[1]
    assert store.shape == (3, 2, 11, 4) and view.shape == (3, 6, 2, 4)
    view[2, 5] = torch.arange(8.0).view(2, 4)
    assert torch.equal(store[2, :, 5], torch.arange(8.0).view(2, 4))
    assert store[2, 1, :6].is_contiguous()
    cache.lengths[2] = 6
    for k, _ in cache.export_layers(2):
        assert k.shape == (6, 2, 4) and k.is_contiguous()
