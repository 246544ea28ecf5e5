from __future__ import annotations

import torch

from dspark.train.anchors import block_targets, sample_anchors, valid_anchor_positions


def test_valid_anchors_need_mask_at_p_and_p_plus_1() -> None:
    mask = torch.tensor([0, 1, 1, 1, 0, 1, 1, 0, 1])
    assert valid_anchor_positions(mask, 9).tolist() == [1, 2, 5]
    assert valid_anchor_positions(mask, 6).tolist() == [1, 2]  # p + 1 must be inside the length


def test_sample_anchors_is_sorted_distinct_valid_and_capped() -> None:
    mask = torch.ones(50, dtype=torch.long)
    mask[:10] = 0
    g = torch.Generator().manual_seed(0)
    a = sample_anchors(mask, 40, 8, g)
    assert a.numel() == 8 and a.tolist() == sorted(set(a.tolist()))
    assert all(10 <= p <= 38 for p in a.tolist())
    assert sample_anchors(mask, 13, 8, g).tolist() == [10, 11]  # fewer valid than N: all of them


def test_labels_prev_and_target_positions_align() -> None:
    ids = torch.arange(100, 112)[None]  # token at position p is 100 + p
    mask = torch.ones(1, 12, dtype=torch.long)
    bt = block_targets(ids, mask, [12], [torch.tensor([2])], block_size=3)
    assert bt.labels.tolist() == [[[103, 104, 105]]]  # label of slot j = token at a + 1 + j
    assert bt.target_pos.tolist() == [[[2, 3, 4]]]  # target distribution read at a + j


def test_supervision_is_prefix_contiguous_and_padding_anchors_are_dropped() -> None:
    ids = torch.arange(10)[None].repeat(2, 1)
    mask = torch.tensor([[1, 1, 1, 1, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]])
    # seq 0: anchor 1 -> labels at 2, 3, 4(masked), 5 -> [1, 1, 0, 0] although 5 is valid
    # seq 1: length 7, anchor 4 -> labels at 5, 6, 7(past end), 8 -> [1, 1, 0, 0]
    bt = block_targets(ids, mask, [10, 7], [torch.tensor([1, 6]), torch.tensor([4])], block_size=4)
    assert bt.supervised.int().tolist() == [[[1, 1, 0, 0], [1, 1, 1, 0]], [[1, 1, 0, 0], [0, 0, 0, 0]]]
    assert bt.anchors.tolist() == [[1, 6], [4, 4]]  # padding repeats a real anchor
    assert bt.labels[1, 1].tolist() == [0, 0, 0, 0]
