"""Environment Ray must see *before it is imported* (it reads these at import time)."""

from __future__ import annotations

import os

LOOPBACK = "127.0.0.1"


def ray_env() -> None:
    """Keep every Ray process on 127.0.0.1 (without this Ray binds the machine's network
    interface even when asked for 127.0.0.1), no usage reporting, one torch thread per
    worker (OpenMP threads spin against each other on small shared machines)."""
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
