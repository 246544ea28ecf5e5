"""Ray object-store channels: the fallback KV transport when no collective backend fits.

Each tensor is `ray.put` by the sender and its ObjectRef handed to the receiver through a
named async mailbox actor (one FIFO per direction of a pair), so layers stream exactly as
over gloo. The sender owns the objects: if it dies before the receiver fetched them, the
receive fails (PeerLost) and the caller re-prefills. Slower than gloo (~0.2 GiB/s here), but
needs nothing beyond a Ray cluster.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Sequence
from typing import Any

import ray
import torch

from dspark.kv.channel import Role
from dspark.kv.rendezvous import pair_name


class _Mailbox:
    """Async actor: FIFO queues of wrapped ObjectRefs, keyed by channel direction."""

    def __init__(self) -> None:
        self._queues: dict[str, asyncio.Queue[Any]] = collections.defaultdict(asyncio.Queue)

    def put(self, key: str, item: Any) -> None:
        self._queues[key].put_nowait(item)

    async def get(self, key: str, timeout_s: float) -> Any:
        return await asyncio.wait_for(self._queues[key].get(), timeout_s)

    def clear(self, key: str) -> None:
        self._queues.pop(key, None)


class ObjectStoreChannel:
    def __init__(self, mailbox: ray.actor.ActorHandle, out_key: str, in_key: str,
                 timeout_s: float) -> None:
        self.mailbox, self.out_key, self.in_key, self.timeout_s = mailbox, out_key, in_key, timeout_s
        self._last_put: ray.ObjectRef | None = None

    def send(self, tensor: torch.Tensor) -> None:
        # An async actor may run one caller's calls out of order, so each put waits for the
        # previous one (one actor round trip per tensor; the transfer itself stays async).
        # The ref is wrapped in a list so Ray passes the ref instead of resolving it.
        try:
            if self._last_put is not None:
                ray.get(self._last_put, timeout=self.timeout_s)
            self._last_put = self.mailbox.put.remote(self.out_key, [ray.put(tensor.cpu())])
        except (TimeoutError, ray.exceptions.RayError) as e:
            raise ConnectionError(f"object-store send on {self.out_key}: {e}") from e

    def recv(self, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        try:
            (ref,) = ray.get(self.mailbox.get.remote(self.in_key, self.timeout_s))
            tensor = ray.get(ref, timeout=self.timeout_s)
        except (TimeoutError, ray.exceptions.RayError) as e:
            raise ConnectionError(f"object-store receive on {self.in_key}: {e}") from e
        if tuple(tensor.shape) != tuple(shape) or tensor.dtype != dtype:
            raise ConnectionError(f"object-store channel out of sync: got {tuple(tensor.shape)} "
                                  f"{tensor.dtype}, expected {tuple(shape)} {dtype}")
        return tensor

    def close(self) -> None:
        """After a broken transfer: whatever is still queued for us is stale."""
        ray.get(self.mailbox.clear.remote(self.in_key), timeout=self.timeout_s)


class ObjectStoreConnector:
    """Channels through the mailbox actor `dspark-kv-mailbox-{namespace}` (made on first use).

    The actor lives in Ray namespace `ray_namespace` so every driver and Serve replica of
    the cluster finds the same one; `detached` lets it outlive the process that made it.
    """

    backend = "object_store"

    def __init__(self, self_id: str, namespace: str = "default", timeout_s: float = 60.0,
                 ray_namespace: str = "dspark", detached: bool = False) -> None:
        self.self_id, self.namespace, self.timeout_s = self_id, namespace, timeout_s
        self.ray_namespace, self.detached = ray_namespace, detached
        self._mailbox: ray.actor.ActorHandle | None = None

    def connect(self, peer: str, role: Role) -> ObjectStoreChannel:
        if not ray.is_initialized():
            raise RuntimeError("the object_store KV transport needs ray.init() first")
        if self._mailbox is None:
            self._mailbox = ray.remote(num_cpus=0)(_Mailbox).options(
                name=f"dspark-kv-mailbox-{self.namespace}", namespace=self.ray_namespace,
                get_if_exists=True, lifetime="detached" if self.detached else None).remote()
        pair = pair_name(self.self_id, peer) if role == "send" else pair_name(peer, self.self_id)
        forward, backward = f"{pair}:data", f"{pair}:reply"
        out_key, in_key = (forward, backward) if role == "send" else (backward, forward)
        return ObjectStoreChannel(self._mailbox, out_key, in_key, self.timeout_s)

    def close(self) -> None:
        self._mailbox = None
