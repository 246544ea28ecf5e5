from __future__ import annotations

import math

import torch

from dspark.train.losses import drafter_loss, l1_distance, position_weights


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
    target = torch.tensor([[[[0.6, 0.4], [0.5, 0.5]]]])
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
