"""The drafter's per-sequence context cache and the batched inference block pass.

Only committed context K/V is cached (one entry per target position before the anchor, per
drafter layer); block K/V is recomputed every round and never stored, so nothing needs to
roll back: features arrive only for committed positions (see the Proposer contract).
"""

from __future__ import annotations

import torch

from dspark.drafter.model import Drafter


class ContextCache:
    """K/V of one sequence's context, per drafter layer: (KVH, capacity, hd) buffers."""

    def __init__(self, drafter: Drafter, capacity: int = 256) -> None:
        cfg = drafter.cfg
        shape = (cfg.num_kv_heads, capacity, cfg.head_dim)
        kw = dict(dtype=drafter.dtype, device=drafter.device)
        self.k = [torch.zeros(shape, **kw) for _ in range(cfg.num_layers)]
        self.v = [torch.zeros(shape, **kw) for _ in range(cfg.num_layers)]
        self.length = 0
        self.last_ctx: torch.Tensor | None = None  # (d,) fused feature of position length - 1

    def _grow(self, need: int) -> None:
        cap = self.k[0].shape[1]
        if need <= cap:
            return
        new_cap = max(need, 2 * cap)
        for buf in (self.k, self.v):
            for i, t in enumerate(buf):
                grown = t.new_zeros(t.shape[0], new_cap, t.shape[2])
                grown[:, :cap] = t
                buf[i] = grown

    def append(self, kv: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """kv: per layer (k, v), each (KVH, n, hd), for the next n positions."""
        n = kv[0][0].shape[1]
        self._grow(self.length + n)
        for i, (k, v) in enumerate(kv):
            self.k[i][:, self.length:self.length + n] = k
            self.v[i][:, self.length:self.length + n] = v
        self.length += n


@torch.inference_mode()
def extend_context(drafter: Drafter, cache: ContextCache, features: torch.Tensor) -> None:
    """Append committed positions' features (n, m, d) at positions [length, length + n)."""
    n = features.shape[0]
    if n == 0:
        return
    pos = torch.arange(cache.length, cache.length + n, device=drafter.device)[None]  # (1, n)
    h_ctx = drafter.fuse(features.to(drafter.device)[None])  # (1, n, d)
    cache.append([(k[0], v[0]) for k, v in drafter.context_kv(h_ctx, pos)])
    cache.last_ctx = h_ctx[0, -1]


@torch.inference_mode()
def block_hidden(drafter: Drafter, caches: list[ContextCache], anchor_ids: list[int]) -> torch.Tensor:
    """One backbone pass for B blocks -> h (B, K, d). Sequence b's anchor sits at position
    caches[b].length (its context is exactly the positions before it)."""
    B, K, dev = len(caches), drafter.cfg.block_size, drafter.device
    lens = torch.tensor([c.length for c in caches], device=dev)  # (B,)
    S = int(lens.max())
    ctx_kv = []
    for i in range(drafter.cfg.num_layers):
        k = torch.stack([c.k[i][:, :S] if c.k[i].shape[1] >= S else _pad(c.k[i], S) for c in caches])
        v = torch.stack([c.v[i][:, :S] if c.v[i].shape[1] >= S else _pad(c.v[i], S) for c in caches])
        ctx_kv.append((k, v))  # (B, KVH, S, hd) each
    see_ctx = torch.arange(S, device=dev)[None, :] < lens[:, None]  # (B, S): pad rows masked
    ctx_mask = see_ctx[:, None, :].expand(B, K, S)  # (B, K, S)
    positions = lens[:, None] + torch.arange(K, device=dev)  # (B, K): slot j at a + j
    block = drafter.block_ids(torch.tensor(anchor_ids, device=dev))  # (B, K)
    last = None
    if drafter.cfg.direct_path:  # (B, 1, d): one block per sequence
        last = torch.stack([c.last_ctx for c in caches])[:, None]
    return drafter.backbone(block, positions, ctx_kv, ctx_mask, last)


def _pad(t: torch.Tensor, length: int) -> torch.Tensor:
    return torch.cat([t, t.new_zeros(t.shape[0], length - t.shape[1], t.shape[2])], dim=1)
