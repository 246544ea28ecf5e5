"""The router's recovery transitions, without Ray: the real `Router` (and a real redis-server
for its token log) against scripted in-process workers behind the `WorkerClient` protocol.

The scripted workers share one deterministic toy "model" (`next_token`), so every run,
whatever fails on the way, must produce exactly `reference(prompt)`: a lost or repeated
token after a failover shows up as a mismatch. Faults are injected per worker: a dead
replica raises `ConnectionError` (what the router treats like a dead Ray actor) and loses
the requests it held.

Each test also checks the phases the request went through (`services.router.request`): the
fixture records every `Request` the router creates.
"""

from __future__ import annotations

import asyncio
import collections
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import tokenizers

from dspark.engine.engine import RoundResult
from dspark.engine.sequence import FinishReason
from dspark.models.tokenizer import Tokenizer
from dspark.spec.proposer import Draft
from dspark.spec.sampling import SamplingParams
from services.config import load_config
from services.metrics import FleetMetrics
from services.router import drafter_link
from services.router import loop as loop_mod
from services.router.loop import Router, StepEvent
from services.router.pools import WorkerPools
from services.router.request import DrafterState, Phase, Request
from services.router.validate import RequestSpec
from services.state.redis_state import FleetState, RequestStatus, StateConfig
from services.state.server import RedisServer
from services.workers.client import WorkerClient
from services.workers.messages import (
    PrefillCall,
    PrefillResult,
    ProposeCall,
    ReceiveCall,
    ReceiveReply,
    StartCall,
    StateLost,
    VerifyCall,
    VerifyReply,
    WorkerInfo,
)

ADMITTED, PREFILLED, RUNNING, RECOVERING = Phase.ADMITTED, Phase.PREFILLED, Phase.RUNNING, Phase.RECOVERING
NONE, ATTACHED, FALLBACK = DrafterState.NONE, DrafterState.ATTACHED, DrafterState.FALLBACK
VOCAB = 50
EOS = VOCAB - 1
K = 4
PROMPT = [3, 4, 5]
MAX_NEW = 30


def next_token(context: list[int]) -> int:
    """The toy target's greedy token after `context` (never EOS)."""
    return (context[-1] * 7 + len(context)) % (VOCAB - 2) + 1


def reference(prompt: list[int], n: int = MAX_NEW) -> list[int]:
    ctx = list(prompt)
    for _ in range(n):
        ctx.append(next_token(ctx))
    return ctx[len(prompt):]


def word_tokenizer() -> Tokenizer:
    vocab = {f"w{i}": i for i in range(VOCAB)}
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="w0"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    return Tokenizer(backend, {}, eos_token_ids=(EOS,))


class Scripted:
    """Common to the scripted workers: a name, a role, the calls seen, and death."""

    def __init__(self, name: str, role: str) -> None:
        self.name, self.role = name, role
        self.calls: list[str] = []
        self.dead = False
        self.fail_next = 0  # the next this-many calls raise ConnectionError (then it is back)

    def enter(self, method: str) -> None:
        self.calls.append(method)
        if self.fail_next > 0:
            self.fail_next -= 1
            raise ConnectionError(f"{self.name} unreachable")
        if self.dead:
            raise ConnectionError(f"{self.name} died")

    async def health(self) -> WorkerInfo:
        self.enter("health")
        return WorkerInfo(self.name, self.name, eos_token_ids=(EOS,), max_context=1024, num_free_slots=8,
                          vocab_size=VOCAB)

    async def release(self, request_id: str) -> bool:
        self.enter("release")
        return self.held.pop(request_id, None) is not None  # type: ignore[attr-defined]


class Prefill(Scripted):
    def __init__(self, name: str) -> None:
        super().__init__(name, "prefill")
        self.held: dict = {}
        self.failing_prefills = 0  # the next this-many prefill calls fail mid-transfer

    async def prefill(self, call: PrefillCall) -> PrefillResult:
        self.enter("prefill")
        if self.failing_prefills > 0:
            self.failing_prefills -= 1
            raise ConnectionError(f"{self.name}: KV transfer broke")
        return PrefillResult(next_token(call.token_ids), None, len(call.token_ids), 0, 0.0, 0.0)


class Target(Scripted):
    """Holds each request's committed context; verifies greedily against `next_token`."""

    def __init__(self, name: str) -> None:
        super().__init__(name, "target")
        self.held: dict[str, tuple[list[int], list[int], SamplingParams]] = {}  # id -> (prompt, output, params)
        self.received: list[ReceiveCall] = []
        self.die_at_verify: int | None = None  # this verify call (1-based) kills the replica

    def kill(self) -> None:
        self.dead, self.held = True, {}

    async def receive(self, call: ReceiveCall) -> ReceiveReply:
        self.enter("receive")
        self.received.append(call)
        output = list(call.committed) if call.committed else [next_token(call.prompt_ids)]
        self.held[call.request_id] = (list(call.prompt_ids), output, call.params)
        return ReceiveReply(K)

    async def verify(self, call: VerifyCall) -> VerifyReply:
        self.enter("verify")
        if self.die_at_verify is not None and self.calls.count("verify") == self.die_at_verify:
            self.kill()
            raise ConnectionError(f"{self.name} died mid-stream")
        if call.request_id not in self.held:
            raise StateLost(f"{self.name} holds no request {call.request_id}")
        prompt, output, params = self.held[call.request_id]
        ctx, tokens, accepted = prompt + output, [], 0
        for tok in call.draft.tokens:
            if tok != next_token(ctx + tokens):
                break
            tokens.append(tok)
            accepted += 1
        tokens.append(next_token(ctx + tokens))
        room = params.max_new_tokens - len(output)
        tokens = tokens[:room]
        output += tokens
        done = len(output) >= params.max_new_tokens
        result = RoundResult(tokens, len(call.draft.tokens), min(accepted, len(tokens)),
                             FinishReason.LENGTH if done else None, None, 0 if done else K)
        return VerifyReply(result, 1, 0.0)


class Drafter(Scripted):
    """A token-only drafter (no target features, so it may re-attach mid-request): the
    toy model's next K tokens, the last one deliberately wrong."""

    def __init__(self, name: str) -> None:
        super().__init__(name, "drafter")
        self.held: dict[str, bool] = {}
        self.die_at_draft: int | None = None
        self.down_for = 0  # after dying: calls that still fail before it is back (a restart)

    async def health(self) -> WorkerInfo:
        info = await super().health()
        return WorkerInfo(info.deployment, info.peer_id, feature_layers=(), has_proposer=True)

    def enter(self, method: str) -> None:
        if self.dead and self.down_for == 0:
            self.dead = False  # restarted, with no state
        elif self.dead:
            self.down_for -= 1
        super().enter(method)

    async def start(self, call: StartCall) -> None:
        self.enter("start")
        self.held[call.request_id] = True

    async def draft(self, call: ProposeCall) -> Draft:
        self.enter("draft")
        if self.die_at_draft is not None and self.calls.count("draft") == self.die_at_draft:
            self.dead, self.held = True, {}
            raise ConnectionError(f"{self.name} died")
        if call.request_id not in self.held:
            raise StateLost(f"{self.name} holds no request {call.request_id}")
        ctx, tokens = list(call.token_ids), []
        for _ in range(call.max_tokens):
            tokens.append(next_token(ctx + tokens))
        if tokens:
            tokens[-1] = (tokens[-1] % (VOCAB - 2)) + 1  # wrong: never equal to the model's token
        return Draft(tokens)


class Pools(WorkerPools):
    """The real replica choice (`pick`, load, send locks) over scripted clients, no Serve."""

    def __init__(self, clients: list[Any]) -> None:
        self.clients: dict[str, WorkerClient] = {c.name: c for c in clients}
        self.names = {pool: [c.name for c in clients if c.role == pool] for pool in ("prefill", "target", "drafter")}
        self.load = collections.Counter()
        self._send_locks = collections.defaultdict(asyncio.Lock)


class Fleet:
    def __init__(self, redis_url: str) -> None:
        self.prefill = Prefill("P0")
        self.targets = [Target("T0"), Target("T1")]
        self.drafter = Drafter("D0")
        self.cfg = load_config("deploy/serve/fleet.yaml", redis_url=redis_url).model_copy(
            update={"block_size": K, "recovery_timeout_s": 20.0})
        self.state = FleetState.from_url(redis_url, StateConfig(namespace=f"recovery{uuid.uuid4().hex[:8]}"))
        self.router = Router(self.cfg, self.state, Pools([self.prefill, *self.targets, self.drafter]),
                             word_tokenizer(), FleetMetrics(self.cfg.model, self.cfg.method), eos_token_ids=(EOS,))
        self.requests: list[Request] = []  # every request the router created, by the fixture

    def spec(self, max_new: int = MAX_NEW) -> RequestSpec:
        return RequestSpec(f"r-{uuid.uuid4().hex[:8]}", PROMPT, SamplingParams(max_new_tokens=max_new))

    def counter(self, name: str, **labels: str) -> float:
        value = self.router.metrics.registry.get_sample_value(f"dspark:{name}_total",
                                                              {"model": self.cfg.model, **labels})
        return value or 0.0

    def held(self) -> int:
        return sum(len(t.held) for t in self.targets) + len(self.drafter.held)


@pytest.fixture
def fleet(redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch) -> Iterator[Fleet]:
    monkeypatch.setattr(drafter_link, "DRAFTER_RETRY_S", 0.0)  # try a drafter again every step
    f = Fleet(redis_server.url)

    class Recorded(Request):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            f.requests.append(self)

    monkeypatch.setattr(loop_mod, "Request", Recorded)
    yield f
    f.state.close()


def run(fleet: Fleet, spec: RequestSpec) -> list[StepEvent]:
    async def go() -> list[StepEvent]:
        events = [ev async for ev in fleet.router.generate(spec)]
        await asyncio.sleep(0)  # let background releases run
        return events
    return asyncio.run(go())


def tokens_of(events: list[StepEvent]) -> list[int]:
    """The client's view; offsets must be contiguous (no gap, no duplicate)."""
    out: list[int] = []
    for ev in events:
        assert ev.offset == len(out), (ev.offset, len(out))
        out += ev.token_ids
    return out


def test_an_undisturbed_request_speculates_and_frees_everything(fleet: Fleet) -> None:
    spec = fleet.spec()
    events = run(fleet, spec)
    assert tokens_of(events) == reference(PROMPT)
    assert events[-1].finish_reason == "length"
    assert sum(ev.accepted for ev in events) > 0 and all(ev.drafted > 0 for ev in events[1:])
    assert fleet.held() == 0
    assert fleet.state.get(spec.request_id).status is RequestStatus.FINISHED
    assert fleet.state.read_tokens(spec.request_id) == reference(PROMPT)
    (req,) = fleet.requests
    assert req.phases == [ADMITTED, PREFILLED, RUNNING, Phase.FINISHED]
    assert req.drafter_states == [NONE, ATTACHED, NONE]  # NONE: released at the end


def test_drafter_lost_runs_plain_rounds_then_reattaches(fleet: Fleet) -> None:
    fleet.drafter.die_at_draft, fleet.drafter.down_for = 3, 3
    events = run(fleet, fleet.spec())
    assert tokens_of(events) == reference(PROMPT)
    drafted = [ev.drafted for ev in events[1:]]
    lost = drafted.index(0)  # the round whose drafter died ran as a plain target step
    assert lost == 2 and all(d > 0 for d in drafted[:lost])
    assert any(d > 0 for d in drafted[lost + 1:]), f"never re-attached: {drafted}"
    back = next(i for i in range(lost, len(drafted)) if drafted[i] > 0)
    assert all(d == 0 for d in drafted[lost:back])
    assert fleet.counter("spec_decode_fallback", method=fleet.cfg.method) == back - lost
    assert fleet.drafter.calls.count("start") == 2  # admission, then the re-attach
    assert fleet.counter("request_failovers") == 0  # a drafter loss is not a failover
    assert fleet.held() == 0
    (req,) = fleet.requests
    assert req.phases == [ADMITTED, PREFILLED, RUNNING, Phase.FINISHED]
    assert req.drafter_states == [NONE, ATTACHED, FALLBACK, ATTACHED, NONE]


def test_target_lost_mid_stream_resumes_from_the_log(fleet: Fleet) -> None:
    t0, t1 = fleet.targets
    t0.die_at_verify = 4
    spec = fleet.spec()
    events = run(fleet, spec)
    assert tokens_of(events) == reference(PROMPT)  # no token lost or repeated
    assert fleet.counter("request_failovers") == 1
    # The healthy replica got the logged tokens: exactly what had been streamed before the loss.
    (resumed,) = t1.received
    streamed = tokens_of(events)[: len(resumed.committed or [])]
    assert resumed.committed == streamed and len(streamed) > 1
    assert fleet.prefill.calls.count("prefill") == 2
    assert fleet.state.read_tokens(spec.request_id) == reference(PROMPT)
    assert fleet.held() == 0
    (req,) = fleet.requests
    assert req.phases == [ADMITTED, PREFILLED, RUNNING, RECOVERING, RUNNING, Phase.FINISHED]
    assert req.drafter_states == [NONE, ATTACHED, NONE, ATTACHED, NONE]  # re-admitted with a drafter


def test_a_prefill_failure_frees_the_admission_and_is_retried(fleet: Fleet) -> None:
    fleet.prefill.failing_prefills = 1  # the target and the drafter took the request; the prefill broke
    events = run(fleet, fleet.spec())
    assert tokens_of(events) == reference(PROMPT)
    assert fleet.prefill.calls.count("prefill") == 2
    target = fleet.targets[0]
    receives = [i for i, call in enumerate(target.calls) if call == "receive"]
    assert len(receives) == 2 and receives[0] < target.calls.index("release") < receives[1]  # freed, then again
    assert fleet.drafter.calls.count("start") == 2
    assert fleet.held() == 0
    (req,) = fleet.requests
    assert req.phases == [ADMITTED, PREFILLED, RUNNING, Phase.FINISHED]  # the retry stays within ADMITTED
    assert req.drafter_states == [NONE, ATTACHED, NONE, ATTACHED, NONE]


def test_a_request_that_cannot_be_admitted_fails_and_frees_its_slot(fleet: Fleet) -> None:
    from services.router.errors import RouterError

    fleet.prefill.dead = True
    fleet.cfg = fleet.router.cfg = fleet.cfg.model_copy(update={"recovery_timeout_s": 0.2})
    spec = fleet.spec()
    with pytest.raises(RouterError):
        run(fleet, spec)
    assert fleet.held() == 0
    assert fleet.state.get(spec.request_id).status is RequestStatus.FAILED
    (req,) = fleet.requests
    assert req.phases == [ADMITTED, Phase.FAILED]


def test_client_cancel_frees_the_slot(fleet: Fleet) -> None:
    spec = fleet.spec()

    async def go() -> list[StepEvent]:
        stream = fleet.router.generate(spec)
        got = [await anext(stream), await anext(stream)]
        assert fleet.held() == 2  # mid-stream: a target slot and the drafter's state
        await stream.aclose()  # the client went away: by the time aclose returns ...
        assert fleet.held() == 0  # ... the slot and the drafter state are freed
        assert fleet.state.get(spec.request_id).status is RequestStatus.CANCELLED
        assert fleet.router.in_flight == 0
        return got

    got = asyncio.run(go())
    assert tokens_of(got) == reference(PROMPT)[: len(tokens_of(got))]
    (req,) = fleet.requests
    assert req.phases == [ADMITTED, PREFILLED, RUNNING, Phase.CANCELLED]
