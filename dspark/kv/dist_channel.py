"""torch.distributed channels: one 2-rank process group per (sender, receiver) pair.

Process groups are built directly (`ProcessGroupGloo` / `ProcessGroupNCCL` on a store), not
through `init_process_group`, so one process can hold any number of independent pairs and
drop and rebuild one without touching the others.

Rendezvous, per pair `sender->receiver` (sender = rank 0, receiver = rank 1):
  * the sender opens a fresh `TCPStore` on 127.0.0.1 and a free port and publishes
    {host, port, generation} through the `RendezvousStore` (Redis in the fleet), with the
    generation one above the last one seen for the pair;
  * the receiver waits for a record newer than any generation it gave up on, connects and
    claims the store (`add("claim", 1) == 1`): a second claimant, e.g. a restarted
    receiver finding its predecessor's store, backs off and waits for the next generation;
  * after a failure either side drops its group (`reset`); the sender's next connect
    publishes generation + 1, which the restarted or surviving receiver then joins.
"""

from __future__ import annotations

import datetime
import logging
import socket
import time
import uuid
from collections.abc import Sequence

import torch
import torch.distributed as dist

from dspark.kv.channel import Role
from dspark.kv.rendezvous import RendezvousStore, pair_name

log = logging.getLogger(__name__)
LOOPBACK = "127.0.0.1"


class TransportUnavailable(RuntimeError):
    """The requested backend cannot run here (e.g. nccl without CUDA)."""


class DistChannel:
    """Blocking send/recv to the other rank of a 2-rank group."""

    def __init__(self, pg: dist.ProcessGroup, rank: int, store: dist.Store,
                 device: torch.device, generation: int) -> None:
        self.pg, self.rank, self.store, self.device = pg, rank, store, device
        self.peer_rank = 1 - rank
        self.generation = generation

    def send(self, tensor: torch.Tensor) -> None:
        self.pg.send([tensor.to(self.device)], self.peer_rank, 0).wait()

    def recv(self, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        out = torch.empty(tuple(shape), dtype=dtype, device=self.device)
        self.pg.recv([out], self.peer_rank, 0).wait()
        return out

    def close(self) -> None:
        try:
            self.pg.shutdown()
        except (RuntimeError, AttributeError) as e:
            log.debug("process group shutdown: %s", e)
        del self.pg, self.store


class DistConnector:
    """Builds `DistChannel`s for `backend` "gloo" (CPU tensors) or "nccl" (CUDA tensors)."""

    def __init__(self, self_id: str, rendezvous: RendezvousStore, backend: str = "gloo",
                 host: str = LOOPBACK, connect_timeout_s: float = 60.0, op_timeout_s: float = 60.0,
                 device: torch.device | str | None = None, poll_s: float = 0.02) -> None:
        if backend not in ("gloo", "nccl"):
            raise ValueError(f"unknown torch.distributed backend {backend!r}")
        self.self_id, self.rendezvous, self.backend, self.host = self_id, rendezvous, backend, host
        self.connect_timeout_s, self.op_timeout_s, self.poll_s = connect_timeout_s, op_timeout_s, poll_s
        self.device = torch.device(device or ("cuda" if backend == "nccl" else "cpu"))
        self.instance = uuid.uuid4().hex[:12]  # tells a restarted process from its predecessor
        self._seen_generation: dict[str, int] = {}  # per pair: newest generation used or abandoned

    def connect(self, peer: str, role: Role) -> DistChannel:
        self._check_available()
        if role == "send":
            return self._host(pair_name(self.self_id, peer))
        return self._join(pair_name(peer, self.self_id))

    def close(self) -> None:
        pass

    def _check_available(self) -> None:
        if self.backend == "nccl" and not (dist.is_nccl_available() and torch.cuda.is_available()):
            raise TransportUnavailable("the nccl KV transport needs CUDA and a torch build with "
                                       "NCCL; use backend 'gloo' (CPU) or 'object_store'")
        if self.backend == "gloo" and not dist.is_gloo_available():
            raise TransportUnavailable("this torch build has no gloo backend")

    # -- rank 0: host the store ------------------------------------------------------------
    def _host(self, pair: str) -> DistChannel:
        previous = self.rendezvous.lookup_rendezvous(pair) or {}
        generation = max(int(previous.get("generation", 0)), self._seen_generation.get(pair, 0)) + 1
        self._seen_generation[pair] = generation
        store = host_store(self.host, 2, self._timeout(self.connect_timeout_s))
        self.rendezvous.publish_rendezvous(pair, {
            "backend": self.backend, "store_host": self.host, "store_port": store.port,
            "world_size": 2, "group_name": pair, "generation": generation,
            "owner": self.instance})
        try:
            pg = self._make_group(store, pair, generation, rank=0)
        except Exception:
            self.rendezvous.clear_rendezvous(pair, generation)
            raise
        log.info("KV pair %s generation %d up (rank 0, %s)", pair, generation, self.backend)
        return DistChannel(pg, 0, store, self.device, generation)

    # -- rank 1: find and join -------------------------------------------------------------
    def _join(self, pair: str) -> DistChannel:
        deadline = time.monotonic() + self.connect_timeout_s
        while time.monotonic() < deadline:
            record = self.rendezvous.lookup_rendezvous(pair)
            generation = int(record["generation"]) if record else 0
            if generation <= self._seen_generation.get(pair, 0):
                time.sleep(self.poll_s)
                continue
            store = self._claim(record, deadline)
            self._seen_generation[pair] = generation  # used or abandoned: never again
            if store is None:
                continue
            pg = self._make_group(store, pair, generation, rank=1)
            log.info("KV pair %s generation %d up (rank 1, %s)", pair, generation, self.backend)
            return DistChannel(pg, 1, store, self.device, generation)
        raise TimeoutError(f"no sender published a usable rendezvous for {pair} "
                           f"within {self.connect_timeout_s:.0f}s")

    def _claim(self, record: dict[str, object], deadline: float) -> dist.Store | None:
        timeout = max(0.5, min(5.0, deadline - time.monotonic()))
        try:
            store = dist.TCPStore(str(record["store_host"]), int(record["store_port"]), 2, False,
                                  self._timeout(timeout))
            return store if store.add("claim", 1) == 1 else None
        except (RuntimeError, ValueError) as e:  # its host died: wait for a newer generation
            log.info("rendezvous %s unusable: %s", record, e)
            return None

    def _make_group(self, store: dist.Store, pair: str, generation: int,
                    rank: int) -> dist.ProcessGroup:
        prefixed = dist.PrefixStore(f"{pair}/{generation}", store)
        if self.backend == "nccl":
            opts = dist.ProcessGroupNCCL.Options()
            opts._timeout = self._timeout(self.op_timeout_s)
            return dist.ProcessGroupNCCL(prefixed, rank, 2, opts)
        opts = dist.ProcessGroupGloo._Options()
        opts._devices = [dist.ProcessGroupGloo.create_device(hostname=self.host)]
        opts._timeout = self._timeout(self.op_timeout_s)
        return dist.ProcessGroupGloo(prefixed, rank, 2, opts)

    @staticmethod
    def _timeout(seconds: float) -> datetime.timedelta:
        return datetime.timedelta(seconds=seconds)


def host_store(host: str, world_size: int, timeout: datetime.timedelta) -> dist.TCPStore:
    """A master TCPStore listening on `host` only, on a free port (`.port`).

    TCPStore binds every interface when it opens its own socket; handing it a socket bound
    to `host` keeps the rendezvous on loopback.
    """
    listener = socket.create_server((host, 0), backlog=128)
    port = listener.getsockname()[1]
    return dist.TCPStore(host, port, world_size, True, timeout, wait_for_workers=False,
                         master_listen_fd=listener.detach())  # the store owns the fd now
