"""What a request changes in the target's logits (penalties, logit bias), and the
log-probabilities reported to clients.

Speculation stays lossless because the processed logits are the target distribution: the
engine processes the verification rows *before* `verify`, so the acceptance test, the
residual after a rejection and the bonus token all use the same processed distribution, and
the emitted tokens follow exactly the law plain decoding with the same processing has.
Row k of a round scores the token after output + drafts[:k], so its penalties count exactly
those tokens, as if they had been decoded one at a time (drafts never need the penalties:
rejection sampling is exact for any draft distribution).

Penalties follow OpenAI: for a token j that occurs c_j times in the output so far,
    logit_j -= c_j * frequency_penalty + (c_j > 0) * presence_penalty
and logit_bias[j] is then added. Only generated tokens count, not the prompt.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

from dspark.spec.sampling import SamplingParams


def process_logits(logits: torch.Tensor, params: SamplingParams, output_ids: Sequence[int],
                   draft_tokens: Sequence[int] = ()) -> torch.Tensor:
    """(l+1, V) target logits of one round -> float32 logits with penalties and bias applied.

    `output_ids` are the committed output tokens (the anchor last); row k follows them and
    `draft_tokens[:k]`. Returns `logits` unchanged when the request processes nothing."""
    if not params.processes_logits:
        return logits
    out = logits.float().clone()  # (R, V)
    rows, vocab = out.shape
    if params.presence_penalty or params.frequency_penalty:
        counts = _row_counts(output_ids, draft_tokens[: rows - 1], rows, vocab, out.device)  # (R, V)
        out -= params.frequency_penalty * counts + params.presence_penalty * (counts > 0).float()
    if params.logit_bias:
        ids = torch.tensor([i for i, _ in params.logit_bias], dtype=torch.long, device=out.device)
        bias = torch.tensor([b for _, b in params.logit_bias], dtype=torch.float32, device=out.device)
        out.index_add_(1, ids, bias.expand(rows, -1))
    return out


def _row_counts(output_ids: Sequence[int], drafts: Sequence[int], rows: int, vocab: int,
                device: torch.device) -> torch.Tensor:
    """(R, V) occurrences of each token before row k: output_ids + drafts[:k]."""
    base = torch.bincount(torch.tensor(list(output_ids), dtype=torch.long, device=device), minlength=vocab)
    counts = base.float().expand(rows, vocab).clone()  # (R, V)
    if drafts:
        one_hot = torch.zeros(len(drafts), vocab, device=device)
        one_hot[torch.arange(len(drafts)), torch.tensor(list(drafts), dtype=torch.long, device=device)] = 1.0
        counts[1:] += one_hot.cumsum(0)  # row k >= 1 has also seen drafts[:k]
    return counts


@dataclasses.dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    logprob: float  # log p(token) under the target's (processed) distribution at temperature 1
    top: tuple[tuple[int, float], ...] = ()  # the most likely tokens (id, log-prob), best first


def token_logprobs(logits: torch.Tensor, token_ids: Sequence[int], num_top: int) -> list[TokenLogprob]:
    """Log-probabilities of `token_ids[i]` under row i of `logits` (n >= len(token_ids), V),
    plus the `num_top` most likely tokens of each row.

    The distribution is the target's, after penalties and logit bias but before temperature,
    top-k and top-p (which only shape how a token is drawn; a greedy request would otherwise
    report log(1) for every token)."""
    if not token_ids:
        return []
    logp = torch.log_softmax(logits[: len(token_ids)].float(), dim=-1)  # (n, V)
    ids = torch.tensor(list(token_ids), dtype=torch.long, device=logp.device)
    chosen = logp.gather(-1, ids.unsqueeze(-1)).squeeze(-1).tolist()  # (n,)
    if num_top <= 0:
        return [TokenLogprob(t, lp) for t, lp in zip(token_ids, chosen)]
    top_vals, top_ids = logp.topk(min(num_top, logp.shape[-1]), dim=-1)  # (n, k)
    return [TokenLogprob(t, lp, tuple(zip(i, v))) for t, lp, i, v in
            zip(token_ids, chosen, top_ids.tolist(), top_vals.tolist())]
