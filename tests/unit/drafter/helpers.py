"""Tiny target + drafter pairs for the drafter and training tests."""

from __future__ import annotations

import torch

from dspark.drafter.config import DrafterConfig
from dspark.drafter.model import Drafter
from dspark.models.transformer import CausalLM
from tests.tiny import tiny_model

VOCAB = 96


def tiny_target(seed: int = 0) -> CausalLM:
    return tiny_model(num_layers=6, seed=seed, vocab_size=VOCAB)


def tiny_drafter(target: CausalLM, seed: int = 1, **kw: object) -> Drafter:
    kw.setdefault("markov_rank", 4)
    kw.setdefault("block_size", 4)
    kw.setdefault("mask_token_id", VOCAB - 2)
    cfg = DrafterConfig.for_target("tiny", target.cfg, **kw)
    torch.manual_seed(seed)
    d = Drafter(cfg, target)
    with torch.no_grad():  # make every head non-trivial (W2 starts at zero otherwise)
        for p in d.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.3)
        if cfg.draft_vocab_size is not None:
            d.draft_vocab_ids.copy_(torch.arange(cfg.draft_vocab_size) * 2)
    return d.eval()


def target_features(target: CausalLM, ids: torch.Tensor,
                    taps: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """ids (S,) -> (tapped features (S, m, d), final-normed hidden (S, d))."""
    from dspark.models.transformer import ForwardBatch

    S = ids.numel()
    cache = target.new_cache(1, S)
    with torch.no_grad():
        h, tapped = target(ids[None], ForwardBatch.build([0], [0], [S]), cache, tuple(taps))
    return torch.stack(tapped, dim=2)[0], h[0]
