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
    """Bytes of weights one decode step reads: every linear's weight once (an int8 linear's
    int8 matrix and scales; a tied LM head reads the embedding matrix once), the norms, and
    no embedding table (the lookup reads a single row)."""
    from dspark.models.linear import Int8Linear

    seen: set[int] = set()
    total = 0
    for module in model.modules():
        if isinstance(module, nn.Embedding):
            continue
        if isinstance(module, Int8Linear):
            tensors = [module.qweight, module.scales, module.bias]
        else:
            tensors = list(module.parameters(recurse=False))
        for t in tensors:
            if t is None or t.data_ptr() in seen:
                continue
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total
