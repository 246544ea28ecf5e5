"""Teacher-forced labels: the target's argmax replaces the text's tokens, and with
greedy_chains a block's supervision stops where the text leaves the target's greedy path."""

from __future__ import annotations

import torch

from dspark.train.anchors import block_targets
from dspark.train.online import TargetBatch
from dspark.train.trainer import with_target_labels

#            pos: 0   1   2   3   4   5   6   7
TEXT = torch.tensor([[5, 10, 11, 12, 13, 14, 15, 16]])
ARGMAX = torch.tensor([[0, 11, 12, 99, 14, 15, 16, 0]])  # the target's argmax at p (next token)
# text p+1 == argmax p at p = 1, 2, 4, 5 (not at 3: the text wrote 13 where the target says 99)


def _batch() -> TargetBatch:
    B, S = TEXT.shape
    mask = torch.tensor([[False, True, True, True, True, True, True, True]])
    top_ids = torch.stack([ARGMAX, torch.zeros_like(ARGMAX)], -1)  # (B, S, 2)
    return TargetBatch(TEXT, mask, [S], torch.zeros(B, S, 1, 4), torch.zeros(B, S, 4), top_ids,
                       torch.zeros(B, S, 2), torch.zeros(B, S))


def test_labels_are_the_argmax_and_chains_stop_at_the_first_disagreement() -> None:
    tb = _batch()
    blocks = block_targets(TEXT, tb.loss_mask, [8], [torch.tensor([1, 2])], block_size=4)
    plain = with_target_labels(blocks, tb, [True])
    # anchor 1: slots predict positions 2..5, labels = argmax at 1..4; anchor 2: argmax at 2..5
    assert plain.labels.tolist() == [[[11, 12, 99, 14], [12, 99, 14, 15]]]
    assert plain.supervised.all()
    chains = with_target_labels(blocks, tb, [True], greedy_chains=True)
    # anchor 1: text agrees at 1, 2, not at 3 -> slots 0, 1, 2 (slot 2's label 99 is the
    # target's next token after its own greedy 11, 12); slot 3 would follow the text's 13.
    # anchor 2: agrees at 2, not at 3 -> slots 0, 1.
    assert chains.supervised.tolist() == [[[True, True, True, False], [True, True, False, False]]]
    assert chains.labels.tolist() == [[[11, 12, 99, 0], [12, 99, 0, 0]]]


def test_rows_not_flagged_keep_their_text_labels_and_supervision() -> None:
    tb = _batch()
    blocks = block_targets(TEXT, tb.loss_mask, [8], [torch.tensor([1])], block_size=4)
    out = with_target_labels(blocks, tb, [False], greedy_chains=True)
    assert out.labels.tolist() == [[[11, 12, 13, 14]]] and out.supervised.all()
