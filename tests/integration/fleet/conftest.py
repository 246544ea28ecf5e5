"""One real fleet (Ray on loopback, redis-server, Serve app, router) per test module."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")
MAX_NEW = 24
PROMPTS = ["The capital of France is", "def fibonacci(n):\n    ", "1, 2, 3, 4, 5,"]


@pytest.fixture(scope="session")
def fleet() -> Iterator[object]:
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server not installed (make system-deps)")
    from services.config import load_config
    from services.launcher import LocalFleet

    # 16 generating (the target's KV slots), 32 more may queue (the load test's 32 streams);
    # a small default length keeps fuzzed requests that name none short on this CPU.
    cfg = load_config("deploy/serve/fleet.yaml", max_in_flight=16, max_queued=32, default_max_new_tokens=16,
                      recovery_timeout_s=90)
    with LocalFleet(cfg, metrics_port=0) as f:
        yield f


@pytest.fixture(scope="session")
def embedded() -> tuple[object, object]:
    """(target, engine): the embedded engine with the fleet's model and method, the
    reference every fleet output is compared with (tests/integration/fleet/helpers.py)."""
    import torch

    from dspark.engine.build import build_engine
    from dspark.engine.config import EngineConfig

    torch.set_num_threads(1)
    target, engine, _ = build_engine(EngineConfig(method="ngram", max_batch_size=4))
    return target, engine


@pytest.fixture(scope="session")
def reference(embedded: tuple[object, object]) -> dict[str, list[int]]:
    """Greedy outputs of the embedded engine with the same model and method."""
    from dspark.spec.sampling import SamplingParams

    target, engine = embedded
    prompts = [target.tokenizer.encode(p) for p in PROMPTS]  # type: ignore[attr-defined]
    outs = engine.generate(prompts, SamplingParams(max_new_tokens=MAX_NEW))  # type: ignore[attr-defined]
    return {p: o.token_ids for p, o in zip(PROMPTS, outs, strict=True)}
