from __future__ import annotations

import torch

from dspark.drafter.checkpoint import load_drafter, save_drafter
from dspark.drafter.config import default_taps
from dspark.drafter.context import ContextCache, block_hidden, extend_context
from tests.unit.drafter.helpers import VOCAB, target_features, tiny_drafter, tiny_target


def _inputs(S: int = 20, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB - 2, (S,), generator=g)
    return ids, torch.randn(S, 3, 32, generator=g)


def test_default_taps_are_evenly_spaced_and_skip_the_last_layers() -> None:
    assert default_taps(30) == [1, 10, 18, 27]
    assert default_taps(6) == [1, 2, 3]


def test_drafter_never_sees_the_anchor_feature_or_later() -> None:
    target = tiny_target()
    d = tiny_drafter(target)
    ids, feats = _inputs()
    anchors = torch.tensor([[3, 8, 14]])
    base = d.forward_train(feats[None], ids[None], anchors)
    for n, a in enumerate(anchors[0].tolist()):
        bumped = feats.clone()
        bumped[a:] += 5 * torch.randn_like(bumped[a:])
        out = d.forward_train(bumped[None], ids[None], anchors)
        torch.testing.assert_close(out.logits[0, n], base.logits[0, n])
        torch.testing.assert_close(out.conf_logits[0, n], base.conf_logits[0, n])
        earlier = feats.clone()
        earlier[a - 1] += 5.0  # the position just before the anchor IS visible
        assert not torch.allclose(d.forward_train(earlier[None], ids[None], anchors).logits[0, n],
                                  base.logits[0, n])


def test_block_does_not_see_other_blocks() -> None:
    target = tiny_target()
    d = tiny_drafter(target)
    ids, feats = _inputs()
    both = d.forward_train(feats[None], ids[None], torch.tensor([[4, 10]]))
    alone = d.forward_train(feats[None], ids[None], torch.tensor([[10]]))
    torch.testing.assert_close(both.logits[0, 1], alone.logits[0, 0])


def test_rank_zero_is_the_parallel_drafter() -> None:
    target = tiny_target()
    par = tiny_drafter(target, markov_rank=0)
    ids, feats = _inputs()
    anchors = torch.tensor([[2, 9]])
    out = par.forward_train(feats[None], ids[None], anchors)
    torch.testing.assert_close(out.logits, par.base_logits(out.hidden))
    # A rank-r drafter with W2 = 0 and the same backbone drafts exactly the same logits.
    semi = tiny_drafter(target, markov_rank=4)
    semi.load_state_dict({k: v for k, v in par.state_dict().items() if not k.startswith("conf.")},
                         strict=False)
    semi.markov_w2.weight.data.zero_()
    torch.testing.assert_close(semi.forward_train(feats[None], ids[None], anchors).logits, out.logits)


def test_incremental_context_cache_equals_scratch_and_training_pass() -> None:
    target = tiny_target()
    d = tiny_drafter(target)
    ids, feats = _inputs(S=16)
    inc = ContextCache(d, capacity=2)  # forces growth
    for lo, hi in [(0, 5), (5, 6), (6, 11), (11, 15)]:
        extend_context(d, inc, feats[lo:hi])
    scratch = ContextCache(d)
    extend_context(d, scratch, feats[:15])
    a = 15  # anchor position = context length
    h_inc = block_hidden(d, [inc], [int(ids[a])])
    h_scratch = block_hidden(d, [scratch], [int(ids[a])])
    torch.testing.assert_close(h_inc, h_scratch)
    train = d.forward_train(feats[None], ids[None], torch.tensor([[a]]))
    torch.testing.assert_close(h_inc[0], train.hidden[0, 0], atol=1e-5, rtol=1e-5)


def test_batched_block_pass_with_ragged_contexts_equals_single() -> None:
    target = tiny_target()
    d = tiny_drafter(target)
    ids, feats = _inputs(S=16)
    short, long_ = ContextCache(d), ContextCache(d)
    extend_context(d, short, feats[:4])
    extend_context(d, long_, feats[:12])
    both = block_hidden(d, [short, long_], [3, 7])
    torch.testing.assert_close(both[0], block_hidden(d, [short], [3])[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(both[1], block_hidden(d, [long_], [7])[0], atol=1e-5, rtol=1e-5)


def test_checkpoint_round_trip_keeps_only_drafter_tensors(tmp_path) -> None:
    from safetensors.torch import load_file

    target = tiny_target()
    d = tiny_drafter(target, draft_vocab_size=40)
    d.conf_temperature.fill_(1.5)
    d.conf_offset.fill_(-0.25)
    save_drafter(d, tmp_path, dtype=torch.float32)
    names = set(load_file(str(tmp_path / "model.safetensors")))
    assert not any("embed" in n or "lm_head" in n for n in names)
    back = load_drafter(tmp_path, target, dtype=torch.float32)
    ids, feats = _inputs()
    a = torch.tensor([[5]])
    torch.testing.assert_close(back.forward_train(feats[None], ids[None], a).logits,
                               d.forward_train(feats[None], ids[None], a).logits)
    assert back.conf_temperature.tolist() == [1.5] * 4 and back.conf_offset.tolist() == [-0.25] * 4
    assert back.draft_vocab_ids.tolist() == list(range(0, 80, 2))
    assert back.head_weight().data_ptr() != 0 and back.target is target


def test_real_target_features_feed_the_drafter() -> None:
    target = tiny_target()
    d = tiny_drafter(target)
    ids, _ = _inputs(S=12)
    feats, final = target_features(target, ids, d.cfg.taps)
    assert feats.shape == (12, 3, 32) and final.shape == (12, 32)
    out = d.forward_train(feats[None], ids[None], torch.tensor([[4]]))
    assert torch.isfinite(out.logits).all()


def test_direct_path_never_reads_the_anchor_feature_or_later() -> None:
    target = tiny_target()
    d = tiny_drafter(target, direct_path=True)
    with torch.no_grad():
        d.direct.weight.normal_(0, 0.3)  # non-trivial (it starts at zero)
    ids, feats = _inputs()
    anchors = torch.tensor([[3, 8, 14]])
    base = d.forward_train(feats[None], ids[None], anchors)
    for n, a in enumerate(anchors[0].tolist()):
        bumped = feats.clone()
        bumped[a:] += 5 * torch.randn_like(bumped[a:])
        torch.testing.assert_close(d.forward_train(bumped[None], ids[None], anchors).logits[0, n], base.logits[0, n])
    # The fused feature at a - 1 reaches the slots through the direct path itself, not only
    # through attention: with attention to the context cut off it still moves the drafts.
    without = tiny_drafter(target, direct_path=True)
    without.load_state_dict(d.state_dict())
    for layer in without.layers:
        layer.k_proj.weight.data.zero_()  # uniform attention over context + block
        layer.v_proj.weight.data.zero_()  # ... that carries nothing
    earlier = feats.clone()
    earlier[7] += 5.0  # a - 1 for the anchor at 8
    a0 = without.forward_train(feats[None], ids[None], anchors).logits[0, 1]
    assert not torch.allclose(without.forward_train(earlier[None], ids[None], anchors).logits[0, 1], a0)


def test_direct_path_inference_equals_the_training_pass() -> None:
    target = tiny_target()
    d = tiny_drafter(target, direct_path=True)
    ids, feats = _inputs(S=16)
    cache = ContextCache(d)
    extend_context(d, cache, feats[:6])
    extend_context(d, cache, feats[6:11])
    h = block_hidden(d, [cache], [int(ids[11])])
    train = d.forward_train(feats[None], ids[None], torch.tensor([[11]]))
    torch.testing.assert_close(h[0], train.hidden[0, 0], atol=1e-5, rtol=1e-5)


def test_dedicated_mask_row_is_outside_the_vocabulary_and_trained() -> None:
    target = tiny_target()
    d = tiny_drafter(target, mask_token_id=VOCAB)  # the trainer's choice: vocab_size
    assert d.cfg.dedicated_mask and d.mask_embedding.requires_grad
    torch.testing.assert_close(d.mask_embedding, target.model.embed_tokens.weight.float().mean(0))  # its start
    block = d.block_ids(torch.tensor([5]))
    assert block.tolist() == [[5, VOCAB, VOCAB, VOCAB]]
    x = d.embed_block(block)
    torch.testing.assert_close(x[0, 1], d.mask_embedding.to(x.dtype))
    torch.testing.assert_close(x[0, 0], target.embed(torch.tensor([5]))[0].to(x.dtype))
    ids, feats = _inputs()
    out = d.forward_train(feats[None], ids[None], torch.tensor([[6]]))
    out.logits.float().sum().backward()
    assert d.mask_embedding.grad is not None and d.mask_embedding.grad.abs().sum() > 0


def test_one_matmul_logits_equal_head_plus_markov_bias() -> None:
    target = tiny_target()
    d = tiny_drafter(target, draft_vocab_size=40)
    h = torch.randn(2, 3, 32)
    prev = torch.randint(0, VOCAB, (2, 3))
    torch.testing.assert_close(d.teacher_forced_logits(h, prev).float(),
                               d.base_logits(h) + d.markov_bias(prev), atol=1e-5, rtol=1e-5)
