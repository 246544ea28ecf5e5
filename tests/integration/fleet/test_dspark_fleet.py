"""The fleet with method `dspark` (a drafter that reads the target's tapped features):
greedy output through gRPC equals the embedded engine's, and the usage reports drafts
being accepted.

No second Ray fleet: the three worker classes run in this process behind
`InProcessWorkerClient`s, and everything else is the production path: the gRPC front and the router's
per-request loop (`RouterServer`, `Router`), Redis state, and the gloo KV transport
carrying the prompt's KV prefill -> target and its features prefill -> drafter; the
features of committed positions then go target -> router -> drafter every step. Only
Ray Serve (deployments, `@serve.batch`) is left out; the Serve-wired fleet itself is
covered by the ngram tests in this directory."""

from __future__ import annotations

import asyncio
import collections
import shutil
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from dspark.v1 import generation_pb2 as pb
from tests.integration.fleet.helpers import collect, stub

pytestmark = pytest.mark.integration

MODEL = "smollm2-135m-instruct"
MAX_NEW = 24
# Eval-style chat prompts (gsm8k, mbpp, mt-bench).
PROMPTS = [
    "Janet's ducks lay 16 eggs per day. She eats three for breakfast every morning and bakes muffins "
    "for her friends every day with four. She sells the remainder at the farmers' market daily for $2 "
    "per fresh duck egg. How much in dollars does she make every day at the farmers' market?\n"
    "Please reason step by step, and put your final answer within \\boxed{}.",
    "Write a python function to remove first and last occurrence of a given character from the string.",
    "Compose an engaging travel blog post about a recent trip to Hawaii, highlighting cultural "
    "experiences and must-see attractions.",
]


@pytest.fixture(scope="module")
def dspark_fleet() -> Iterator[Any]:
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server not installed (make system-deps)")
    from dspark.engine import build
    from services.app import WORKER_CLASSES
    from services.config import FleetConfig, load_config
    from services.metrics import FleetMetrics
    from services.router import server as server_mod
    from services.router.pools import WorkerPools
    from services.state.redis_state import FleetState, StateConfig
    from services.state.server import RedisServer
    from services.workers import drafter, prefill, target
    from services.workers.client import InProcessWorkerClient

    torch.set_num_threads(1)
    loaded: dict[tuple, Any] = {}

    def shared_target(spec: Any) -> Any:  # one copy of the weights for every worker
        key = (spec.model, spec.dtype, spec.device)
        if key not in loaded:
            loaded[key] = build.load_target(spec)
        return loaded[key]

    workers: dict[str, Any] = {}

    class InProcessPools(WorkerPools):
        def __init__(self, cfg: Any) -> None:  # no Serve: clients onto the local workers
            self.names = {pool: cfg.deployment_names(pool) for pool in WORKER_CLASSES}
            self.clients = {name: InProcessWorkerClient(name, pool, workers[name])
                            for pool, names in self.names.items() for name in names}
            self.load = collections.Counter()
            self._send_locks = collections.defaultdict(asyncio.Lock)

    redis = RedisServer().start()
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="router", daemon=True)
    thread.start()
    server = None

    def run(coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, loop).result(timeout=600)

    with pytest.MonkeyPatch.context() as mp:
        for module in (prefill, target, drafter):
            mp.setattr(module, "load_target", shared_target)
        mp.setattr(server_mod, "WorkerPools", InProcessPools)
        try:
            data = load_config("deploy/serve/fleet.yaml", model=MODEL, redis_url=redis.url).model_dump(mode="json")
            data["method"] = "dspark"
            data["pools"]["drafter"]["load_target"] = True  # dspark drafts from the target's features
            cfg = FleetConfig.model_validate(data)
            for pool, cls in WORKER_CLASSES.items():
                for name in cfg.deployment_names(pool):
                    workers[name] = cls(cfg.model_dump(mode="json"), name)
            state = FleetState.from_url(cfg.redis_url, StateConfig(namespace=cfg.redis_namespace))
            server = server_mod.RouterServer(cfg, state, FleetMetrics(cfg.model, cfg.method))
            grpc_port, _ = run(server.start("127.0.0.1", 0, 0))

            class Fleet:
                ports = {"grpc": grpc_port}
                target = loaded[next(iter(loaded))]

            Fleet.workers = workers  # type: ignore[attr-defined]
            yield Fleet
        finally:
            if server is not None:
                run(server.stop())
            for w in workers.values():
                if getattr(w, "transport", None) is not None:
                    w.transport.close()
            loop.call_soon_threadsafe(loop.stop)
            thread.join(10)
            redis.stop()


def _chat(prompt: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt}]


def test_dspark_fleet_greedy_equals_embedded(dspark_fleet):
    from dspark.engine.build import build_engine
    from dspark.engine.config import EngineConfig
    from dspark.spec.sampling import SamplingParams

    assert dspark_fleet.workers["DrafterWorker"].info().feature_layers, "dspark reads target features"
    s = stub(dspark_fleet)
    fleet: dict[str, tuple[list[int], Any]] = {}
    for prompt in PROMPTS:
        msgs = pb.ChatMessages(messages=[pb.ChatMessage(role="user", content=prompt)])
        ids, events = collect(s.Generate(pb.GenerateRequest(
            messages=msgs, sampling=pb.SamplingOptions(temperature=0, max_new_tokens=MAX_NEW)), timeout=300))
        fleet[prompt] = ids, events

    # The embedded engine, same model and method (the weights are shared, not re-read).
    target, engine, method = build_engine(EngineConfig(model=MODEL, method="dspark"), target=dspark_fleet.target)
    assert method == "dspark"
    for prompt in PROMPTS:
        ids, events = fleet[prompt]
        prompt_ids = target.tokenizer.apply_chat_template(_chat(prompt), add_generation_prompt=True)
        ref = engine.generate([prompt_ids], SamplingParams(max_new_tokens=MAX_NEW))[0]
        assert ids == ref.token_ids, prompt
        usage = events[-1].usage
        assert usage.completion_tokens == len(ids) == MAX_NEW
        assert usage.mean_accepted_length > 1.0
        assert usage.mean_accepted_length == pytest.approx(ref.mean_accepted_length, rel=1e-5)
    # Every request freed its KV slot and its drafter state.
    assert dspark_fleet.workers["TargetWorker"].num_free_slots() == \
        dspark_fleet.workers["TargetWorker"].engine.cache.num_slots
    assert dspark_fleet.workers["DrafterWorker"].num_requests() == 0
