"""`dspark` and `dflash` proposers: the drafter network behind the `Proposer` protocol.

Per round: append each sequence's newly committed features to its context cache, run ONE
backbone pass for all blocks of the batch, then K serial Markov steps

    Z_k = U_k + W1[x_{k-1}] @ W2,   q_k = probs_from_logits(Z_k, params),   x_k ~ q_k

(at T = 0 the argmax, its one-hot q_k left implicit: `Draft.probs` is None), then the
confidences of all drafted slots in one call. A sampled `q_k` is returned as the exact
distribution x_k was drawn from, so verification is lossless.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from dspark.drafter.checkpoint import default_checkpoint, load_drafter
from dspark.drafter.context import ContextCache, block_hidden, extend_context
from dspark.drafter.model import Drafter
from dspark.errors import UserError
from dspark.spec.proposer import Draft, DraftRequest, register_proposer
from dspark.spec.sampling import draw, greedy, probs_from_logits


class DrafterProposer:
    def __init__(self, drafter: Drafter, name: str, block_size: int | None = None) -> None:
        K = drafter.cfg.block_size
        if block_size is not None and block_size < 0:
            raise UserError(f"block size must be >= 0, got {block_size}")
        self.drafter, self.name = drafter, name
        # A block has K slots: asking for more drafts than the drafter was trained for gets K.
        self.max_drafts = K if block_size is None else min(block_size, K)
        self.feature_layers: tuple[int, ...] = tuple(drafter.cfg.taps)
        self._caches: dict[int, ContextCache] = {}
        # seq_id -> (l,) raw confidence logits z_k of the last round (before T_k): calibration data
        self.last_conf_logits: dict[int, torch.Tensor] = {}

    def start(self, seq_id: int, prompt_ids: list[int]) -> None:
        self._caches[seq_id] = ContextCache(self.drafter, capacity=max(64, 2 * len(prompt_ids)))

    def finish(self, seq_id: int) -> None:
        self._caches.pop(seq_id, None)
        self.last_conf_logits.pop(seq_id, None)

    @torch.inference_mode()
    def propose(self, requests: list[DraftRequest]) -> list[Draft]:
        for req in requests:
            cache = self._caches[req.seq_id]
            if req.new_features is not None:
                extend_context(self.drafter, cache, req.new_features)
            if cache.length != len(req.token_ids) - 1:
                raise RuntimeError(f"seq {req.seq_id}: context holds {cache.length} positions, "
                                   f"anchor is at {len(req.token_ids) - 1} (feature contract broken)")
        live = [r for r in requests if r.max_tokens > 0]
        drafts = {r.seq_id: d for r, d in zip(live, self._draft(live), strict=True)} if live else {}
        return [drafts.get(r.seq_id, Draft(tokens=[])) for r in requests]

    def _draft(self, requests: list[DraftRequest]) -> list[Draft]:
        d = self.drafter
        h = block_hidden(d, [self._caches[r.seq_id] for r in requests], [r.token_ids[-1] for r in requests])
        L = max(min(r.max_tokens, self.max_drafts) for r in requests)
        base = d.base_logits(h[:, :L])  # (B, L, Vd) float32: no head rows for slots never drafted
        prev = torch.tensor([r.token_ids[-1] for r in requests], device=d.device)  # (B,) x_0
        sampled = [(b, r) for b, r in enumerate(requests) if not r.params.greedy]
        tokens, prevs = [], []
        probs: dict[int, list[torch.Tensor]] = {b: [] for b, _ in sampled}
        for k in range(L):  # serial Markov steps: cheap (one r x Vd product each)
            z = base[:, k]
            bias = d.markov_bias(prev)
            if bias is not None:
                z = z + bias
            # Greedy rows: the argmax in the draft vocabulary (its ids ascend, so ties go to the
            # lowest target id, as over the full vocabulary); q is the one-hot, left implicit.
            x = d.to_full_ids(greedy(z))  # (B,)
            for b, r in sampled:  # sampled rows: the exact full-vocabulary q each token is drawn from
                q = probs_from_logits(d.to_full_vocab(z[b:b + 1]), r.params)  # (1, V) float32
                x[b] = draw(q, r.params, r.generator)[0]
                probs[b].append(q[0])
            prevs.append(prev)
            tokens.append(x)
            prev = x
        toks = torch.stack(tokens, 1)  # (B, L)
        raw = d.confidence_logits(h[:, :L], torch.stack(prevs, 1))  # (B, L) z_k
        greedy_rows = torch.tensor([r.params.greedy for r in requests], device=d.device)  # (B,)
        conf = None if raw is None else d.calibrated(raw, greedy_rows)  # c_k = sigmoid(z_k / T_k + b_k)
        out = []
        for b, r in enumerate(requests):
            n = min(r.max_tokens, self.max_drafts)
            if raw is not None:
                self.last_conf_logits[r.seq_id] = raw[b, :n]
            q = torch.stack(probs[b][:n]) if b in probs else None  # (n, V); None = one-hot
            out.append(Draft(tokens=toks[b, :n].tolist(), probs=q,
                             confidences=None if conf is None else conf[b, :n]))
        return out


def drafter_factory(method: str) -> Any:
    def build(target: Any, block_size: int | None = None, checkpoint: str | Path | None = None,
              **_: Any) -> DrafterProposer:
        name = getattr(target, "name", None)
        if checkpoint is None:
            if name is None:
                raise UserError(f"{method}: pass a drafter checkpoint")
            checkpoint = default_checkpoint(name, method)
        drafter = load_drafter(checkpoint, target.model)
        return DrafterProposer(drafter, method, block_size)
    return build


register_proposer("dspark")(drafter_factory("dspark"))
register_proposer("dflash")(drafter_factory("dflash"))
