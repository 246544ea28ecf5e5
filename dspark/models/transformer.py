"""Decoder-only transformer for the Llama, Qwen2, Qwen3 and Gemma 3 families.

Pure `nn.Module`: token ids, an explicit `ForwardBatch` (positions, KV slots, masks) and the
`KVCache` go in; the final-normed hidden states and any requested layer outputs come out.
`forward` resolves which cache rows the batch reads and writes (`CacheView`, plain Python
on slot numbers and lengths); `step` is the pure tensor function over those views, the part
`torch.compile` sees (dspark/models/compile.py). Parameter names follow Hugging Face's, except
that q/k/v and gate/up are stored fused (`qkv_proj`, `gate_up_proj`); HF checkpoints load
through a state-dict hook that concatenates them.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

from dspark.kv.cache import KVCache
from dspark.models.config import ModelConfig
from dspark.models.layers import RMSNorm, Rotary, apply_rotary, attend

SPARE_POSITIONS = 64  # cache rows past max_len: the padding of a step bucketed up to 64 tokens


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
    write_rows: torch.Tensor | None = None  # (N,) batch row of each written token

    @classmethod
    def build(cls, slots: list[int], starts: list[int], num_new: list[int],
              device: torch.device | str = "cpu", sliding_window: int | None = None,
              context: int | None = None) -> ForwardBatch:
        """Sequence b has `starts[b]` cached tokens and `num_new[b]` new ones (>= 1).

        `context` (static shapes, CUDA graphs): masks always exist and span that many cache
        positions, whatever the lengths."""
        B, T = len(slots), max(num_new)
        start = torch.tensor(starts, dtype=torch.long)
        t = torch.arange(T)
        positions = start[:, None] + t[None, :]  # (B, T)
        valid = t[None, :] < torch.tensor(num_new)[:, None]  # (B, T)
        flat = valid.flatten().nonzero().squeeze(1)
        slot_t = torch.tensor(slots, dtype=torch.long)
        ctx_len = context or max(s + n for s, n in zip(starts, num_new))
        full_mask = sliding_mask = None
        j = torch.arange(ctx_len)
        causal = j[None, None, :] <= positions[:, :, None]  # (B, T, S)
        # A fresh prefill of right-padded rows (every start 0, T > 64) needs no mask tensor:
        # real tokens come first, so a causal kernel never lets them see padding; what the
        # padding rows compute is discarded. A (B, 1, T, T) bool mask would force SDPA's slow
        # path, which dominated batched prefill.
        fresh = T > 64 and not any(starts)
        if (B > 1 or T > 1 or context) and not fresh:  # one sequence decoding one token sees its whole cache
            full_mask = causal.unsqueeze(1)
        if sliding_window is not None and (ctx_len > sliding_window or context):
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
            causal=fresh, write_rows=(flat // T).to(device),
        )

    def cache_view(self, cache: KVCache, gather_in_graph: bool = False) -> CacheView:
        """The cache rows this batch reads and writes, as per-layer tensors.

        One sequence, or several in consecutive slots: views of those slots' first `ctx_len`
        positions (no copy; row b is sequence b). Otherwise: every slot's first `ctx_len`
        positions, written at each token's slot and gathered per sequence after the write.
        `gather_in_graph` (static shapes for CUDA graphs): likewise, on the whole stores."""
        if gather_in_graph:  # the stores themselves: CUDA graphs need fixed tensors and addresses
            return CacheView(list(cache.k_store), list(cache.v_store), self.write_slots, self.slots)
        S = self.ctx_len
        if self.single_slot is None and self.slot_range is None:
            rows = slice(None)
            write_rows, read_rows = self.write_slots, self.slots
        else:
            lo, hi = self.slot_range or (self.single_slot, self.single_slot + 1)
            rows = slice(lo, hi)
            write_rows, read_rows = self.write_rows, None
        return CacheView([k[rows, :, :S] for k in cache.k_store], [v[rows, :, :S] for v in cache.v_store],
                         write_rows, read_rows)


@dataclasses.dataclass
class CacheView:
    """Per-layer cache tensors one forward writes its new K/V into and attends over."""

    k: list[torch.Tensor]  # per layer (R, KVH, S, hd): views of the stores
    v: list[torch.Tensor]
    write_rows: torch.Tensor  # (N,) row of k/v that written token i goes to
    read_rows: torch.Tensor | None  # (B,) rows gathered per sequence after the write; None: row b


class Attention(nn.Module):
    """q, k and v come from one fused projection (`qkv_proj`, rows q | k | v); checkpoints
    with HF's separate `q_proj` / `k_proj` / `v_proj` load through `_fuse_on_load`."""

    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        d, hd = cfg.hidden_size, cfg.head_dim
        self.split = (cfg.num_heads * hd, cfg.num_kv_heads * hd, cfg.num_kv_heads * hd)
        self.qkv_proj = nn.Linear(d, sum(self.split), bias=cfg.attention_bias)
        self.o_proj = nn.Linear(cfg.num_heads * hd, d, bias=False)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(hd, cfg.rms_norm_eps, cfg.gemma_norms)
            self.k_norm = RMSNorm(hd, cfg.rms_norm_eps, cfg.gemma_norms)
        self.layer, self.cfg = layer, cfg
        self.sliding = cfg.is_sliding(layer)
        self._register_load_state_dict_pre_hook(_fuse_on_load(("q_proj", "k_proj", "v_proj"), "qkv_proj"))

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                batch: ForwardBatch, view: CacheView) -> torch.Tensor:
        B, T, _ = x.shape
        cfg = self.cfg
        q, k, v = self.qkv_proj(x).split(self.split, dim=-1)
        q = q.view(B, T, cfg.num_heads, cfg.head_dim)
        k = k.view(B, T, cfg.num_kv_heads, cfg.head_dim)
        if cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q = apply_rotary(q.transpose(1, 2), cos, sin)  # (B, H, T, hd)
        k = apply_rotary(k.transpose(1, 2), cos, sin)  # (B, KVH, T, hd)
        kc, vc = view.k[self.layer], view.v[self.layer]  # (R, KVH, S, hd)
        n = batch.write_tokens
        kc[view.write_rows, :, batch.write_positions] = k.transpose(1, 2).reshape(B * T, cfg.num_kv_heads, -1)[n]
        vc[view.write_rows, :, batch.write_positions] = v.reshape(B * T, cfg.num_kv_heads, -1)[n]
        if view.read_rows is not None:
            kc, vc = kc[view.read_rows], vc[view.read_rows]  # (B, KVH, S, hd) gathered
        mask = batch.sliding_mask if (self.sliding and batch.sliding_mask is not None) else batch.full_mask
        out = attend(q, kc, vc, mask, cfg.attn_scale, causal=batch.causal and mask is batch.full_mask)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))


class GatedMLP(nn.Module):
    """down(act(gate(x)) * up(x)) with gate and up fused into one projection (`gate_up_proj`,
    rows gate | up); HF's `gate_proj` / `up_proj` load through `_fuse_on_load`."""

    def __init__(self, dim: int, hidden: int, act: str) -> None:
        super().__init__()
        self.gate_up_proj = nn.Linear(dim, 2 * hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)
        self.act = act
        self._register_load_state_dict_pre_hook(_fuse_on_load(("gate_proj", "up_proj"), "gate_up_proj"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g, u = self.gate_up_proj(x).chunk(2, dim=-1)
        g = F.silu(g) if self.act == "silu" else F.gelu(g, approximate="tanh")
        return self.down_proj(g * u)


def _fuse_on_load(parts: tuple[str, ...], fused: str):  # -> a load_state_dict pre-hook
    """Concatenate HF's separate projections (`{prefix}{part}.weight` / `.bias`) into the
    fused one, in `parts` order, as the state dict is loaded."""

    def hook(state: dict[str, torch.Tensor], prefix: str, *_: object) -> None:
        for kind in ("weight", "bias"):
            names = [f"{prefix}{p}.{kind}" for p in parts]
            if all(n in state for n in names):
                state[f"{prefix}{fused}.{kind}"] = torch.cat([state.pop(n) for n in names])

    return hook


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        g = cfg.gemma_norms
        self.self_attn = Attention(cfg, layer)
        self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, g)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, g)
        if g:  # Gemma's sandwich: post_attention norm closes attention, two more wrap the MLP
            self.pre_feedforward_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, g)
            self.post_feedforward_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, g)
        self.gemma = g

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                batch: ForwardBatch, view: CacheView) -> torch.Tensor:
        a = self.self_attn(self.input_layernorm(x), cos, sin, batch, view)
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

    compiled = None  # a CompiledStep (dspark/models/compile.py): the runner's decode/verify path

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
        return self.step(input_ids, batch, batch.cache_view(cache), taps)

    def step(self, input_ids: torch.Tensor, batch: ForwardBatch, view: CacheView,
             taps: tuple[int, ...] = ()) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """`forward` over resolved cache views: tensors only, so it compiles without
        specializing on slot numbers or lengths."""
        h = self.embed(input_ids)  # (B, T, d)
        cos, sin = self.rope.tables(batch.positions, h.dtype)
        local = self.rope_local.tables(batch.positions, h.dtype) if self.rope_local else (cos, sin)
        tapped: list[torch.Tensor] = []
        for i, layer in enumerate(self.model.layers):
            c, s = local if self.cfg.is_sliding(i) else (cos, sin)
            h = layer(h, c, s, batch, view)
            if i in taps:
                tapped.append(h)
        return self.model.norm(h), tapped

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()

    def new_cache(self, num_slots: int, max_len: int) -> KVCache:
        """`SPARE_POSITIONS` rows past `max_len` take a bucketed step's padding tokens."""
        p = self.lm_head.weight
        return KVCache(self.cfg.num_layers, num_slots, max_len, self.cfg.num_kv_heads,
                       self.cfg.head_dim, dtype=p.dtype, device=p.device, spare=SPARE_POSITIONS)
