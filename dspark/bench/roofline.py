"""Memory-bandwidth roofline for batch-1 decoding: each token reads every weight once."""

from __future__ import annotations

import statistics
import time

import torch
from torch import nn


def copy_bandwidth_gb_s(nbytes: int = 256 * 2**20, repeats: int = 7) -> float:
    """Median bandwidth of a large tensor copy, counting bytes read plus bytes written."""
    src = torch.ones(nbytes // 4, dtype=torch.float32)
    dst = torch.empty_like(src)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - t0)
    return 2 * nbytes / statistics.median(times) / 1e9


def weight_bytes_per_token(model: nn.Module) -> int:
    """Bytes of weights one decode step reads: every parameter once (a tied LM head reads
    the embedding matrix once; the embedding lookup itself reads a single row)."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if p.data_ptr() in seen:
            continue
        seen.add(p.data_ptr())
        total += p.numel() * p.element_size()
    emb = getattr(getattr(model, "model", None), "embed_tokens", None)
    head = getattr(model, "lm_head", None)
    if emb is not None and head is not None and emb.weight.data_ptr() != head.weight.data_ptr():
        total -= emb.weight.numel() * emb.weight.element_size()  # untied: a lookup, not a read
    return total
