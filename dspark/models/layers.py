"""Building blocks shared by every family: RMSNorm, rotary embeddings, attention, MLP."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """RMSNorm computed in float32. Gemma scales by (1 + w) instead of w."""

    def __init__(self, dim: int, eps: float, gemma: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim) if gemma else torch.ones(dim))
        self.eps, self.gemma = eps, gemma

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        w = self.weight.float()
        if self.gemma:
            return (xf * (1.0 + w)).to(x.dtype)
        return w.to(x.dtype) * xf.to(x.dtype)  # HF Llama casts before scaling


class Rotary:
    """Non-interleaved (rotate-half) RoPE with a cos/sin table indexed by position."""

    def __init__(self, head_dim: int, theta: float, max_len: int, scale: float = 1.0) -> None:
        # Built on the CPU explicitly, so a model constructed under `torch.device("meta")`
        # (the loader skips random init that way) still gets real tables.
        even = torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float()
        inv = 1.0 / (theta ** (even / head_dim))
        pos = torch.arange(max_len, dtype=torch.float32, device="cpu") / scale
        freqs = torch.outer(pos, inv)
        emb = torch.cat([freqs, freqs], dim=-1)  # (max_len, hd)
        self.cos, self.sin = emb.cos(), emb.sin()
        self._cast: dict[torch.dtype, tuple[torch.Tensor, torch.Tensor]] = {}

    def to(self, device: torch.device | str) -> Rotary:
        self.cos, self.sin = self.cos.to(device), self.sin.to(device)
        self._cast = {}
        return self

    def tables(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        # positions (B, T) -> cos/sin (B, 1, T, hd) to broadcast over heads. The float32 table
        # is cast once per dtype (what HF computes per step: float32 cos/sin, then cast).
        if dtype not in self._cast:
            self._cast[dtype] = (self.cos.to(dtype), self.sin.to(dtype))
        cos, sin = self._cast[dtype]
        return cos[positions].unsqueeze(1), sin[positions].unsqueeze(1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int, act: str) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.gate_proj(x)
        g = F.silu(g) if self.act == "silu" else F.gelu(g, approximate="tanh")
        return self.down_proj(g * self.up_proj(x))


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
           scale: float, causal: bool = False) -> torch.Tensor:
    """q (B, H, T, hd); k, v (B, KVH, S, hd); mask (B, 1, T, S) bool (True = attend);
    `causal` (with mask None, S == T > 64): plain causal attention by the fused kernel.

    Plain matmul attention with grouped query heads folded into the row dimension: for the
    few query tokens of decode and verification this is several times faster on CPU than
    the fused SDPA kernels (which also want contiguous K/V; ours are strided cache views).
    Softmax runs in float32, as the reference implementations do.
    """
    B, H, T, hd = q.shape
    kvh, S = k.shape[1], k.shape[2]
    g = H // kvh
    if T > 64:  # long prefill: the fused kernel wins and bounds memory
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=g > 1,
                                              is_causal=causal and mask is None)
    qg = q.reshape(B, kvh, g * T, hd)  # query head h uses kv head h // g
    scores = torch.matmul(qg, k.transpose(-1, -2)).float() * scale  # (B, KVH, g*T, S)
    if mask is not None:
        scores = scores.view(B, kvh, g, T, S).masked_fill(~mask.unsqueeze(2), float("-inf"))
        scores = scores.view(B, kvh, g * T, S)
    probs = torch.softmax(scores, dim=-1).to(v.dtype)
    return torch.matmul(probs, v).view(B, H, T, hd)
