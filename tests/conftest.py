"""Fixtures and hooks shared by every test folder."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from services.state.server import RedisServer

# Ray reads these when it is imported: set them before any test module imports ray, so every
# Ray process binds 127.0.0.1 (docs/tooling.md) and no test traffic leaves loopback.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """`@pytest.mark.gpu` tests are skipped on machines without CUDA."""
    gpu_items = [item for item in items if "gpu" in item.keywords]
    if not gpu_items:
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in gpu_items:
        item.add_marker(skip)


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """A private redis-server on 127.0.0.1 and a free port for the whole session (`.url`);
    skipped where the binary is missing (`make system-deps` installs it)."""
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server not installed (make system-deps)")
    from services.state.server import RedisServer

    with RedisServer() as server:
        yield server
