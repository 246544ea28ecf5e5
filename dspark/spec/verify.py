"""Verification of one speculative round: which drafts the target accepts, and the token it adds.

Greedy rounds accept the longest prefix equal to the target's argmax. Sampled rounds use
speculative (rejection) sampling, which is lossless: the emitted tokens are distributed
exactly as if the target had sampled them one at a time. `rejection_sample` is the
vectorised core (many rounds of equal length at once); `verify_sampling` runs it on one
sequence. The engine calls `verify` once per sequence of a batch, with its own params and
RNG, after the verification policy has trimmed its drafts.

Every round emits `num_accepted` drafts and then one target token (the correction after a
rejection, or the bonus after full acceptance), unless a stop token ends it first: the
round is cut right after the first stop token, and a stop inside the accepted prefix means
no target token is emitted at all.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection

import torch

from dspark.spec.sampling import SamplingParams, probs_from_logits, sample


@dataclasses.dataclass
class VerifyResult:
    # Drafts emitted this round; tokens[:num_accepted] == draft_tokens[:num_accepted].
    # Accepted drafts that follow a stop token are dropped and not counted.
    num_accepted: int
    tokens: list[int]  # accepted drafts, then the correction/bonus; cut after the first stop
    finished_by_stop: bool


def verify(draft_tokens: list[int], draft_probs: torch.Tensor | None, target_logits: torch.Tensor,
           params: SamplingParams, generator: torch.Generator | None,
           stop_ids: Collection[int] = ()) -> VerifyResult:
    """One round: `target_logits` is (l+1, V), row k scores the position after x_0..x_k.

    `draft_probs` (l, V) must come from `probs_from_logits` with the same `params`.
    """
    if params.greedy:
        return verify_greedy(draft_tokens, target_logits, stop_ids)
    target_probs = probs_from_logits(target_logits, params)  # (l+1, V)
    return verify_sampling(draft_tokens, draft_probs, target_probs, generator, stop_ids)


def verify_greedy(draft_tokens: list[int], target_logits: torch.Tensor,
                  stop_ids: Collection[int] = ()) -> VerifyResult:
    """Accept the longest prefix of drafts equal to the target argmax, then add the argmax."""
    _check_lengths(draft_tokens, target_logits)
    target_ids = target_logits.argmax(dim=-1).tolist()  # (l+1,), lowest index on ties
    num_accepted = 0
    while num_accepted < len(draft_tokens) and draft_tokens[num_accepted] == target_ids[num_accepted]:
        num_accepted += 1
    return _finish(draft_tokens, num_accepted, target_ids[num_accepted], stop_ids)


def verify_sampling(draft_tokens: list[int], draft_probs: torch.Tensor | None,
                    target_probs: torch.Tensor, generator: torch.Generator | None,
                    stop_ids: Collection[int] = ()) -> VerifyResult:
    """Speculative sampling of one round. `draft_probs` (l, V) is the exact distribution each
    draft was drawn from (None: deterministic drafts, a one-hot q); `target_probs` is (l+1, V)."""
    _check_lengths(draft_tokens, target_probs)
    tokens = torch.tensor([draft_tokens], dtype=torch.long, device=target_probs.device)  # (1, l)
    q = None if draft_probs is None else draft_probs.unsqueeze(0)  # (1, l, V)
    num_accepted, next_token = rejection_sample(tokens, q, target_probs.unsqueeze(0), generator)
    return _finish(draft_tokens, int(num_accepted), int(next_token), stop_ids)


def rejection_sample(draft_tokens: torch.Tensor, draft_probs: torch.Tensor | None,
                     target_probs: torch.Tensor, generator: torch.Generator | None,
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Speculative sampling for N rounds of l drafts each.

    draft_tokens (N, l) long; draft_probs (N, l, V) or None (one-hot q at the drafted token);
    target_probs (N, l+1, V). Returns num_accepted (N,) and the token that follows the
    accepted drafts (N,): the correction after a rejection, or the bonus from row l.
    """
    p_t = target_probs.float()  # (N, l+1, V)
    n_rounds, num_drafts = draft_tokens.shape
    x = draft_tokens.unsqueeze(-1)  # (N, l, 1)
    p_t_x = p_t[:, :num_drafts].gather(-1, x).squeeze(-1)  # (N, l)
    p_d_x = torch.ones_like(p_t_x) if draft_probs is None else draft_probs.float().gather(-1, x).squeeze(-1)
    # Accept x_k with probability min(1, p_t(x_k) / p_d(x_k)): comparing u ~ U[0, 1) with the
    # ratio applies the min(1, .) for free. A draft with p_d(x) = 0 cannot have been drawn
    # from q (bad input), so it is rejected rather than divided by zero.
    u = torch.rand((n_rounds, num_drafts), generator=generator, device=p_t.device)  # (N, l)
    ratio = torch.where(p_d_x > 0, p_t_x / p_d_x.clamp_min(torch.finfo(torch.float32).tiny), 0.0)
    accepted = u < ratio  # (N, l)
    num_accepted = accepted.long().cumprod(dim=-1).sum(dim=-1)  # (N,) leading accepts
    return num_accepted, sample(_next_token_probs(draft_tokens, draft_probs, p_t, num_accepted), generator)


def _next_token_probs(draft_tokens: torch.Tensor, draft_probs: torch.Tensor | None,
                      p_t: torch.Tensor, num_accepted: torch.Tensor) -> torch.Tensor:
    """(N, V) distribution of the token after the accepted drafts, at row n = num_accepted.

    Rejection at n < l: residual normalize(max(0, p_t[n] - p_d[n])). Then for any y,
    P(emit y) = q(y) min(1, p_t(y)/q(y)) + P(reject) * residual(y) = min(q, p_t)(y)
    + (p_t - q)^+(y) = p_t(y), since P(reject) = sum (p_t - q)^+ = the residual's mass.
    Full acceptance (n = l): q is taken as 0, so the "residual" is the bonus p_t[l].
    The residual is all zero only when p_t[n] == p_d[n] (then rejection has probability 0
    and only rounding gets here): fall back to p_t[n].
    """
    n_rounds, num_drafts = draft_tokens.shape
    rows = torch.arange(n_rounds, device=p_t.device)
    p_t_n = p_t[rows, num_accepted]  # (N, V)
    q_n = torch.zeros_like(p_t_n)
    if num_drafts > 0:
        k = num_accepted.clamp(max=num_drafts - 1)  # (N,) the rejected position where n < l
        if draft_probs is None:  # one-hot q at the drafted token
            q_n.scatter_(-1, draft_tokens[rows, k].unsqueeze(-1), 1.0)
        else:
            q_n = draft_probs.float()[rows, k]
        q_n = q_n * (num_accepted < num_drafts).unsqueeze(-1)  # q = 0 on fully accepted rounds
    residual = (p_t_n - q_n).clamp_min(0.0)  # (N, V)
    mass = residual.sum(dim=-1, keepdim=True)  # (N, 1)
    return torch.where(mass > 0, residual / mass.clamp_min(torch.finfo(torch.float32).tiny), p_t_n)


def _finish(draft_tokens: list[int], num_accepted: int, next_token: int,
            stop_ids: Collection[int]) -> VerifyResult:
    tokens = [*draft_tokens[:num_accepted], next_token]
    for i, token in enumerate(tokens):
        if token in stop_ids:
            return VerifyResult(min(num_accepted, i + 1), tokens[: i + 1], finished_by_stop=True)
    return VerifyResult(num_accepted, tokens, finished_by_stop=False)


def _check_lengths(draft_tokens: list[int], target: torch.Tensor) -> None:
    if target.dim() != 2 or target.shape[0] != len(draft_tokens) + 1:
        raise ValueError(f"expected target rows (l+1, V) with l={len(draft_tokens)}, "
                         f"got {tuple(target.shape)}")
