"""Fleet state in Redis: request registry, per-request token log, KV rendezvous records.

Key layout (all under a configurable namespace `ns`, every key with a TTL):

    {ns}:req:{id}      hash   status, created_at, updated_at, m:<field> metadata
    {ns}:tok:{id}      list   committed output token ids, index == output offset
    {ns}:active        zset   ids of non-terminal requests, scored by created_at
    {ns}:rdv:{pair}    string JSON rendezvous record of a KV-transport pair
    {ns}:router:{id}   string liveness of a router instance (short TTL, refreshed by it)

Invariants: the token list only grows by appends whose offset equals its current length
(checked inside Redis by a Lua script, so concurrent or retried appends can neither
duplicate nor skip tokens); every multi-key write is one Lua script or MULTI/EXEC; every
failure to reach Redis surfaces as `StateUnavailable`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import json
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from services.state import scripts


class StateUnavailable(RuntimeError):
    """Redis cannot be reached (the router maps this to gRPC UNAVAILABLE)."""


class StateConflict(RuntimeError):
    """A write that contradicts the stored state (duplicate id, illegal transition)."""


class UnknownRequest(KeyError):
    """No such request (never registered, or its keys expired)."""


class TokenOffsetMismatch(StateConflict):
    """An append at an offset other than the log's length; `expected` is that length."""

    def __init__(self, request_id: str, offset: int, expected: int) -> None:
        super().__init__(f"request {request_id}: append at offset {offset}, log has {expected}")
        self.offset, self.expected = offset, expected


class RequestStatus(enum.StrEnum):
    QUEUED = "queued"
    PREFILLING = "prefilling"
    RUNNING = "running"
    FINISHED = "finished"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in _TERMINAL


_TERMINAL = frozenset({RequestStatus.FINISHED, RequestStatus.FAILED, RequestStatus.CANCELLED})
# RUNNING -> PREFILLING is the failover path: re-prefill prompt + committed tokens elsewhere.
ALLOWED_FROM: dict[RequestStatus, frozenset[RequestStatus]] = {
    RequestStatus.QUEUED: frozenset(),
    RequestStatus.PREFILLING: frozenset({RequestStatus.QUEUED, RequestStatus.RUNNING}),
    RequestStatus.RUNNING: frozenset({RequestStatus.PREFILLING}),
    **{s: frozenset(set(RequestStatus) - _TERMINAL) for s in _TERMINAL},
}


@dataclasses.dataclass(frozen=True)
class RequestRecord:
    request_id: str
    status: RequestStatus
    created_at: float
    updated_at: float
    meta: dict[str, str]


@dataclasses.dataclass(frozen=True)
class StateConfig:
    namespace: str = "dspark"
    request_ttl_s: int = 3600  # registry entry and token log; refreshed by every write
    rendezvous_ttl_s: int = 300  # KV-pair records; refreshed by `refresh_rendezvous`
    socket_timeout_s: float = 2.0
    retries: int = 1  # redis-py retries on connection errors before StateUnavailable


class FleetState:
    """Synchronous wrapper around one redis-py client (thread-safe: it holds a pool)."""

    def __init__(self, client: redis.Redis, config: StateConfig | None = None) -> None:
        self.client = client
        self.config = config or StateConfig()
        self._ns = self.config.namespace
        self._register = client.register_script(scripts.REGISTER)
        self._transition = client.register_script(scripts.TRANSITION)
        self._append = client.register_script(scripts.APPEND_TOKENS)
        self._publish = client.register_script(scripts.PUBLISH_RENDEZVOUS)
        self._clear = client.register_script(scripts.CLEAR_RENDEZVOUS)

    @classmethod
    def from_url(cls, url: str, config: StateConfig | None = None) -> FleetState:
        config = config or StateConfig()
        client = redis.Redis.from_url(
            url, decode_responses=True, socket_timeout=config.socket_timeout_s,
            socket_connect_timeout=config.socket_timeout_s,
            retry=Retry(NoBackoff(), config.retries))
        return cls(client, config)

    def close(self) -> None:
        self.client.close()

    def ping(self) -> None:
        with self._guard():
            self.client.ping()

    # -- keys ----------------------------------------------------------------------------
    def _key(self, kind: str, name: str = "") -> str:
        return f"{self._ns}:{kind}:{name}" if name else f"{self._ns}:{kind}"

    @contextlib.contextmanager
    def _guard(self) -> Iterator[None]:
        try:
            yield
        except (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError) as e:
            raise StateUnavailable(f"redis unavailable: {e}") from e

    # -- request registry ---------------------------------------------------------------
    def register(self, request_id: str, meta: Mapping[str, Any] | None = None,
                 status: RequestStatus = RequestStatus.QUEUED) -> RequestRecord:
        """Create the registry entry; raises StateConflict if the id is already live."""
        now = time.time()
        fields = _meta_fields(meta or {})
        with self._guard():
            created = self._register(
                keys=[self._key("req", request_id), self._key("tok", request_id),
                      self._key("active")],
                args=[request_id, str(status), repr(now), self.config.request_ttl_s, *fields])
        if not created:
            raise StateConflict(f"request {request_id} is already registered")
        return RequestRecord(request_id, status, now, now, {k: str(v) for k, v in (meta or {}).items()})

    def get(self, request_id: str) -> RequestRecord:
        with self._guard():
            raw = self.client.hgetall(self._key("req", request_id))
        if not raw:
            raise UnknownRequest(request_id)
        return _record(request_id, raw)

    def update_meta(self, request_id: str, meta: Mapping[str, Any]) -> None:
        """Set metadata fields (e.g. the assigned replicas) on a live request."""
        if not meta:
            return
        key = self._key("req", request_id)
        with self._guard(), self.client.pipeline(transaction=True) as pipe:
            pipe.exists(key)
            pipe.hset(key, mapping={f"m:{k}": str(v) for k, v in meta.items()})
            pipe.expire(key, self.config.request_ttl_s)
            existed = pipe.execute()[0]
        if not existed:  # HSET created a stray hash: remove it again
            with self._guard():
                self.client.delete(key)
            raise UnknownRequest(request_id)

    def set_status(self, request_id: str, status: RequestStatus,
                   fields: Mapping[str, Any] | None = None) -> RequestStatus:
        """Move to `status` (and set extra `fields`, e.g. usage) if the transition is legal.

        Returns the previous status; raises StateConflict on an illegal transition and
        UnknownRequest if the request does not exist. Terminal statuses leave `active`.
        """
        allowed = sorted(ALLOWED_FROM[status])
        with self._guard():
            ok, prev = self._transition(
                keys=[self._key("req", request_id), self._key("active")],
                args=[request_id, str(status), repr(time.time()), self.config.request_ttl_s,
                      int(status.terminal), len(allowed), *allowed,
                      *_meta_fields(fields or {})])
        if prev is None or prev == "":
            raise UnknownRequest(request_id)
        if not ok:
            raise StateConflict(f"request {request_id}: illegal transition {prev} -> {status}")
        return RequestStatus(prev)

    def list_active(self, limit: int = 1000) -> list[str]:
        """Ids of non-terminal requests, oldest first (expired entries are pruned)."""
        with self._guard():
            ids: list[str] = self.client.zrange(self._key("active"), 0, limit - 1)
            if not ids:
                return []
            with self.client.pipeline(transaction=False) as pipe:
                for rid in ids:
                    pipe.exists(self._key("req", rid))
                alive = pipe.execute()
            dead = [rid for rid, ok in zip(ids, alive, strict=True) if not ok]
            if dead:
                self.client.zrem(self._key("active"), *dead)
        return [rid for rid, ok in zip(ids, alive, strict=True) if ok]

    def delete(self, request_id: str) -> None:
        with self._guard(), self.client.pipeline(transaction=True) as pipe:
            pipe.delete(self._key("req", request_id), self._key("tok", request_id))
            pipe.zrem(self._key("active"), request_id)
            pipe.execute()

    # -- router liveness and request ownership ----------------------------------------------
    def heartbeat(self, router_id: str, ttl_s: float) -> None:
        """Mark router `router_id` alive for `ttl_s` (it refreshes well before expiry)."""
        with self._guard():
            self.client.set(self._key("router", router_id), "1", px=int(ttl_s * 1000))

    def router_alive(self, router_id: str) -> bool:
        with self._guard():
            return bool(router_id) and bool(self.client.exists(self._key("router", router_id)))

    def claim(self, request_id: str, from_router: str, to_router: str) -> bool:
        """Move a request's `router` field from `from_router` to `to_router`, atomically
        (WATCH/MULTI): of several routers taking over one orphan, exactly one wins."""
        key = self._key("req", request_id)
        with self._guard(), self.client.pipeline(transaction=True) as pipe:
            try:
                pipe.watch(key)
                if (pipe.hget(key, "m:router") or "") != from_router or not pipe.exists(key):
                    return False
                pipe.multi()
                pipe.hset(key, "m:router", to_router)
                pipe.execute()
                return True
            except redis.WatchError:
                return False

    # -- token log -----------------------------------------------------------------------
    def append_tokens(self, request_id: str, offset: int, token_ids: Sequence[int]) -> int:
        """Append `token_ids` as output positions [offset, offset + n); returns the new length.

        Exactly-once: an append at the log's length is written; a retry of an append that
        is already stored (same offset, same tokens) is a no-op; anything else raises
        TokenOffsetMismatch (with the log's length) and writes nothing.
        """
        with self._guard():
            status, length = self._append(
                keys=[self._key("tok", request_id), self._key("req", request_id)],
                args=[offset, self.config.request_ttl_s, *map(int, token_ids)])
        if status == "missing":
            raise UnknownRequest(request_id)
        if status == "mismatch":
            raise TokenOffsetMismatch(request_id, offset, int(length))
        return int(length)

    def read_tokens(self, request_id: str, from_offset: int = 0) -> list[int]:
        with self._guard():
            raw = self.client.lrange(self._key("tok", request_id), from_offset, -1)
        return [int(t) for t in raw]

    def num_tokens(self, request_id: str) -> int:
        with self._guard():
            return int(self.client.llen(self._key("tok", request_id)))

    # -- KV-transport rendezvous -----------------------------------------------------------
    def publish_rendezvous(self, pair: str, record: Mapping[str, Any], *,
                           replace: bool = True, ttl_s: int | None = None) -> dict[str, Any]:
        """Store `record` for `pair`; returns the record now stored.

        With `replace=False` an existing record wins (first publisher wins) and is returned.
        """
        ttl = ttl_s or self.config.rendezvous_ttl_s
        with self._guard():
            stored = self._publish(keys=[self._key("rdv", pair)],
                                   args=[json.dumps(dict(record)), ttl, int(replace)])
        return dict(json.loads(stored))

    def lookup_rendezvous(self, pair: str) -> dict[str, Any] | None:
        with self._guard():
            raw = self.client.get(self._key("rdv", pair))
        return None if raw is None else dict(json.loads(raw))

    def clear_rendezvous(self, pair: str, generation: int | None = None) -> bool:
        """Delete the record (only if its `generation` matches, when given)."""
        with self._guard():
            return bool(self._clear(keys=[self._key("rdv", pair)],
                                    args=["" if generation is None else str(generation)]))

    def refresh_rendezvous(self, pair: str, ttl_s: int | None = None) -> bool:
        with self._guard():
            return bool(self.client.expire(self._key("rdv", pair),
                                           ttl_s or self.config.rendezvous_ttl_s))


def _meta_fields(meta: Mapping[str, Any]) -> list[str]:
    """Flatten `{k: v}` into `["m:k", "v", ...]` (hash fields with a metadata prefix)."""
    out: list[str] = []
    for k, v in meta.items():
        out += [f"m:{k}", str(v)]
    return out


def _record(request_id: str, raw: Mapping[str, str]) -> RequestRecord:
    return RequestRecord(
        request_id=request_id, status=RequestStatus(raw["status"]),
        created_at=float(raw["created_at"]), updated_at=float(raw["updated_at"]),
        meta={k[2:]: v for k, v in raw.items() if k.startswith("m:")})
