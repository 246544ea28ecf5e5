"""Draft-model proposer: a smaller model sharing the target's tokenizer drafts up to K tokens
autoregressively, all sequences of the round batched into each draft forward.

A sequence stops drafting early once the draft model's own top probability falls below
`stop_below` (0.4, transformers' assistant default): a draft it doubts is likely rejected,
and every skipped draft saves one draft forward and one verified token. The rule looks
only at the draft model, never the target, so verification stays lossless."""

from __future__ import annotations

import dataclasses

import torch

from dspark.models.runner import ModelRunner, SeqInput
from dspark.models.transformer import CausalLM
from dspark.spec.proposer import Draft, DraftRequest, register_proposer
from dspark.spec.sampling import draw, probs_from_logits


@dataclasses.dataclass
class _SeqState:
    slot: int
    cached_ids: list[int]  # tokens whose K/V the draft cache holds, in order


class DraftModelProposer:
    name = "draft-model"
    feature_layers: tuple[int, ...] = ()

    def __init__(self, model: CausalLM, max_batch_size: int = 16, max_seq_len: int = 2048,
                 stop_below: float = 0.4) -> None:
        self.model = model
        self.stop_below = stop_below
        self.cache = model.new_cache(max_batch_size, min(max_seq_len, model.cfg.max_position_embeddings))
        self.runner = ModelRunner(model, self.cache)
        self.seqs: dict[int, _SeqState] = {}

    def start(self, seq_id: int, prompt_ids: list[int]) -> None:
        self.seqs[seq_id] = _SeqState(self.cache.allocate(), [])

    def finish(self, seq_id: int) -> None:
        state = self.seqs.pop(seq_id, None)
        if state is not None:
            self.cache.free(state.slot)

    def propose(self, requests: list[DraftRequest]) -> list[Draft]:
        active = [r for r in requests if r.max_tokens > 0]
        tokens: dict[int, list[int]] = {r.seq_id: [] for r in requests}
        probs: dict[int, list[torch.Tensor]] = {r.seq_id: [] for r in requests}
        # First forward: catch up on committed tokens the draft cache lacks (incl. the anchor).
        feed = {r.seq_id: self._sync(r) for r in active}
        stopped: set[int] = set()
        for _ in range(max((r.max_tokens for r in active), default=0)):
            live = [r for r in active if len(tokens[r.seq_id]) < r.max_tokens and r.seq_id not in stopped]
            if not live:
                break
            out = self.runner.forward([SeqInput(self.seqs[r.seq_id].slot, feed[r.seq_id]) for r in live],
                                      last_only=True)
            for r, logits in zip(live, out.logits):
                self.seqs[r.seq_id].cached_ids.extend(feed[r.seq_id])
                if tokens[r.seq_id] and float(torch.softmax(logits[-1].float(), -1).max()) < self.stop_below:
                    stopped.add(r.seq_id)  # doubtful next draft: verify what we have
                    continue
                p = probs_from_logits(logits, r.params)  # (1, V)
                tok = int(draw(p, r.params, r.generator)[0])
                tokens[r.seq_id].append(tok)
                probs[r.seq_id].append(p[0])
                feed[r.seq_id] = [tok]
        return [Draft(tokens[r.seq_id], torch.stack(probs[r.seq_id]) if probs[r.seq_id] else None)
                for r in requests]

    def _sync(self, req: DraftRequest) -> list[int]:
        """Roll the draft cache back to the longest prefix it shares with the committed
        tokens and return what must be fed next (at least the anchor)."""
        state = self.seqs[req.seq_id]
        committed = req.token_ids
        keep = 0
        limit = min(len(state.cached_ids), len(committed) - 1)
        while keep < limit and state.cached_ids[keep] == committed[keep]:
            keep += 1
        self.cache.rollback(state.slot, keep)
        del state.cached_ids[keep:]
        return committed[keep:]


@register_proposer("draft-model")
def _make_draft_model(target: object = None, block_size: int | None = None, draft_model: str | None = None,
                      max_batch_size: int = 16, max_seq_len: int = 2048, dtype: torch.dtype = torch.float32,
                      device: str = "cpu", **kw: object) -> DraftModelProposer:
    from dspark.errors import UserError
    from dspark.models.loader import load_model

    if not draft_model:
        raise UserError("--method draft-model needs --draft-model NAME")
    loaded = load_model(draft_model, dtype=dtype, device=device)
    return DraftModelProposer(loaded.model, max_batch_size, max_seq_len)
