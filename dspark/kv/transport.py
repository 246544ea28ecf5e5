"""`KVTransport`: move a sequence's KV cache from a prefill worker to a target worker,
layer by layer, plus extra tensors (the drafter's context features).

Wire protocol of one transfer over an ordered point-to-point `Channel`:

    sender                                 receiver
    KVHandshake (spec, request, n, extras) ->
                                           <- KVHandshakeReply (ok | why not)
    K_0, V_0, K_1, V_1, ... (n, kvh, hd)   ->   on_layer(i, K_i, V_i) as each arrives
    extras_0, extras_1, ...                ->
                                           <- KVHandshakeReply (imported | error)

Variable-length messages go as an int64 length then uint8 bytes; tensors as raw bytes
(dtype-agnostic, bit-exact). Backends differ only in how a `Channel` is made:
`gloo`/`nccl` (torch.distributed pair groups, `dspark.kv.dist_channel`) and the Ray
object store (`dspark.kv.object_store`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Protocol

import torch

from dspark.kv.channel import Channel, Connector, Role
from dspark.kv.handshake import KVHandshakeError, KVSpec, dtype_from_name, dtype_name
from dspark.v1 import worker_pb2

log = logging.getLogger(__name__)
OnLayer = Callable[[int, torch.Tensor, torch.Tensor], None]


class PeerLost(RuntimeError):
    """The channel to a peer broke (peer died or timed out); it has been reset, so the
    next call builds a fresh one."""


class TransferFailed(RuntimeError):
    """The receiver got the bytes but could not import them (its error is the message)."""


@dataclasses.dataclass(frozen=True)
class TransferMeta:
    spec: KVSpec | None  # None: a tensors-only transfer (no layers)
    request_id: str
    num_tokens: int  # n: rows per layer


@dataclasses.dataclass(frozen=True)
class ReceivedTransfer:
    request_id: str
    num_tokens: int
    spec: KVSpec | None
    extras: list[torch.Tensor]


class KVTransport(Protocol):
    backend: str

    def send_kv(self, peer: str, layers: Iterable[tuple[torch.Tensor, torch.Tensor]],
                meta: TransferMeta, extras: Sequence[torch.Tensor] = ()) -> None: ...

    def recv_kv(self, peer: str, expected: KVSpec | None, on_layer: OnLayer) -> ReceivedTransfer: ...

    def reset(self, peer: str | None = None) -> None: ...

    def close(self) -> None: ...


class _Stage(Exception):
    """Internal: a channel error, tagged with whether the peer may have consumed data."""

    def __init__(self, cause: Exception, delivered: bool) -> None:
        super().__init__(str(cause))
        self.cause, self.delivered = cause, delivered


class ChannelTransport:
    """The one `KVTransport` implementation; channels are cached per (peer, role).

    Thread-safe: transfers on one (peer, role) channel run one at a time (a channel is a
    single ordered stream); transfers to different peers run concurrently.
    """

    def __init__(self, connector: Connector) -> None:
        self.connector = connector
        self.backend = connector.backend
        self._channels: dict[tuple[str, Role], Channel] = {}
        self._locks: dict[tuple[str, Role], threading.Lock] = {}
        self._locks_guard = threading.Lock()

    # -- public API ------------------------------------------------------------------------
    def send_kv(self, peer: str, layers: Iterable[tuple[torch.Tensor, torch.Tensor]],
                meta: TransferMeta, extras: Sequence[torch.Tensor] = ()) -> None:
        """Stream `layers` (each K, V of shape (n, kvh, hd)) then `extras` to `peer`.

        Blocks until the receiver confirmed the import. A broken channel found before any
        layer left (e.g. the peer restarted since the last transfer) is rebuilt once.
        """
        header = _header(meta, extras)
        for attempt in (0, 1):
            try:
                with self._lock(peer, "send"):
                    return self._send_once(peer, header, meta, layers, extras)
            except _Stage as e:
                self.reset(peer, "send")
                if e.delivered or attempt == 1:
                    raise PeerLost(f"KV send to {peer!r} failed: {e.cause}") from e.cause
                log.info("KV channel to %s broke before the transfer (%s); rebuilding", peer, e)
        raise AssertionError("unreachable")

    def recv_kv(self, peer: str, expected: KVSpec | None, on_layer: OnLayer) -> ReceivedTransfer:
        """Receive one transfer from `peer`, calling `on_layer(i, k, v)` per layer in order.

        Refuses (KVHandshakeError, and the sender learns why) if the sender's spec does not
        match `expected`. A callback error is reported to the sender and re-raised here.
        """
        for attempt in (0, 1):
            try:
                with self._lock(peer, "recv"):
                    return self._recv_once(peer, expected, on_layer)
            except _Stage as e:
                self.reset(peer, "recv")
                if e.delivered or attempt == 1:
                    raise PeerLost(f"KV receive from {peer!r} failed: {e.cause}") from e.cause
                log.info("KV channel from %s broke before the transfer (%s); rebuilding", peer, e)
        raise AssertionError("unreachable")

    def send_tensors(self, peer: str, request_id: str, tensors: Sequence[torch.Tensor]) -> None:
        """Extra tensors only (e.g. context features for a drafter worker)."""
        self.send_kv(peer, (), TransferMeta(None, request_id, 0), tensors)

    def recv_tensors(self, peer: str) -> ReceivedTransfer:
        return self.recv_kv(peer, None, _no_layers)

    def reset(self, peer: str | None = None, role: Role | None = None) -> None:
        """Drop cached channels (all, or those to `peer`); the next use reconnects."""
        for key in [k for k in self._channels
                    if (peer is None or k[0] == peer) and (role is None or k[1] == role)]:
            channel = self._channels.pop(key)
            try:
                channel.close()
            except Exception as e:  # a broken channel may fail to close; it is gone anyway
                log.debug("closing channel %s: %s", key, e)

    def close(self) -> None:
        self.reset()
        self.connector.close()

    # -- one attempt -------------------------------------------------------------------------
    def _lock(self, peer: str, role: Role) -> threading.Lock:
        with self._locks_guard:
            return self._locks.setdefault((peer, role), threading.Lock())

    def _channel(self, peer: str, role: Role) -> Channel:
        if (peer, role) not in self._channels:
            self._channels[(peer, role)] = self.connector.connect(peer, role)
        return self._channels[(peer, role)]

    def _send_once(self, peer: str, header: worker_pb2.KVHandshake, meta: TransferMeta,
                   layers: Iterable[tuple[torch.Tensor, torch.Tensor]],
                   extras: Sequence[torch.Tensor]) -> None:
        ch = self._channel(peer, "send")
        with _stage(delivered=False):
            _send_bytes(ch, header.SerializeToString())
            reply = worker_pb2.KVHandshakeReply.FromString(_recv_bytes(ch))
        if not reply.ok:
            raise KVHandshakeError(f"peer {peer!r} refused the KV transfer: {reply.error}")
        try:
            with _stage(delivered=True):
                _send_layers(ch, meta, layers)
                for t in extras:
                    _send(ch, t)
                done = worker_pb2.KVHandshakeReply.FromString(_recv_bytes(ch))
        except (ValueError, TypeError):  # bad layer from our caller: peer is mid-stream
            self.reset(peer, "send")
            raise
        if not done.ok:
            raise TransferFailed(f"peer {peer!r} failed to import request {meta.request_id}: "
                                 f"{done.error}")

    def _recv_once(self, peer: str, expected: KVSpec | None, on_layer: OnLayer) -> ReceivedTransfer:
        ch = self._channel(peer, "recv")
        with _stage(delivered=False):
            header = worker_pb2.KVHandshake.FromString(_recv_bytes(ch))
        spec = KVSpec.from_proto(header.spec) if header.HasField("spec") else None
        problem = _refusal(expected, spec, header.num_tokens)
        with _stage(delivered=True):
            _send_bytes(ch, worker_pb2.KVHandshakeReply(ok=not problem, error=problem)
                        .SerializeToString())
        if problem:
            raise KVHandshakeError(f"refused KV from {peer!r}: {problem}")
        error: Exception | None = None
        with _stage(delivered=True):
            for i in range(spec.num_layers if spec else 0):
                shape = spec.layer_shape(header.num_tokens)
                k, v = _recv(ch, shape, spec.dtype), _recv(ch, shape, spec.dtype)
                if error is None:  # after a callback error keep draining to stay in sync
                    error = _call(on_layer, i, k, v)
            extras = [_recv(ch, tuple(m.shape), dtype_from_name(m.dtype)) for m in header.extras_meta]
            _send_bytes(ch, worker_pb2.KVHandshakeReply(
                ok=error is None, error="" if error is None else repr(error)).SerializeToString())
        if error is not None:
            raise error
        return ReceivedTransfer(header.request_id, header.num_tokens, spec, extras)


def create_transport(backend: str, self_id: str, rendezvous: object = None,
                     **options: object) -> ChannelTransport:
    """`backend` in {"gloo", "nccl", "object_store"}; `self_id` names this worker for its
    peers; `rendezvous` is a `RendezvousStore` (gloo/nccl); `options` go to the connector."""
    if backend not in _CONNECTORS:
        raise ValueError(f"unknown KV transport {backend!r}; known: {', '.join(sorted(_CONNECTORS))}")
    return ChannelTransport(_CONNECTORS[backend](self_id, rendezvous, **options))


def _dist_connector(backend: str) -> Callable[..., Connector]:
    def make(self_id: str, rendezvous: object, **options: object) -> Connector:
        from dspark.kv.dist_channel import DistConnector

        if rendezvous is None:
            raise ValueError(f"the {backend} transport needs a rendezvous store")
        return DistConnector(self_id, rendezvous, backend=backend, **options)  # type: ignore[arg-type]
    return make


def _object_store_connector(self_id: str, rendezvous: object, **options: object) -> Connector:
    from dspark.kv.object_store import ObjectStoreConnector

    return ObjectStoreConnector(self_id, **options)  # type: ignore[arg-type]


_CONNECTORS: dict[str, Callable[..., Connector]] = {
    "gloo": _dist_connector("gloo"), "nccl": _dist_connector("nccl"),
    "object_store": _object_store_connector,
}


# -- framing helpers -------------------------------------------------------------------------
@contextlib.contextmanager
def _stage(delivered: bool) -> Iterator[None]:
    """Turn channel errors (gloo/NCCL raise RuntimeError subclasses) into `_Stage`."""
    try:
        yield
    except (KVHandshakeError, TransferFailed):
        raise
    except (RuntimeError, TimeoutError, ConnectionError, OSError) as e:
        raise _Stage(e, delivered) from e


def _header(meta: TransferMeta, extras: Sequence[torch.Tensor]) -> worker_pb2.KVHandshake:
    msg = worker_pb2.KVHandshake(request_id=meta.request_id, num_tokens=meta.num_tokens)
    if meta.spec is not None:
        msg.spec.CopyFrom(meta.spec.to_proto())
    for t in extras:
        msg.extras_meta.add(dtype=dtype_name(t.dtype), shape=list(t.shape))
    return msg


def _refusal(expected: KVSpec | None, spec: KVSpec | None, num_tokens: int) -> str:
    if expected is None:
        return ""
    if spec is None:
        return "sender sent no KV spec"
    return "; ".join(expected.incompatibilities(spec, num_tokens))


def _send_layers(ch: Channel, meta: TransferMeta,
                 layers: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> None:
    spec, count = meta.spec, 0
    want = spec.layer_shape(meta.num_tokens) if spec else None
    for k, v in layers:
        if spec is None or count >= spec.num_layers:
            raise ValueError(f"more layers than the spec's {spec.num_layers if spec else 0}")
        for t in (k, v):
            if tuple(t.shape) != want or t.dtype != spec.dtype:
                raise ValueError(f"layer {count}: got {tuple(t.shape)} {t.dtype}, spec says "
                                 f"{want} {spec.dtype}")
            _send(ch, t)
        count += 1
    if spec is not None and count != spec.num_layers:
        raise ValueError(f"got {count} layers, spec says {spec.num_layers}")


def _send(ch: Channel, t: torch.Tensor) -> None:
    if t.numel():  # empty tensors are implied by their header-known shape
        ch.send(t.contiguous())


def _recv(ch: Channel, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    if 0 in shape:
        return torch.empty(tuple(shape), dtype=dtype)
    return ch.recv(tuple(shape), dtype)


def _send_bytes(ch: Channel, data: bytes) -> None:
    ch.send(torch.tensor([len(data)], dtype=torch.int64))
    if data:
        ch.send(torch.frombuffer(bytearray(data), dtype=torch.uint8))


def _recv_bytes(ch: Channel) -> bytes:
    n = int(ch.recv((1,), torch.int64).item())
    return _recv(ch, (n,), torch.uint8).cpu().numpy().tobytes()


def _call(on_layer: OnLayer, i: int, k: torch.Tensor, v: torch.Tensor) -> Exception | None:
    try:
        on_layer(i, k, v)
    except Exception as e:  # reported to the sender, re-raised after the stream drained
        return e
    return None


def _no_layers(i: int, k: torch.Tensor, v: torch.Tensor) -> None:
    raise AssertionError("a tensors-only transfer has no layers")
