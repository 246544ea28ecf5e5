"""Decoder-only transformer for the Llama, Qwen2, Qwen3 and Gemma 3 families.

Pure `nn.Module`: token ids, an explicit `ForwardBatch` (positions, KV slots, masks) and the
`KVCache` go in; the final-normed hidden states and any requested layer outputs come out.
Parameter names follow Hugging Face's, so safetensors checkpoints load without renaming.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from dspark.kv.cache import KVCache
from dspark.models.config import ModelConfig
from dspark.models.layers import MLP, RMSNorm, Rotary, apply_rotary, attend


@dataclasses.dataclass
class ForwardBatch:
    """Where B sequences' T new tokens (right-padded) sit and which cache rows they see.

    `write_*` list the valid (non-pad) tokens: token `write_tokens[i]` of the flattened
    (B*T) batch is written to cache slot `write_slots[i]` at position `write_positions[i]`.
    """

    positions: torch.Tensor  # (B, T) absolute positions
    slots: torch.Tensor  # (B,) cache slot of each row
    write_tokens: torch.Tensor  # (N,) index into B*T
    write_slots: torch.Tensor  # (N,)
    write_positions: torch.Tensor  # (N,)
    ctx_len: int  # cache positions [0, ctx_len) are read
    full_mask: torch.Tensor | None  # (B, 1, T, ctx_len) bool; None = attend to everything
    sliding_mask: torch.Tensor | None = None
    single_slot: int | None = None  # B == 1: read the cache through a view, not a gather
    slot_range: tuple[int, int] | None = None  # slots are lo, lo + 1, ..., hi - 1: a view too
    causal: bool = False  # fresh prefill (every start is 0): full_mask is plain causal, use the kernel's

    @classmethod
    def build(cls, slots: list[int], starts: list[int], num_new: list[int],
              device: torch.device | str = "cpu", sliding_window: int | None = None) -> ForwardBatch:
        """Sequence b has `starts[b]` cached tokens and `num_new[b]` new ones (>= 1)."""
        B, T = len(slots), max(num_new)
        start = torch.tensor(starts, dtype=torch.long)
        t = torch.arange(T)
        positions = start[:, None] + t[None, :]  # (B, T)
        valid = t[None, :] < torch.tensor(num_new)[:, None]  # (B, T)
        flat = valid.flatten().nonzero().squeeze(1)
        slot_t = torch.tensor(slots, dtype=torch.long)
        ctx_len = max(s + n for s, n in zip(starts, num_new))
        full_mask = sliding_mask = None
        j = torch.arange(ctx_len)
        causal = j[None, None, :] <= positions[:, :, None]  # (B, T, S)
        # A fresh prefill of right-padded rows (every start 0, T > 64) needs no mask tensor:
        # real tokens come first, so a causal kernel never lets them see padding; what the
        # padding rows compute is discarded. A (B, 1, T, T) bool mask would force SDPA's slow
        # path, which dominated batched prefill.
        fresh = T > 64 and not any(starts)
        if (B > 1 or T > 1) and not fresh:  # one sequence decoding one token sees its whole cache
            full_mask = causal.unsqueeze(1)
        if sliding_window is not None and ctx_len > sliding_window:
            window = j[None, None, :] > positions[:, :, None] - sliding_window
            sliding_mask = (causal & window).unsqueeze(1)
        pos_flat = positions.flatten()[flat]
        return cls(
            positions=positions.to(device), slots=slot_t.to(device), write_tokens=flat.to(device),
            write_slots=slot_t.repeat_interleave(T)[flat].to(device),
            write_positions=pos_flat.to(device), ctx_len=ctx_len,
            full_mask=None if full_mask is None else full_mask.to(device),
            sliding_mask=None if sliding_mask is None else sliding_mask.to(device),
            single_slot=slots[0] if B == 1 else None,
            slot_range=(slots[0], slots[0] + B) if slots == list(range(slots[0], slots[0] + B)) else None,
            causal=fresh,
        )


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        d, hd = cfg.hidden_size, cfg.head_dim
        self.q_proj = nn.Linear(d, cfg.num_heads * hd, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(d, cfg.num_kv_heads * hd, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(d, cfg.num_kv_heads * hd, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(cfg.num_heads * hd, d, bias=False)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(hd, cfg.rms_norm_eps, cfg.gemma_norms)
            self.k_norm = RMSNorm(hd, cfg.rms_norm_eps, cfg.gemma_norms)
        self.layer, self.cfg = layer, cfg
        self.sliding = cfg.is_sliding(layer)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                batch: ForwardBatch, cache: KVCache) -> torch.Tensor:
        B, T, _ = x.shape
        cfg = self.cfg
        q = self.q_proj(x).view(B, T, cfg.num_heads, cfg.head_dim)
        k = self.k_proj(x).view(B, T, cfg.num_kv_heads, cfg.head_dim)
        v = self.v_proj(x).view(B, T, cfg.num_kv_heads, cfg.head_dim)
        if cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q = apply_rotary(q.transpose(1, 2), cos, sin)  # (B, H, T, hd)
        k = apply_rotary(k.transpose(1, 2), cos, sin)  # (B, KVH, T, hd)
        kc, vc = cache.k[self.layer], cache.v[self.layer]
        n = batch.write_tokens
        kc[batch.write_slots, batch.write_positions] = k.transpose(1, 2).reshape(B * T, cfg.num_kv_heads, -1)[n]
        vc[batch.write_slots, batch.write_positions] = v.reshape(B * T, cfg.num_kv_heads, -1)[n]
        if batch.single_slot is not None:
            s = batch.single_slot
            keys, values = kc[s:s + 1, :batch.ctx_len], vc[s:s + 1, :batch.ctx_len]
        elif batch.slot_range is not None:  # a full batch in slot order: no copy of the cache
            lo, hi = batch.slot_range
            keys, values = kc[lo:hi, :batch.ctx_len], vc[lo:hi, :batch.ctx_len]
        else:
            keys, values = kc[batch.slots, :batch.ctx_len], vc[batch.slots, :batch.ctx_len]
        mask = batch.sliding_mask if (self.sliding and batch.sliding_mask is not None) else batch.full_mask
        out = attend(q, keys.transpose(1, 2), values.transpose(1, 2), mask, cfg.attn_scale,
                     causal=batch.causal and mask is batch.full_mask)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        g = cfg.gemma_norms
        self.self_attn = Attention(cfg, layer)
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, g)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, g)
        if g:  # Gemma's sandwich: post_attention norm closes attention, two more wrap the MLP
            self.pre_feedforward_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, g)
            self.post_feedforward_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, g)
        self.gemma = g

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                batch: ForwardBatch, cache: KVCache) -> torch.Tensor:
        a = self.self_attn(self.input_layernorm(x), cos, sin, batch, cache)
        if self.gemma:
            x = x + self.post_attention_layernorm(a)
            return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))
        x = x + a
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.gemma_norms)


class CausalLM(nn.Module):
    """`forward` returns (final-normed hidden (B, T, d), [raw output of each tapped layer])."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.model = Backbone(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        max_len = cfg.max_position_embeddings
        self.rope = Rotary(cfg.head_dim, cfg.rope_theta, max_len, cfg.rope_scaling_factor)
        self.rope_local = Rotary(cfg.head_dim, cfg.rope_local_theta, max_len) if cfg.layer_types else None

    def to(self, *args, **kwargs):  # noqa: ANN002, ANN003, D102 - keep RoPE tables on the device
        out = super().to(*args, **kwargs)
        device = next(self.parameters()).device
        self.rope.to(device)
        if self.rope_local is not None:
            self.rope_local.to(device)
        return out

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        h = self.model.embed_tokens(input_ids)
        if self.cfg.gemma_norms:
            h = h * torch.tensor(math.sqrt(self.cfg.hidden_size), dtype=h.dtype)
        return h

    def forward(self, input_ids: torch.Tensor, batch: ForwardBatch, cache: KVCache,
                taps: tuple[int, ...] = ()) -> tuple[torch.Tensor, list[torch.Tensor]]:
        h = self.embed(input_ids)  # (B, T, d)
        cos, sin = self.rope.tables(batch.positions, h.dtype)
        local = self.rope_local.tables(batch.positions, h.dtype) if self.rope_local else (cos, sin)
        tapped: list[torch.Tensor] = []
        for i, layer in enumerate(self.model.layers):
            c, s = local if self.cfg.is_sliding(i) else (cos, sin)
            h = layer(h, c, s, batch, cache)
            if i in taps:
                tapped.append(h)
        return self.model.norm(h), tapped

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()

    def new_cache(self, num_slots: int, max_len: int) -> KVCache:
        p = self.lm_head.weight
        return KVCache(self.cfg.num_layers, num_slots, max_len, self.cfg.num_kv_heads,
                       self.cfg.head_dim, dtype=p.dtype, device=p.device)
