"""Online target capture: everything the drafter loss needs, computed by the target per batch.

Per padded batch of examples one no-grad target forward gives the m tapped layer outputs
(the drafter's context) and the final-normed hidden states. The target's next-token
distribution is kept only as its top-k tokens plus the tail mass, and only at answer
positions (the only ones a supervised slot reads): k = 64 holds > 99% of SmolLM2's mass on
its own answers, and a (positions, k) table costs nothing next to the (positions, V)
softmax the offline cache recomputed at every anchor visit.

Capturing online (instead of a cache of taps on disk) bounds the data by what the target
can read, not by disk: a drafter step costs far more than the target's forward.
"""

from __future__ import annotations

import dataclasses

import torch

from dspark.models.transformer import CausalLM, ForwardBatch
from dspark.train.examples import Example

TOP_K = 64
HEAD_CHUNK = 1024  # rows of the LM head evaluated at once (bounds the (rows, V) float buffer)


@dataclasses.dataclass
class TargetBatch:
    input_ids: torch.Tensor  # (B, S) right-padded with 0
    loss_mask: torch.Tensor  # (B, S) bool
    lengths: list[int]
    taps: torch.Tensor  # (B, S, m, d) raw tapped layer outputs (target dtype)
    final: torch.Tensor  # (B, S, d) final-normed hidden states: the LM head's input (target dtype)
    top_ids: torch.Tensor  # (B, S, k) the target's k most likely next tokens (0 off the answer)
    top_probs: torch.Tensor  # (B, S, k) float32, their probabilities
    tail: torch.Tensor  # (B, S) float32, the mass outside the top k


def pad_examples(examples: list[Example]) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    lengths = [len(e) for e in examples]
    B, S = len(examples), max(lengths)
    ids = torch.zeros(B, S, dtype=torch.long)
    mask = torch.zeros(B, S, dtype=torch.bool)
    for b, e in enumerate(examples):
        ids[b, : lengths[b]], mask[b, : lengths[b]] = e.input_ids, e.loss_mask
    return ids, mask, lengths


def top_k_next_token(target: CausalLM, hidden: torch.Tensor, k: int = TOP_K) -> tuple[torch.Tensor, ...]:
    """hidden (P, d) final-normed -> (ids (P, k), probs (P, k) float32, tail (P,) float32)."""
    ids, probs = [], []
    for rows in hidden.split(HEAD_CHUNK):
        p = torch.softmax(target.logits(rows), dim=-1)  # (r, V) float32
        top = torch.topk(p, k, dim=-1)
        ids.append(top.indices)
        probs.append(top.values)
    top_ids, top_probs = torch.cat(ids), torch.cat(probs)
    return top_ids, top_probs, (1.0 - top_probs.sum(-1)).clamp_min(0.0)


@torch.no_grad()
def capture(target: CausalLM, examples: list[Example], taps: tuple[int, ...], k: int = TOP_K) -> TargetBatch:
    """One target forward over the padded batch (positions 0.. for every row)."""
    ids, mask, lengths = pad_examples(examples)
    B, S = ids.shape
    dev = target.lm_head.weight.device
    cache = target.new_cache(B, S)
    batch = ForwardBatch.build(list(range(B)), [0] * B, lengths, dev)
    final, tapped = target(ids.to(dev), batch, cache, taps)  # (B, S, d), m x (B, S, d)
    mask = mask.to(dev)
    rows = final[mask]  # (P, d) answer positions only
    p_ids, p_probs, p_tail = top_k_next_token(target, rows, k)
    top_ids = torch.zeros(B, S, k, dtype=torch.long, device=dev)
    top_probs = torch.zeros(B, S, k, dtype=torch.float32, device=dev)
    tail = torch.zeros(B, S, dtype=torch.float32, device=dev)
    top_ids[mask], top_probs[mask], tail[mask] = p_ids, p_probs, p_tail
    return TargetBatch(ids.to(dev), mask, lengths, torch.stack(tapped, dim=2), final, top_ids, top_probs, tail)
