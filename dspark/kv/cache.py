"""Slot-based KV cache owned by the engine.

Memory is preallocated once: per layer one key and one value store of shape
`(num_slots, num_kv_heads, max_len + spare, head_dim)`, head-major, so attention reads a
slot's keys of one head as a contiguous `(S, head_dim)` block and batched matmuls take the
cache view without a copy. `k[layer]` / `v[layer]` are views of the same memory in the
`(num_slots, max_len, num_kv_heads, head_dim)` order that export/import and tests index.
`spare` rows past `max_len` take the padding tokens of a bucketed (compiled) step; they are
never read as context. A sequence owns a slot; its length is pure bookkeeping, so rollback to
any shorter length is O(1) (later writes overwrite the stale entries) and nothing is ever
copied on commit.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch


class KVCacheFull(RuntimeError):
    """No free slot, or a sequence would grow past `max_len`."""


class KVCache:
    def __init__(self, num_layers: int, num_slots: int, max_len: int, num_kv_heads: int,
                 head_dim: int, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu", spare: int = 0) -> None:
        shape = (num_slots, num_kv_heads, max_len + spare, head_dim)
        self.k_store = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v_store = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        # (num_slots, max_len, num_kv_heads, head_dim) views of the stores
        self.k = [t.transpose(1, 2)[:, :max_len] for t in self.k_store]
        self.v = [t.transpose(1, 2)[:, :max_len] for t in self.v_store]
        self.num_layers, self.num_slots, self.max_len = num_layers, num_slots, max_len
        self.num_kv_heads, self.head_dim, self.dtype = num_kv_heads, head_dim, dtype
        self.lengths = [0] * num_slots
        self._free = list(range(num_slots - 1, -1, -1))

    # -- slot bookkeeping -------------------------------------------------------------
    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self) -> int:
        if not self._free:
            raise KVCacheFull(f"all {self.num_slots} KV slots are in use")
        slot = self._free.pop()
        self.lengths[slot] = 0
        return slot

    def free(self, slot: int) -> None:
        if slot in self._free:
            raise ValueError(f"slot {slot} is already free")
        self.lengths[slot] = 0
        self._free.append(slot)

    def rollback(self, slot: int, length: int) -> None:
        """Forget everything at positions >= `length` (O(1): only the length moves)."""
        if not 0 <= length <= self.lengths[slot]:
            raise ValueError(f"cannot roll slot {slot} back to {length} (has {self.lengths[slot]})")
        self.lengths[slot] = length

    def reserve(self, slot: int, num_new: int) -> None:
        if self.lengths[slot] + num_new > self.max_len:
            raise KVCacheFull(f"slot {slot} would exceed max_len={self.max_len}")

    # -- export / import, one layer at a time (the prefill/decode split streams these) --
    def export_layers(self, slot: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = self.lengths[slot]
        for k, v in zip(self.k, self.v):
            # (n, kvh, hd) each, contiguous: transports send the raw bytes
            yield k[slot, :n].clone(memory_format=torch.contiguous_format), \
                v[slot, :n].clone(memory_format=torch.contiguous_format)

    def import_layer(self, slot: int, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        n = k.shape[0]
        if n > self.max_len or k.shape[1:] != self.k[layer].shape[2:] or v.shape != k.shape:
            raise ValueError(f"layer {layer}: KV shape {tuple(k.shape)} does not fit this cache")
        self.k[layer][slot, :n].copy_(k)
        self.v[layer][slot, :n].copy_(v)

    def set_length(self, slot: int, length: int) -> None:
        if not 0 <= length <= self.max_len:
            raise ValueError(f"length {length} outside [0, {self.max_len}]")
        self.lengths[slot] = length
