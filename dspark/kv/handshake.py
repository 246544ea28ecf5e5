"""What both ends of a KV transfer must agree on before any bytes move.

The sender's `KVSpec` travels first (as the `KVHandshake` message of worker.proto); the
receiver compares it with its own cache's spec and refuses the transfer on any mismatch,
so a wrongly paired worker fails with a clear message instead of importing garbage.
"""

from __future__ import annotations

import dataclasses

import torch

from dspark.kv.cache import KVCache
from dspark.v1 import worker_pb2

PROTOCOL_VERSION = 1
SLOT_LAYOUT = "slot"  # per layer: K and V, each (n, num_kv_heads, head_dim), C-contiguous


class KVHandshakeError(RuntimeError):
    """The peers' KV specs are incompatible; nothing was transferred."""


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}")
    return dtype


@dataclasses.dataclass(frozen=True)
class KVSpec:
    model_id: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype
    max_len: int  # tokens one slot holds (the receiver checks the transfer fits)
    layout: str = SLOT_LAYOUT
    protocol_version: int = PROTOCOL_VERSION

    @classmethod
    def of_cache(cls, cache: KVCache, model_id: str) -> KVSpec:
        return cls(model_id, cache.num_layers, cache.num_kv_heads, cache.head_dim, cache.dtype,
                   cache.max_len)

    def layer_shape(self, num_tokens: int) -> tuple[int, int, int]:
        return (num_tokens, self.num_kv_heads, self.head_dim)

    def to_proto(self) -> worker_pb2.KVSpec:
        return worker_pb2.KVSpec(
            protocol_version=self.protocol_version, model_id=self.model_id,
            num_layers=self.num_layers, num_kv_heads=self.num_kv_heads, head_dim=self.head_dim,
            dtype=dtype_name(self.dtype), max_len=self.max_len, layout=self.layout)

    @classmethod
    def from_proto(cls, msg: worker_pb2.KVSpec) -> KVSpec:
        return cls(msg.model_id, msg.num_layers, msg.num_kv_heads, msg.head_dim,
                   dtype_from_name(msg.dtype), msg.max_len, msg.layout, msg.protocol_version)

    def incompatibilities(self, remote: KVSpec, num_tokens: int) -> list[str]:
        """Why this (receiving) side cannot accept `num_tokens` tokens of `remote`'s KV."""
        problems = [f"{field}: ours {getattr(self, field)!r}, peer's {getattr(remote, field)!r}"
                    for field in ("protocol_version", "model_id", "num_layers", "num_kv_heads",
                                  "head_dim", "dtype", "layout")
                    if getattr(self, field) != getattr(remote, field)]
        if num_tokens > self.max_len:
            problems.append(f"{num_tokens} tokens exceed our max_len {self.max_len}")
        return problems
