"""Drafter losses. With position weights w_j = exp(-j / gamma) and weighted means over the
supervised slots:

    L_ce   = CE(softmax(Z), label)                         Markov-corrected draft vs label
    L_tv   = sum_v |p(v) - p_t(v)|                          full-vocab L1 (= 2 TV)
    L_conf = BCE(conf_logit, sg[1 - 0.5 * L1])              exact T=1 acceptance of one draft
    total  = 0.1 L_ce + 0.9 L_tv + 1.0 L_conf               (DFlash control: L_ce only)

Draft logits may cover only the draft vocabulary (ids `vocab_ids`); outside it p = 0, so the
L1 adds the target mass there, and labels outside it are left out of the CE.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

CE_WEIGHT, TV_WEIGHT, CONF_WEIGHT = 0.1, 0.9, 1.0


@dataclasses.dataclass
class LossTerms:
    total: torch.Tensor
    ce: torch.Tensor
    tv: torch.Tensor | None
    conf: torch.Tensor | None
    conf_kl: torch.Tensor | None  # L_conf minus the soft labels' own entropy: the reducible part
    accept_per_pos: torch.Tensor  # (K,) mean of 1 - 0.5 L1 per slot (expected T=1 acceptance)
    count_per_pos: torch.Tensor  # (K,) supervised slots per position


def position_weights(block_size: int, gamma: float) -> torch.Tensor:
    """w_j = exp(-j / gamma), j = 0..K-1."""
    return torch.exp(-torch.arange(block_size, dtype=torch.float32) / gamma)


def weighted_mean(values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    return (values * weights).sum() / weights.sum().clamp_min(1e-12)


def l1_distance(draft_logits: torch.Tensor, target_probs: torch.Tensor,
                vocab_ids: torch.Tensor | None) -> torch.Tensor:
    """sum_v |p(v) - p_t(v)| over the FULL vocabulary: (..., Vd), (..., V) -> (...)."""
    p = torch.softmax(draft_logits.float(), dim=-1)
    if vocab_ids is None:
        return (p - target_probs).abs().sum(-1)
    inside = target_probs.index_select(-1, vocab_ids)  # (..., Vd)
    outside = target_probs.sum(-1) - inside.sum(-1)  # p = 0 there: |0 - p_t| = p_t
    return (p - inside).abs().sum(-1) + outside.clamp_min(0)


def drafter_loss(draft_logits: torch.Tensor, conf_logits: torch.Tensor | None,
                 target_probs: torch.Tensor | None, labels: torch.Tensor, supervised: torch.Tensor,
                 gamma: float, vocab_ids: torch.Tensor | None = None, ce_only: bool = False) -> LossTerms:
    """draft_logits (B, N, K, Vd); conf_logits (B, N, K); target_probs (B, N, K, V) float32;
    labels (B, N, K) target-vocab ids; supervised (B, N, K) bool."""
    K = labels.shape[-1]
    w = position_weights(K, gamma).to(labels.device) * supervised.float()  # (B, N, K)
    lab, ce_w = labels, w
    if vocab_ids is not None:  # map labels into the draft vocabulary; drop those outside it
        lookup = torch.full((int(vocab_ids.max()) + 2,), -1, dtype=torch.long, device=labels.device)
        lookup[vocab_ids] = torch.arange(vocab_ids.numel(), device=labels.device)
        lab = lookup[labels.clamp(max=lookup.numel() - 1)]
        ce_w = w * (lab >= 0).float()
    ce = F.cross_entropy(draft_logits.float().flatten(0, -2), lab.clamp_min(0).flatten(),
                         reduction="none").view_as(labels)
    l_ce = weighted_mean(ce, ce_w)
    count = supervised.float().sum((0, 1))
    if ce_only or target_probs is None:
        zero = torch.zeros(K, device=labels.device)
        return LossTerms(total=l_ce, ce=l_ce, tv=None, conf=None, conf_kl=None, accept_per_pos=zero,
                         count_per_pos=count)
    l1 = l1_distance(draft_logits, target_probs, vocab_ids)  # (B, N, K)
    l_tv = weighted_mean(l1, w)
    accept = (1 - 0.5 * l1).detach()  # soft label: P(accept one sampled draft | T = 1)
    total = CE_WEIGHT * l_ce + TV_WEIGHT * l_tv
    l_conf = conf_kl = None
    if conf_logits is not None:
        y = accept.clamp(0, 1)
        bce = F.binary_cross_entropy_with_logits(conf_logits.float(), y, reduction="none")
        l_conf = weighted_mean(bce, w)
        entropy = F.binary_cross_entropy(y, y, reduction="none")  # H(y) = BCE(y, y)
        conf_kl = weighted_mean(bce.detach() - entropy, w)
        total = total + CONF_WEIGHT * l_conf
    s = supervised.float()
    acc_pos = (accept * s).sum((0, 1)) / count.clamp_min(1)
    return LossTerms(total=total, ce=l_ce, tv=l_tv, conf=l_conf, conf_kl=conf_kl, accept_per_pos=acc_pos,
                     count_per_pos=count)
