"""Fixtures for the model tests."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a model hub


@pytest.fixture(scope="package", autouse=True)
def _one_torch_thread() -> Iterator[None]:
    """Run model tests single-threaded unless OMP_NUM_THREADS says otherwise.

    On a small shared machine, OpenMP worker threads spin-wait on busy cores: a (10, 576) x
    (576, 1536) matmul measured ~30x slower with 2 threads than with 1 under load.
    """
    before = torch.get_num_threads()
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
