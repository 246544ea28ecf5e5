"""Drafter losses. With position weights w_j = exp(-j / gamma) and weighted means over the
supervised slots:

    L_ce   = CE(softmax(Z), label)                         Markov-corrected draft vs label
    L_tv   = sum_v |p(v) - p_t(v)|                          L1 (= 2 TV)
    L_conf = BCE(conf_logit, sg[1 - 0.5 * L1])              exact T=1 acceptance of one draft
    total  = 0.1 L_ce + 0.9 L_tv + 1.0 L_conf               (DFlash control: L_ce only)
           (+ lambda L_feat, optional: mean_d (h_j - h_t)^2, the drafter's final-normed state
            against the target's LM-head input at a + j; an extension beyond the paper, after
            EAGLE's feature regression: a dense 576-dim signal per slot instead of one label)

The target distribution arrives as its top k tokens T plus the tail mass t = 1 - p_t(T)
(dspark/train/online.py), and the L1 is taken over T and the rest lumped together:

    L1_k = sum_{v in T} |p(v) - p_t(v)| + |p(rest) - t|,   p(rest) = 1 - p(T)

a lower bound of the full L1 (the triangle inequality on the tail), equal to it when the tail
is empty, and within t of it otherwise (k = 64 leaves t < 1% on SmolLM2's own answers).
Draft logits may cover only the draft vocabulary (ids `vocab_ids`); outside it p = 0, and
labels outside it are left out of the CE.
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
    feat: torch.Tensor | None  # feature regression term (None when off)
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


def l1_top_k(log_p: torch.Tensor, top_idx: torch.Tensor, top_probs: torch.Tensor,
             tail: torch.Tensor) -> torch.Tensor:
    """L1_k (module docstring): log_p (..., Vd) draft log-probs; top_idx (..., k) the target's
    top-k as draft-vocabulary indices (-1 outside it: p = 0 there); top_probs (..., k);
    tail (...) -> (...)."""
    inside = top_idx >= 0
    p_top = log_p.gather(-1, top_idx.clamp_min(0)).exp() * inside  # (..., k)
    p_rest = (1.0 - p_top.sum(-1)).clamp_min(0.0)
    return (p_top - top_probs).abs().sum(-1) + (p_rest - tail).abs()


def draft_index(vocab_ids: torch.Tensor | None, vocab_size: int) -> torch.Tensor | None:
    """(V + 1,) target id -> draft-vocabulary index, -1 outside it (None = identity)."""
    if vocab_ids is None:
        return None
    lookup = torch.full((vocab_size + 1,), -1, dtype=torch.long, device=vocab_ids.device)
    lookup[vocab_ids] = torch.arange(vocab_ids.numel(), device=vocab_ids.device)
    return lookup


ROW_CHUNK = 256  # rows of (rows, Vd) float32 work at a time in the fused loss


class _CEAndTopKL1(torch.autograd.Function):
    """Per row: CE = -log p[y] and L1_k (module docstring) of p = softmax(z), in one pass.

    The vocabulary-sized work is what a drafter step spends most of its time on, so it is
    done by hand: forward keeps only the row's log-sum-exp, backward recomputes p chunk by
    chunk and writes the gradient once, in z's dtype. With g the sparse dL1/dp (nonzero
    only on the target's top k: sign(p_i - q_i) - sign(p_rest - t)),

        dCE/dz = p - onehot(y),      dL1/dz = p * (g - <p, g>)

    so dz = p * (gce - gl1 <p, g>) + gl1 p*g (on the top k) - gce onehot(y).
    y < 0 (a label outside the draft vocabulary) gives CE 0 and no gradient from it.
    """

    @staticmethod
    def forward(ctx, z, y, top_idx, top_probs, tail):  # noqa: ANN001, ANN205
        lse = torch.cat([torch.logsumexp(c.float(), dim=-1) for c in z.split(ROW_CHUNK)])  # (R,)
        has_y = y >= 0
        log_py = z.gather(-1, y.clamp_min(0)[:, None]).squeeze(-1).float() - lse
        ce = torch.where(has_y, -log_py, torch.zeros_like(lse))
        inside = top_idx >= 0
        p_top = (z.gather(-1, top_idx.clamp_min(0)).float() - lse[:, None]).exp() * inside  # (R, k)
        p_rest = (1.0 - p_top.sum(-1)).clamp_min(0.0)
        l1 = (p_top - top_probs).abs().sum(-1) + (p_rest - tail).abs()
        g = (torch.sign(p_top - top_probs) - torch.sign(p_rest - tail)[:, None]) * inside  # (R, k) dL1/dp
        ctx.save_for_backward(z, y, top_idx, lse, p_top, g)
        return ce, l1

    @staticmethod
    def backward(ctx, grad_ce, grad_l1):  # noqa: ANN001, ANN205
        z, y, top_idx, lse, p_top, g = ctx.saved_tensors
        grad_ce = grad_ce * (y >= 0)
        pg = (p_top * g).sum(-1)  # <p, g> (g is zero off the top k)
        scale = grad_ce - grad_l1 * pg  # (R,) coefficient of p on every token
        dz = torch.empty_like(z)
        sparse = grad_l1[:, None] * p_top * g  # (R, k) top-k part of p*g (zero outside the vocab)
        idx, ys = top_idx.clamp_min(0), y.clamp_min(0)[:, None]
        for lo in range(0, z.shape[0], ROW_CHUNK):
            hi = lo + ROW_CHUNK
            d = (z[lo:hi].float() - lse[lo:hi, None]).exp_().mul_(scale[lo:hi, None])
            d.scatter_add_(-1, idx[lo:hi], sparse[lo:hi])
            d.scatter_add_(-1, ys[lo:hi], -grad_ce[lo:hi, None])
            dz[lo:hi] = d
        return dz, None, None, None, None


def ce_and_l1(z: torch.Tensor, labels: torch.Tensor, top_idx: torch.Tensor, top_probs: torch.Tensor,
              tail: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """z (..., Vd) draft logits (any float dtype); labels (...) draft-vocab indices (-1: none);
    top_idx (..., k) draft-vocab indices of the target's top k (-1 outside); top_probs (..., k);
    tail (...) -> (CE (...), L1_k (...)), float32, differentiable in z."""
    shape = labels.shape
    flat = lambda t: t.reshape(-1, *t.shape[len(shape):])  # noqa: E731
    ce, l1 = _CEAndTopKL1.apply(flat(z), flat(labels), flat(top_idx), flat(top_probs).float(), flat(tail).float())
    return ce.view(shape), l1.view(shape)


@dataclasses.dataclass
class TargetTopK:
    """The target's next-token distribution per slot, as top k + tail (B, N, K, k) / (B, N, K)."""

    ids: torch.Tensor  # target-vocabulary ids
    probs: torch.Tensor
    tail: torch.Tensor


def feature_loss(hidden: torch.Tensor, target_hidden: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted mean over slots of mean_d (h - h_t)^2: (B, N, K, d), (B, N, K, d), (B, N, K)."""
    return weighted_mean((hidden.float() - target_hidden.float()).pow(2).mean(-1), weights)


def drafter_loss(draft_logits: torch.Tensor, conf_logits: torch.Tensor | None,
                 target: TargetTopK | None, labels: torch.Tensor, supervised: torch.Tensor,
                 gamma: float, vocab_ids: torch.Tensor | None = None, ce_only: bool = False,
                 hidden: torch.Tensor | None = None, target_hidden: torch.Tensor | None = None,
                 feature_weight: float = 0.0) -> LossTerms:
    """draft_logits (B, N, K, Vd); conf_logits (B, N, K); target: top-k of p_t per slot;
    labels (B, N, K) target-vocab ids; supervised (B, N, K) bool; hidden / target_hidden
    (B, N, K, d) for the optional feature term."""
    K = labels.shape[-1]
    w = position_weights(K, gamma).to(labels.device) * supervised.float()  # (B, N, K)
    lab = labels
    top_ids = None if target is None else target.ids
    if vocab_ids is not None:  # map ids into the draft vocabulary (-1 outside it)
        V = max(int(vocab_ids.max()), int(labels.max()), 0 if target is None else int(target.ids.max()))
        lookup = draft_index(vocab_ids, V + 1)
        lab = lookup[labels]
        top_ids = None if target is None else lookup[target.ids]
    lab = lab.masked_fill(~supervised, -1)
    ce_only = ce_only or target is None
    if ce_only:  # no target distribution: a k = 1 table whose L1 term is never used
        top_ids = torch.full((*labels.shape, 1), -1, dtype=torch.long, device=labels.device)
        target = TargetTopK(top_ids, torch.zeros(top_ids.shape, device=labels.device),
                            torch.zeros(labels.shape, device=labels.device))
    ce, l1 = ce_and_l1(draft_logits, lab, top_ids, target.probs, target.tail)  # (B, N, K) each
    l_ce = weighted_mean(ce, w * (lab >= 0).float())  # labels outside the draft vocabulary are left out
    count = supervised.float().sum((0, 1))
    l_feat = None
    if feature_weight > 0 and hidden is not None and target_hidden is not None:
        l_feat = feature_loss(hidden, target_hidden, w)
    if ce_only:
        zero = torch.zeros(K, device=labels.device)
        total = l_ce if l_feat is None else l_ce + feature_weight * l_feat
        return LossTerms(total=total, ce=l_ce, tv=None, conf=None, conf_kl=None, feat=l_feat,
                         accept_per_pos=zero, count_per_pos=count)
    l_tv = weighted_mean(l1, w)
    accept = (1 - 0.5 * l1).detach()  # soft label: P(accept one sampled draft | T = 1)
    total = CE_WEIGHT * l_ce + TV_WEIGHT * l_tv
    if l_feat is not None:
        total = total + feature_weight * l_feat
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
    return LossTerms(total=total, ce=l_ce, tv=l_tv, conf=l_conf, conf_kl=conf_kl, feat=l_feat,
                     accept_per_pos=acc_pos, count_per_pos=count)
