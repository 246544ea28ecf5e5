"""Prompt-lookup proposer: copy what followed the latest earlier occurrence of the current
suffix. Deterministic drafts (one-hot q), no model, no state.

Matches need at least 2 tokens by default: a single repeated token is a weak signal, and
every wasted draft is a verified token. On SmolLM2 at batch 1 (10 eval prompts, 64 tokens,
greedy) min 2 measured 1.28x AR against 1.09x for min 1, at tau 1.52 vs 1.62."""

from __future__ import annotations

from dspark.spec.proposer import Draft, DraftRequest, register_proposer


def lookup(tokens: list[int], max_tokens: int, max_ngram: int = 3, min_ngram: int = 2) -> list[int]:
    """Longest suffix n-gram (max_ngram down to min_ngram) that occurred earlier in `tokens`;
    return up to `max_tokens` tokens that followed its most recent earlier occurrence."""
    n_tokens = len(tokens)
    if max_tokens <= 0:
        return []
    for n in range(min(max_ngram, n_tokens - 1), min_ngram - 1, -1):
        suffix = tokens[n_tokens - n:]
        # Scan right to left so the most recent match wins; the match must end before the suffix.
        for start in range(n_tokens - n - 1, -1, -1):
            if tokens[start:start + n] == suffix:
                follow = tokens[start + n:start + n + max_tokens]
                if follow:
                    return follow
    return []


class NgramProposer:
    name = "ngram"
    feature_layers: tuple[int, ...] = ()

    def __init__(self, max_ngram: int = 3, min_ngram: int = 2) -> None:
        self.max_ngram, self.min_ngram = max_ngram, min_ngram

    def start(self, seq_id: int, prompt_ids: list[int]) -> None:
        pass

    def propose(self, requests: list[DraftRequest]) -> list[Draft]:
        return [Draft(lookup(r.token_ids, r.max_tokens, self.max_ngram, self.min_ngram)) for r in requests]

    def finish(self, seq_id: int) -> None:
        pass


@register_proposer("ngram")
def _make_ngram(target: object = None, block_size: int | None = None, **kw: object) -> NgramProposer:
    return NgramProposer()
