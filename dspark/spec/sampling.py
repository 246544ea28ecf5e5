"""Sampling shared by plain decoding and verification: one place turns logits into the
probabilities that both the draft and the target are judged by."""

from __future__ import annotations

import dataclasses
import math

import torch

from dspark.errors import UserError

MAX_LOGPROBS = 20  # alternatives per token (OpenAI's top_logprobs limit)


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    seed: int | None = None
    max_new_tokens: int = 128
    stop_token_ids: tuple[int, ...] = ()  # in addition to the model's EOS ids
    ignore_eos: bool = False
    stop: tuple[str, ...] = ()  # stop strings, matched on the detokenized output (engine/stop.py)
    # Logit processing (spec/logits.py), applied to the target's logits before sampling and
    # before verification, so drafts are judged against exactly the processed distribution.
    presence_penalty: float = 0.0  # subtracted once from every token already in the output
    frequency_penalty: float = 0.0  # subtracted per occurrence in the output
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit)
    logprobs: int | None = None  # None: off; k: each emitted token's log-prob and the top k

    def __post_init__(self) -> None:
        if not (math.isfinite(self.temperature) and math.isfinite(self.top_p)):
            raise UserError("temperature and top-p must be finite numbers")
        for name in ("presence_penalty", "frequency_penalty"):
            if not (math.isfinite(getattr(self, name)) and -2 <= getattr(self, name) <= 2):
                raise UserError(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        if any(not (math.isfinite(b) and -100 <= b <= 100) for _, b in self.logit_bias):
            raise UserError("logit bias values must be in [-100, 100]")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise UserError(f"logprobs must be in [0, {MAX_LOGPROBS}], got {self.logprobs}")
        if any(not s for s in self.stop):
            raise UserError("stop strings must not be empty")
        if not self.temperature >= 0:
            raise UserError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise UserError(f"top-p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise UserError(f"top-k must be >= 0, got {self.top_k}")
        if self.max_new_tokens < 1:
            raise UserError(f"max-new-tokens must be >= 1, got {self.max_new_tokens}")

    def nth(self, i: int) -> SamplingParams:
        """The parameters of the i-th of several seeded runs (prompts, choices): seed + i,
        so they differ but each replays exactly; unseeded parameters stay unseeded."""
        return self if self.seed is None else dataclasses.replace(self, seed=self.seed + i)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def processes_logits(self) -> bool:
        """Penalties or a logit bias change the target's logits (spec/logits.py)."""
        return bool(self.presence_penalty or self.frequency_penalty or self.logit_bias)


def probs_from_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """(N, V) logits -> (N, V) float32 probabilities after temperature, top-k, then top-p.

    The same function produces draft and target distributions, so both are judged on the
    same support. Greedy (temperature 0) gives a one-hot of the argmax; ties go to the
    lowest index (torch.argmax). Top-k and top-p rank tokens with a stable sort, so ties
    at the cut-off also keep the lowest indices and exactly k tokens survive top-k.
    """
    logits = logits.float()
    if params.greedy:
        return one_hot_argmax(logits)
    # Shift by the row max first: every value is then <= 0 with the argmax at exactly 0, so a
    # tiny temperature sends the rest to -inf (a one-hot), never to inf - inf = NaN.
    scaled = (logits - logits.max(dim=-1, keepdim=True).values) / params.temperature  # (N, V)
    V = scaled.shape[-1]
    k = params.top_k if 0 < params.top_k < V else V
    if k == V and params.top_p >= 1:
        return torch.softmax(scaled, dim=-1)  # nothing to truncate: no ranking needed
    fast = _truncated_from_candidates(scaled, k, params.top_p)
    if fast is not None:
        return fast
    sorted_logits, order = torch.sort(scaled, dim=-1, descending=True, stable=True)  # (N, V)
    sorted_logits[..., k:] = -math.inf
    sorted_probs = torch.softmax(sorted_logits, dim=-1)  # (N, V), descending
    if params.top_p < 1:
        sorted_probs = _nucleus(sorted_probs, params.top_p)
    return torch.zeros_like(sorted_probs).scatter_(-1, order, sorted_probs)


CANDIDATES = 256  # top-k/top-p look at this many best tokens first (a full sort is ~50x dearer)


def _truncated_from_candidates(scaled: torch.Tensor, k: int, top_p: float) -> torch.Tensor | None:
    """The same result as the full stable sort, from the best max(k, CANDIDATES) tokens only;
    None when that prefix cannot decide it exactly (a tie crosses its edge, or top-p needs
    more mass than it holds) and the caller must sort the whole row.

    The prefix is put in the full sort's order (value descending, ties by lowest index); the
    nucleus rule only looks at mass before each token, so a prefix holding >= top_p of the
    mass (after top-k) decides every token, and those outside it get 0.
    """
    V = scaled.shape[-1]
    c = min(V, max(k if k < V else 0, CANDIDATES))
    if c >= V:
        return None
    vals, idx = torch.topk(scaled, c, dim=-1)  # (N, c) descending, ties in no set order
    edge = vals[:, -1:]  # (N, 1) the c-th best value
    tie_crosses = (scaled >= edge).sum(-1) != c  # (N,) a value equal to the edge lies outside
    if tie_crosses.any() and (k < V or top_p >= 1):
        return None  # only a full sort orders the tied tokens
    idx, by_index = idx.sort(dim=-1)  # ascending ids, then a stable sort by value
    vals, by_value = torch.sort(vals.gather(-1, by_index), dim=-1, descending=True, stable=True)
    order = idx.gather(-1, by_value)  # (N, c): the full stable sort's first c entries
    if k < V:
        vals, order = vals[:, :k], order[:, :k]  # (N, k)
        probs = torch.softmax(vals, dim=-1)  # top-k renormalises over the k best
    else:
        probs = torch.softmax(scaled, dim=-1).gather(-1, order)  # normalised over all V
    if top_p < 1:
        if (probs.sum(-1) < top_p).any():
            return None  # the nucleus may reach past the prefix
        # A tie across the edge (common with bf16 logits) is harmless when the tokens strictly
        # above the edge already hold top_p: every edge-valued token then has >= top_p mass
        # before it in any order, so the nucleus drops them all, exactly as the full sort would.
        above = (probs * (vals > edge)).sum(-1)  # (N,)
        if (tie_crosses & (above < top_p)).any():
            return None
        probs = _nucleus(probs, top_p)
    return torch.zeros_like(scaled).scatter_(-1, order, probs)


def _nucleus(sorted_probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest descending prefix whose mass reaches top_p, renormalised.

    Token i (in descending order) is kept iff the mass strictly before it is < top_p:
    that is exactly the shortest prefix with cumulative mass >= top_p, and the first
    token (the argmax) always survives because top_p > 0.
    """
    mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs  # (N, V)
    kept = sorted_probs.masked_fill(mass_before >= top_p, 0.0)
    return kept / kept.sum(dim=-1, keepdim=True)


def one_hot_argmax(logits: torch.Tensor) -> torch.Tensor:
    """(N, V) -> (N, V) float32 one-hot of the argmax (lowest index on ties)."""
    one_hot = torch.zeros(logits.shape, dtype=torch.float32, device=logits.device)
    return one_hot.scatter_(-1, greedy(logits).unsqueeze(-1), 1.0)


def greedy(logits: torch.Tensor) -> torch.Tensor:
    """(N, V) -> (N,) argmax token ids; ties go to the lowest index."""
    return torch.argmax(logits, dim=-1)


def sample(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """(N, V) probabilities (need not be normalised) -> (N,) sampled token ids.

    Inverse CDF: one uniform per row against the running sum, the first index whose sum
    exceeds it (a zero-probability token never does). ~20x cheaper than torch.multinomial,
    which draws an exponential per vocabulary entry."""
    cdf = torch.cumsum(probs.float(), dim=-1)  # (N, V)
    u = torch.rand(probs.shape[0], 1, generator=generator, device=probs.device) * cdf[:, -1:]
    ids = torch.searchsorted(cdf, u, right=True).squeeze(-1)  # (N,)
    # u * total can round up to the total: fall back to the last token with mass.
    last = probs.shape[-1] - 1 - torch.argmax((probs.flip(-1) > 0).int(), dim=-1)
    return torch.minimum(ids, last)


def draw(probs: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> torch.Tensor:
    """(N, V) -> (N,): the one "argmax or sample" of the library, for every token drawn
    outside verification (the target's first token, draft tokens).

    `probs` must come from `probs_from_logits` with the same `params`: greedy then gives a
    one-hot, whose argmax is the logits' argmax (lowest index on ties); otherwise one inverse
    CDF draw per row from `generator`."""
    return greedy(probs) if params.greedy else sample(probs, generator)


def make_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator | None:
    """A seeded per-request RNG, or None (use torch's global RNG) when no seed is given."""
    if seed is None:
        return None
    return torch.Generator(device=device).manual_seed(seed)
