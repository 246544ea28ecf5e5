from __future__ import annotations

import math

import torch

from dspark.train.losses import TargetTopK, ce_and_l1, drafter_loss, l1_distance, l1_top_k, position_weights


def test_position_weights() -> None:
    w = position_weights(4, gamma=2.0)
    torch.testing.assert_close(w, torch.tensor([1.0, math.exp(-0.5), math.exp(-1.0), math.exp(-1.5)]))


def test_l1_is_over_the_full_vocabulary() -> None:
    target = torch.tensor([0.5, 0.2, 0.2, 0.1])
    logits = torch.log(torch.tensor([0.25, 0.75]))  # draft vocabulary = ids [0, 2]
    l1 = l1_distance(logits, target, torch.tensor([0, 2]))
    # |0.25 - 0.5| + |0.75 - 0.2| + (0.2 + 0.1 outside the draft vocabulary) = 1.1
    torch.testing.assert_close(l1, torch.tensor(1.1))
    full = l1_distance(torch.log(torch.tensor([0.25, 0.0, 0.75, 0.0])), target, None)
    torch.testing.assert_close(full, torch.tensor(1.1))


def test_hand_computed_terms_and_detached_confidence_label() -> None:
    # one block, K = 2, V = 2; only slot 0 supervised
    logits = torch.log(torch.tensor([[[[0.8, 0.2], [0.5, 0.5]]]])).requires_grad_(True)
    probs = torch.tensor([[[[0.6, 0.4], [0.5, 0.5]]]])
    target = TargetTopK(torch.tensor([[[[0, 1], [0, 1]]]]), probs, torch.zeros(1, 1, 2))  # k = V: no tail
    conf = torch.zeros(1, 1, 2, requires_grad=True)
    labels = torch.tensor([[[0, 1]]])
    sup = torch.tensor([[[True, False]]])
    t = drafter_loss(logits, conf, target, labels, sup, gamma=4.0)
    ce, l1 = -math.log(0.8), 0.4  # L1 = |0.8-0.6| + |0.2-0.4|
    y = 1 - 0.5 * l1  # soft label 0.8
    bce = -(y * math.log(0.5) + (1 - y) * math.log(0.5))
    torch.testing.assert_close(t.ce, torch.tensor(ce))
    torch.testing.assert_close(t.tv, torch.tensor(l1))
    torch.testing.assert_close(t.conf, torch.tensor(bce))
    torch.testing.assert_close(t.total, torch.tensor(0.1 * ce + 0.9 * l1 + bce))
    torch.testing.assert_close(t.accept_per_pos, torch.tensor([0.8, 0.0]))
    # Confidence loss alone: its gradient reaches the confidence logit only, not the drafts.
    t.conf.backward()
    assert logits.grad is None or torch.all(logits.grad == 0)
    torch.testing.assert_close(conf.grad, torch.tensor([[[0.5 - y, 0.0]]]))


def test_weighted_mean_over_positions() -> None:
    logits = torch.log(torch.tensor([[[[0.5, 0.5], [0.25, 0.75]]]]))
    labels = torch.tensor([[[0, 1]]])
    sup = torch.tensor([[[True, True]]])
    t = drafter_loss(logits, None, None, labels, sup, gamma=1.0, ce_only=True)
    w0, w1 = 1.0, math.exp(-1.0)
    want = (w0 * math.log(2) + w1 * -math.log(0.75)) / (w0 + w1)
    torch.testing.assert_close(t.total, torch.tensor(want))
    assert t.tv is None and t.conf is None


def test_labels_outside_draft_vocab_are_left_out_of_ce() -> None:
    logits = torch.log(torch.tensor([[[[0.25, 0.75], [0.5, 0.5]]]]))  # draft ids [1, 3]
    labels = torch.tensor([[[3, 2]]])  # 2 is outside
    sup = torch.ones(1, 1, 2, dtype=torch.bool)
    t = drafter_loss(logits, None, None, labels, sup, gamma=4.0, vocab_ids=torch.tensor([1, 3]), ce_only=True)
    torch.testing.assert_close(t.ce, torch.tensor(-math.log(0.75)))


def _random_case(R: int = 37, V: int = 300, k: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(R, V, generator=g, dtype=torch.float64) * 2
    p_t = torch.softmax(torch.randn(R, V, generator=g, dtype=torch.float64) * 3, -1)
    top = torch.topk(p_t, k)
    return z, p_t, top.indices, top.values, 1 - top.values.sum(-1)


def test_top_k_l1_equals_the_full_l1_when_the_tail_is_empty() -> None:
    z, _, idx, _, _ = _random_case(V=50, k=5)
    p_t = torch.zeros(z.shape[0], 50, dtype=torch.float64)
    mass = torch.softmax(torch.randn(z.shape[0], 5, dtype=torch.float64), -1)
    p_t.scatter_(-1, idx, mass)  # all target mass inside the top 5
    full = l1_distance(z, p_t, None)
    top = l1_top_k(torch.log_softmax(z, -1), idx, mass, torch.zeros(z.shape[0], dtype=torch.float64))
    torch.testing.assert_close(top, full)


def test_top_k_l1_is_a_lower_bound_within_the_tail_mass() -> None:
    z, p_t, idx, probs, tail = _random_case()
    full = l1_distance(z, p_t, None)
    top = l1_top_k(torch.log_softmax(z, -1), idx, probs, tail)
    assert (top <= full + 1e-9).all() and (full - top <= 2 * tail + 1e-9).all()


def test_fused_ce_and_l1_match_autograd_in_value_and_gradient() -> None:
    z, _, idx, probs, tail = _random_case()
    idx = idx.clone()
    idx[5, 2] = -1  # a target token outside the draft vocabulary
    y = torch.randint(0, z.shape[1], (z.shape[0],), generator=torch.Generator().manual_seed(1))
    y[3] = -1  # a label outside the draft vocabulary: no CE
    z1, z2 = z.clone().requires_grad_(), z.clone().requires_grad_()
    ce, l1 = ce_and_l1(z1, y, idx, probs, tail)
    log_p = torch.log_softmax(z2, -1)
    ce_ref = torch.where(y >= 0, -log_p.gather(-1, y.clamp_min(0)[:, None]).squeeze(-1), 0.0)
    l1_ref = l1_top_k(log_p, idx, probs, tail)
    torch.testing.assert_close(ce.double(), ce_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(l1.double(), l1_ref, atol=1e-5, rtol=1e-5)
    w1, w2 = torch.rand(z.shape[0], dtype=torch.float64), torch.rand(z.shape[0], dtype=torch.float64)
    (g1,) = torch.autograd.grad((ce * w1 + l1 * w2).sum(), z1)
    (g2,) = torch.autograd.grad((ce_ref * w1 + l1_ref * w2).sum(), z2)
    torch.testing.assert_close(g1, g2, atol=1e-6, rtol=1e-5)
    assert g1[3].sum().abs() < 1e-6  # softmax gradients sum to zero; no label term on row 3


def test_fused_loss_accepts_bf16_logits_and_returns_bf16_gradients() -> None:
    z, _, idx, probs, tail = _random_case()
    zb = z.to(torch.bfloat16).requires_grad_()
    y = torch.zeros(z.shape[0], dtype=torch.long)
    ce, l1 = ce_and_l1(zb, y, idx, probs, tail)
    (ce.sum() + l1.sum()).backward()
    assert ce.dtype == torch.float32 and zb.grad.dtype == torch.bfloat16 and torch.isfinite(zb.grad.float()).all()


def test_feature_term_is_a_position_weighted_mean_square_and_optional() -> None:
    from dspark.train.losses import feature_loss

    h = torch.zeros(1, 1, 2, 4)
    t = torch.tensor([[[[1.0, 1.0, 1.0, 1.0], [2.0, 0.0, 0.0, 0.0]]]])  # per-slot mean squares 1 and 1
    w = torch.tensor([[[1.0, 0.0]]])
    torch.testing.assert_close(feature_loss(h, t, w), torch.tensor(1.0))
    t[0, 0, 0] = 0.0
    torch.testing.assert_close(feature_loss(h, t, w), torch.tensor(0.0))  # slot 2 has weight 0
    logits = torch.zeros(1, 1, 2, 3)
    labels, sup = torch.tensor([[[0, 1]]]), torch.ones(1, 1, 2, dtype=torch.bool)
    off = drafter_loss(logits, None, None, labels, sup, gamma=4.0, ce_only=True, hidden=h, target_hidden=t)
    on = drafter_loss(logits, None, None, labels, sup, gamma=4.0, ce_only=True, hidden=h, target_hidden=t + 1,
                      feature_weight=0.5)
    assert off.feat is None and on.feat is not None
    torch.testing.assert_close(on.total, off.total + 0.5 * on.feat)
