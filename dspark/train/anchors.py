"""Anchor sampling and block labels for drafter training.

For anchor a_n and slot j (0..K-1):
    label        = token at a_n + 1 + j      (what slot j must predict)
    prev token   = token at a_n + j          (Markov / confidence input, teacher forced)
    target dist. = target's next-token distribution at position a_n + j
Supervision of slot j requires a valid label (inside the sequence and the assistant span)
for every slot i <= j: the mask is prefix-contiguous.
"""

from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass
class AnchorBatch:
    anchors: torch.Tensor  # (B, N) sorted anchor positions (padding rows repeat a real anchor)
    labels: torch.Tensor  # (B, N, K) token at a + 1 + j (0 where unsupervised)
    target_pos: torch.Tensor  # (B, N, K) a + j, clamped into the sequence
    supervised: torch.Tensor  # (B, N, K) bool, prefix-contiguous; all False on padding anchors


def valid_anchor_positions(loss_mask: torch.Tensor, length: int) -> torch.Tensor:
    """Positions p < length - 1 with loss_mask[p] = loss_mask[p + 1] = 1."""
    m = loss_mask[:length].bool()
    return (m[:-1] & m[1:]).nonzero().squeeze(1)


def sample_anchors(loss_mask: torch.Tensor, length: int, max_anchors: int,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """Up to `max_anchors` distinct valid positions, sorted ascending."""
    valid = valid_anchor_positions(loss_mask, length)
    if valid.numel() > max_anchors:
        pick = torch.randperm(valid.numel(), generator=generator)[:max_anchors]
        valid = valid[pick]
    return valid.sort().values


def block_targets(input_ids: torch.Tensor, loss_mask: torch.Tensor, lengths: list[int],
                  anchors: list[torch.Tensor], block_size: int) -> AnchorBatch:
    """Labels and masks for a batch; sequence b has `anchors[b]` (sorted, possibly empty).

    Sequences with fewer anchors are padded by repeating their first anchor (or position 0)
    with an all-False supervision row: a padding block still sees its own slots, so no
    attention row is empty, and it contributes nothing to any loss.
    """
    B, S = input_ids.shape
    N = max(1, max(a.numel() for a in anchors))
    K = block_size
    anc = torch.zeros(B, N, dtype=torch.long)
    real = torch.zeros(B, N, dtype=torch.bool)
    for b, a in enumerate(anchors):
        n = a.numel()
        anc[b, :n] = a
        anc[b, n:] = a[0] if n else 0
        real[b, :n] = True
    j = torch.arange(K)
    label_pos = anc[:, :, None] + 1 + j  # (B, N, K)
    inside = label_pos < torch.tensor(lengths)[:, None, None]
    lp = label_pos.clamp(max=S - 1)
    ok = inside & loss_mask.bool().gather(1, lp.view(B, -1)).view(B, N, K)
    supervised = ok.long().cumprod(-1).bool() & real[:, :, None]  # stop at the first invalid label
    labels = input_ids.gather(1, lp.view(B, -1)).view(B, N, K).masked_fill(~supervised, 0)
    return AnchorBatch(anchors=anc, labels=labels, target_pos=(anc[:, :, None] + j).clamp(max=S - 1),
                       supervised=supervised)
