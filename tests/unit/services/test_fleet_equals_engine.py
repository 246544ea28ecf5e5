"""The fleet decodes exactly as the embedded engine: same tokens, same draft-gate decisions.

No Ray: the real `Router` (and a real redis-server for its token log) drives the real
prefill, target and drafter worker classes in this process through `InProcessWorkerClient`s;
KV and features travel over an in-memory channel. The embedded engine is built from the
same `EngineConfig` (`FleetConfig.engine_spec`) and shares the target's weights.

The draft gate decides from measured drafting times; here every drafting pass is weighed at
a fixed cost (`FixedCostGate`) against a fixed SPS profile, so its decisions depend only on
the tokens and cannot flake.
"""

from __future__ import annotations

import asyncio
import collections
import queue
import threading
import uuid
from collections.abc import Iterator, Sequence
from typing import Any

import pytest
import torch

from dspark.engine import build, profile
from dspark.engine.config import EngineConfig
from dspark.kv.transport import ChannelTransport
from dspark.spec import gate as gate_mod
from dspark.spec.gate import DraftGate
from dspark.spec.proposer import DraftRequest
from dspark.spec.sampling import SamplingParams
from dspark.spec.scheduler import StepCostProfile
from services.config import FleetConfig, load_config
from services.metrics import FleetMetrics
from services.router.loop import Router, StepEvent
from services.router.pools import WorkerPools
from services.router.validate import RequestSpec
from services.state.redis_state import FleetState, StateConfig
from services.state.server import RedisServer
from services.workers import drafter, prefill, target
from services.workers.client import InProcessWorkerClient

MODEL = "smollm2-135m-instruct"
MAX_NEW = 16
GREEDY = SamplingParams(max_new_tokens=MAX_NEW)
PROMPTS = ["Name three primary colors.", "Write a python function that adds two numbers."]
# Verification slows with the batch; a drafting pass costs half a one-token step. A round
# drafts at a profit only when it emits about 2 tokens or more: the gate both drafts and skips.
SPS = StepCostProfile.from_points({1: 20.0, 8: 16.0, 16: 10.0})
PROPOSE_S = 0.025


class FixedCostGate(DraftGate):
    """The real gate, every drafting pass weighed at PROPOSE_S; records its decisions."""

    def __init__(self, sps: StepCostProfile) -> None:
        super().__init__(sps)
        self.decisions: list[bool] = []

    def should_draft(self) -> bool:
        self.decisions.append(super().should_draft())
        return self.decisions[-1]

    def observe(self, num_seqs: int, emitted: int, propose_s: float, verify_tokens: int) -> None:
        super().observe(num_seqs, emitted, PROPOSE_S, verify_tokens)


class ScriptedGate(FixedCostGate):
    """Skips the first `skips` rounds, then drafts every round."""

    def __init__(self, sps: StepCostProfile, skips: int) -> None:
        super().__init__(sps)
        self.skips = skips

    def should_draft(self) -> bool:
        self.decisions.append(len(self.decisions) >= self.skips)
        return self.decisions[-1]


class QueueHub:
    """In-memory pipes between the workers' transports: (sender, receiver) -> two queues."""

    def __init__(self) -> None:
        self.pipes: dict[tuple[str, str], tuple[queue.Queue, queue.Queue]] = {}
        self.lock = threading.Lock()

    def pipe(self, sender: str, receiver: str) -> tuple[queue.Queue, queue.Queue]:
        with self.lock:
            return self.pipes.setdefault((sender, receiver), (queue.Queue(), queue.Queue()))


class QueueChannel:
    def __init__(self, out: queue.Queue, into: queue.Queue) -> None:
        self.out, self.into = out, into

    def send(self, tensor: torch.Tensor) -> None:
        self.out.put(tensor.clone())

    def recv(self, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        tensor = self.into.get(timeout=60)
        assert tuple(tensor.shape) == tuple(shape) and tensor.dtype == dtype
        return tensor

    def close(self) -> None:
        pass


class QueueConnector:
    backend = "queue"

    def __init__(self, self_id: str, hub: QueueHub) -> None:
        self.self_id, self.hub = self_id, hub

    def connect(self, peer: str, role: str) -> QueueChannel:
        if role == "send":
            forward, back = self.hub.pipe(self.self_id, peer)
            return QueueChannel(forward, back)
        forward, back = self.hub.pipe(peer, self.self_id)
        return QueueChannel(back, forward)

    def close(self) -> None:
        pass


class Pools(WorkerPools):
    """The real replica choice over in-process clients, no Serve."""

    def __init__(self, workers: dict[str, tuple[str, Any]]) -> None:
        self.clients = {name: InProcessWorkerClient(name, role, w) for name, (role, w) in workers.items()}
        self.names = {pool: [n for n, (role, _) in workers.items() if role == pool]
                      for pool in ("prefill", "target", "drafter")}
        self.load = collections.Counter()
        self._send_locks = collections.defaultdict(asyncio.Lock)


class Fleet:
    """One fleet (method, policy) in this process, and the embedded engine's spec for it."""

    def __init__(self, cfg: FleetConfig, state: FleetState) -> None:
        data = cfg.model_dump(mode="json")
        self.prefill = prefill.PrefillWorker(data, "PrefillWorker")
        self.target = target.TargetWorker(data, "TargetWorker")
        self.drafter = drafter.DrafterWorker(data, "DrafterWorker")
        self.router = Router(cfg, state, Pools({"PrefillWorker": ("prefill", self.prefill),
                                                "TargetWorker": ("target", self.target),
                                                "DrafterWorker": ("drafter", self.drafter)}),
                             self.target.target.tokenizer, FleetMetrics(cfg.model, cfg.method),
                             eos_token_ids=self.target.target.eos_token_ids)
        self.spec = cfg.engine_spec("target")
        self.handed: list[tuple[int, int]] = []  # per drafter call: (feature rows it has had, its context)
        self._watch_features()

    def _watch_features(self) -> None:
        """Record, at every drafting pass of a feature-reading drafter, how many feature rows
        it has been handed for the request (the prefill's come with the first pass) against
        the positions its context must cover (every committed token but the anchor)."""
        proposer = self.drafter.proposer
        if proposer is None or not self.drafter.info().feature_layers:
            return
        rows: collections.Counter[int] = collections.Counter()
        propose = proposer.propose

        def watched(requests: list[DraftRequest]) -> Any:
            for r in requests:
                rows[r.seq_id] += 0 if r.new_features is None else len(r.new_features)
                self.handed.append((rows[r.seq_id], len(r.token_ids) - 1))
            return propose(requests)

        proposer.propose = watched  # type: ignore[method-assign]

    def generate(self, prompt_ids: list[int], params: SamplingParams = GREEDY) -> list[StepEvent]:
        async def go() -> list[StepEvent]:
            spec = RequestSpec(f"r-{uuid.uuid4().hex[:8]}", prompt_ids, params)
            return [ev async for ev in self.router.generate(spec)]
        return asyncio.run(go())

    def close(self) -> None:
        for w in (self.prefill, self.target, self.drafter):
            if w.transport is not None:
                w.transport.close()


@pytest.fixture(scope="module")
def shared_target() -> Any:
    return build.load_target(EngineConfig(model=MODEL, dtype="float32", device="cpu"))


@pytest.fixture
def make_fleet(redis_server: RedisServer, shared_target: Any,
               monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """`make_fleet(method, policy, gate=FixedCostGate)`: a fleet whose workers share the
    target's weights and the fixed SPS profile; the embedded engine built from its spec
    gets the same kind of gate."""
    hub = QueueHub()

    def transport(cfg: FleetConfig, peer_id: str) -> ChannelTransport:
        return ChannelTransport(QueueConnector(peer_id, hub))

    for module in (prefill, target, drafter):
        monkeypatch.setattr(module, "load_target", lambda spec: shared_target)
        monkeypatch.setattr(module, "make_transport", transport)
    monkeypatch.setattr(profile, "load_or_profile", lambda *args, **kwargs: SPS)
    state = FleetState.from_url(redis_server.url, StateConfig(namespace=f"equal{uuid.uuid4().hex[:8]}"))
    fleets: list[Fleet] = []

    def make(method: str, policy: str, gate: Any = FixedCostGate) -> Fleet:
        monkeypatch.setattr(gate_mod, "DraftGate", gate)
        data = load_config("deploy/serve/fleet.yaml", model=MODEL, redis_url=redis_server.url).model_dump(mode="json")
        data.update(method=method, verify_policy=policy, max_seq_len=256, drafter_timeout_s=120.0)
        for pool in ("prefill", "target", "drafter"):
            data["pools"][pool]["max_batch_size"] = 2
        data["pools"]["drafter"]["load_target"] = method == "dspark"
        fleets.append(Fleet(FleetConfig.model_validate(data), state))
        return fleets[-1]

    yield make
    for f in fleets:
        f.close()
    state.close()


def prompt_ids(fleet: Fleet, prompt: str) -> list[int]:
    return fleet.target.target.tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                                             add_generation_prompt=True)


def tokens_of(events: list[StepEvent]) -> list[int]:
    return [t for ev in events for t in ev.token_ids]


def embedded_rounds(engine: Any, ids: list[int]) -> tuple[list[int], list[int]]:
    """The embedded engine's tokens and its drafts verified per round, one request."""
    seq_id = engine.add_request(ids, GREEDY)
    drafted = []
    while engine.has_work:
        drafted.append(engine.step().drafted)
    return engine.pop_finished(seq_id).token_ids, drafted


@pytest.mark.parametrize("policy", ["fixed", "confidence"])
@pytest.mark.parametrize("method", ["ar", "ngram", "dspark"])
def test_fleet_greedy_tokens_and_rounds_equal_the_embedded_engine(make_fleet: Any, shared_target: Any,
                                                                  method: str, policy: str) -> None:
    fleet = make_fleet(method, policy)
    _, engine, _ = build.build_engine(fleet.spec, target=shared_target)
    for prompt in PROMPTS:
        ids = prompt_ids(fleet, prompt)
        events = fleet.generate(ids)
        tokens, drafted = embedded_rounds(engine, ids)
        assert tokens_of(events) == tokens, prompt
        # The first event is the prefill's token; every later one is a round.
        assert [ev.drafted for ev in events[1:]] == drafted, prompt
    gated = policy == "confidence" and method != "ar"
    assert (fleet.target.engine.gate is not None) == (engine.gate is not None) == gated
    if gated:
        # The same gate decisions, round by round, over both requests (the first request's
        # last decision is the second's first round, in both).
        assert fleet.target.engine.gate.decisions == engine.gate.decisions
    assert all(have == need for have, need in fleet.handed), fleet.handed
    assert fleet.target.num_free_slots() == fleet.target.engine.cache.num_slots
    assert fleet.drafter.num_requests() == 0


def test_gate_decisions_mix_drafted_and_skipped_rounds(make_fleet: Any) -> None:
    """The fixed costs above make the gate do both on these prompts (else the equality of
    decisions above would say little)."""
    fleet = make_fleet("ngram", "confidence")
    for prompt in PROMPTS:
        fleet.generate(prompt_ids(fleet, prompt))
    decisions = fleet.target.engine.gate.decisions
    assert True in decisions and False in decisions, decisions


def test_a_gate_that_skips_never_calls_the_drafter_and_the_output_is_ar(make_fleet: Any, shared_target: Any,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    fleet = make_fleet("dspark", "confidence", gate=lambda sps: ScriptedGate(sps, skips=10**6))
    calls: list[Any] = []
    propose = fleet.drafter._propose
    monkeypatch.setattr(fleet.drafter, "_propose", lambda batch: calls.append(batch) or propose(batch))
    _, ar, _ = build.build_engine(EngineConfig(model=MODEL, method="ar", max_seq_len=256), target=shared_target)
    for prompt in PROMPTS:
        ids = prompt_ids(fleet, prompt)
        events = fleet.generate(ids)
        assert tokens_of(events) == ar.generate([ids], GREEDY)[0].token_ids
        assert all(ev.drafted == 0 for ev in events)
    assert calls == []
    assert fleet.router.metrics.registry.get_sample_value(
        "dspark:spec_decode_fallback_total", {"model": MODEL, "method": "dspark"}) in (None, 0.0)


def test_features_of_skipped_rounds_all_reach_the_drafter(make_fleet: Any, shared_target: Any) -> None:
    """Six plain rounds, then drafting: the first drafting pass gets the features of every
    position committed meanwhile (the router keeps them all, not just the last round's)."""
    fleet = make_fleet("dspark", "confidence", gate=lambda sps: ScriptedGate(sps, skips=6))
    _, ar, _ = build.build_engine(EngineConfig(model=MODEL, method="ar", max_seq_len=256), target=shared_target)
    ids = prompt_ids(fleet, PROMPTS[0])
    events = fleet.generate(ids)
    assert tokens_of(events) == ar.generate([ids], GREEDY)[0].token_ids
    assert [ev.drafted for ev in events[1:7]] == [0] * 6
    assert fleet.handed, "the drafter never drafted"
    have, need = fleet.handed[0]
    assert need == len(ids) + 6  # the prompt, the first token and 6 plain rounds' tokens, less the anchor
    assert all(have == need for have, need in fleet.handed), fleet.handed


def test_log_probs_of_every_round_reach_the_client_as_embedded(make_fleet: Any, shared_target: Any) -> None:
    """The target worker replies each round's tokens and their log-probs from the engine's
    `RoundResult`s: the client gets one per token, as the embedded engine reports them."""
    fleet = make_fleet("ngram", "fixed")
    _, engine, _ = build.build_engine(fleet.spec, target=shared_target)
    ids = prompt_ids(fleet, PROMPTS[1])
    params = SamplingParams(max_new_tokens=MAX_NEW, logprobs=2)
    events = fleet.generate(ids, params)
    ref = engine.generate([ids], params)[0]
    got = [lp for ev in events for lp in ev.logprobs]
    assert [lp.token_id for lp in got] == tokens_of(events) == ref.token_ids
    assert [lp.logprob for lp in got] == pytest.approx([lp.logprob for lp in ref.logprobs], abs=1e-4)
    assert [[t for t, _ in lp.top] for lp in got] == [[t for t, _ in lp.top] for lp in ref.logprobs]
