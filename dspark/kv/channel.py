"""The point-to-point pipe a `KVTransport` runs over, and what makes one.

Kept apart from `dspark.kv.transport` so the backends (`dist_channel`: gloo/nccl pair
groups; `object_store`: Ray's object store) depend on this small contract only, and the
transport can pick a backend without the two importing each other.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, Protocol

import torch

Role = Literal["send", "recv"]


class Channel(Protocol):
    """Ordered, reliable point-to-point tensor pipe to one peer."""

    def send(self, tensor: torch.Tensor) -> None: ...

    def recv(self, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor: ...

    def close(self) -> None: ...


class Connector(Protocol):
    """Makes channels; `send` means this side is the pair's sender (rank 0)."""

    backend: str

    def connect(self, peer: str, role: Role) -> Channel: ...

    def close(self) -> None: ...
