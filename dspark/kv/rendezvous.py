"""Where the two members of a KV-transport pair find each other.

`services.state.redis_state.FleetState` implements `RendezvousStore` on Redis for the
fleet; `InMemoryRendezvous` serves threads of one process (tests, embedded use).
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any, Protocol


class RendezvousStore(Protocol):
    def publish_rendezvous(self, pair: str, record: Mapping[str, Any], *, replace: bool = True,
                           ttl_s: int | None = None) -> dict[str, Any]: ...

    def lookup_rendezvous(self, pair: str) -> dict[str, Any] | None: ...

    def clear_rendezvous(self, pair: str, generation: int | None = None) -> bool: ...


class InMemoryRendezvous:
    """Process-local `RendezvousStore` (no TTLs)."""

    def __init__(self) -> None:
        self._records: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()

    def publish_rendezvous(self, pair: str, record: Mapping[str, Any], *, replace: bool = True,
                           ttl_s: int | None = None) -> dict[str, Any]:
        with self._lock:
            if replace or pair not in self._records:
                self._records[pair] = dict(record)
            return dict(self._records[pair])

    def lookup_rendezvous(self, pair: str) -> dict[str, Any] | None:
        with self._lock:
            record = self._records.get(pair)
            return None if record is None else dict(record)

    def clear_rendezvous(self, pair: str, generation: int | None = None) -> bool:
        with self._lock:
            record = self._records.get(pair)
            if record is None or (generation is not None and record.get("generation") != generation):
                return False
            del self._records[pair]
            return True


def pair_name(sender: str, receiver: str) -> str:
    return f"{sender}->{receiver}"
