"""Resume and takeover from the Redis token log, on the router's real code with a real
redis-server and no workers at all.

A router that dies right after logging a request's last token leaves a RUNNING request
whose log is already complete. The router that resumes it must see that from the log
(`Router._finished_by_log`): replay from the client's offset, finish with the right reason,
record the finish, and call no worker (a re-prefill would generate tokens past the end).
"""

from __future__ import annotations

import asyncio
import collections
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import tokenizers

from dspark.models.tokenizer import Tokenizer
from dspark.spec.sampling import SamplingParams
from services.config import load_config
from services.metrics import FleetMetrics
from services.router.errors import RouterError
from services.router.loop import Router, StepEvent
from services.router.resume import Continuity
from services.router.validate import RequestSpec
from services.state.redis_state import FleetState, RequestStatus, StateConfig
from services.state.server import RedisServer

pytestmark = pytest.mark.integration
VOCAB = 50
EOS = VOCAB - 1
PROMPT = [3, 4, 5]
MAX_NEW = 8


def word_tokenizer() -> Tokenizer:
    """Token i is the word 'w<i>' (a real `Tokenizer`, so text streaming runs as in the fleet)."""
    vocab = {f"w{i}": i for i in range(VOCAB)}
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="w0"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    return Tokenizer(backend, {}, eos_token_ids=(EOS,))


class NoWorkers:
    """Pools without replicas: a finished log needs no worker, so any call is a bug."""

    names: dict[str, list[str]] = {"prefill": [], "target": [], "drafter": []}
    load: collections.Counter[str] = collections.Counter()

    def client(self, name: str) -> Any:
        raise AssertionError(f"worker {name} called for a request whose log is complete")

    def pick(self, pool: str, avoid: object = ()) -> str:
        raise AssertionError(f"a {pool} replica was picked for a request whose log is complete")


@pytest.fixture
def router(redis_server: RedisServer) -> Iterator[Router]:
    cfg = load_config("deploy/serve/fleet.yaml", redis_url=redis_server.url)
    state = FleetState.from_url(redis_server.url, StateConfig(namespace=f"resume{uuid.uuid4().hex[:8]}"))
    yield Router(cfg, state, NoWorkers(), word_tokenizer(), FleetMetrics(cfg.model, cfg.method),  # type: ignore[arg-type]
                 eos_token_ids=(EOS,))
    state.close()


def logged_request(router: Router, log: list[int], params: SamplingParams, status: RequestStatus,
                   owner_router: str = "dead-router") -> str:
    """A request as its router left it: registered (the real metadata), its tokens logged."""
    rid = f"r-{uuid.uuid4().hex[:8]}"
    meta = {**router._meta(RequestSpec(rid, PROMPT, params)), "router": owner_router}
    router.state.register(rid, meta)
    router.state.set_status(rid, RequestStatus.PREFILLING)
    router.state.set_status(rid, RequestStatus.RUNNING)
    router.state.append_tokens(rid, 0, log)
    if status.terminal:
        router.state.set_status(rid, status, {"finish_reason": "length", "completion_tokens": len(log)})
    return rid


def resume(router: Router, rid: str, offset: int) -> list[StepEvent]:
    async def run() -> list[StepEvent]:
        return [ev async for ev in Continuity(router).resume(rid, offset, "")]
    return asyncio.run(run())


def counter(router: Router, name: str) -> float:
    return router.metrics.registry.get_sample_value(f"dspark:{name}_total", {"model": router.cfg.model}) or 0.0


LOGS = {  # how the log ends -> (log, params, finish reason)
    "length": ([7, 8, 9, 10, 11, 12, 13, 14], SamplingParams(max_new_tokens=MAX_NEW), "length"),
    "eos": ([7, 8, 9, EOS], SamplingParams(max_new_tokens=MAX_NEW), "stop"),
    "stop_token_id": ([7, 8, 21], SamplingParams(max_new_tokens=MAX_NEW, stop_token_ids=(21,)), "stop"),
    "sampled_length": ([9, 9, 30, 2, 5, 6, 7, 8], SamplingParams(temperature=0.8, seed=3, max_new_tokens=MAX_NEW),
                       "length"),
}


@pytest.mark.parametrize("ending", sorted(LOGS))
@pytest.mark.parametrize("offset", [0, 2])
def test_router_died_after_logging_the_last_token(router: Router, ending: str, offset: int) -> None:
    log, params, reason = LOGS[ending]
    rid = logged_request(router, log, params, RequestStatus.RUNNING)
    events = resume(router, rid, offset)
    got, expected_offset = [], offset
    for ev in events:
        assert ev.offset == expected_offset, (ev.offset, expected_offset)
        got += ev.token_ids
        expected_offset += len(ev.token_ids)
    assert got == log[offset:]  # replayed once, nothing generated past the end
    assert events[-1].finish_reason == reason and events[-1].token_ids == []
    assert events[-1].completion_tokens == len(log)
    assert [ev.finish_reason for ev in events[:-1]] == [None] * (len(events) - 1)
    if offset == 0:  # the text the client gets is the log's, once
        assert "".join(ev.text for ev in events) == router.tokenizer.decode(log)
    # This router took the request over (once), and recorded its finish.
    assert router.num_takeovers == 1 and counter(router, "request_takeovers") == 1
    assert counter(router, "request_failovers") == 0
    record = router.state.get(rid)
    assert record.status is RequestStatus.FINISHED and record.meta["router"] == router.router_id
    assert record.meta["finish_reason"] == reason and record.meta["completion_tokens"] == str(len(log))
    assert router.state.read_tokens(rid) == log
    # A later Resume only replays, from any offset: no second takeover.
    for again in (0, len(log) - 1, len(log)):
        replay = resume(router, rid, again)
        assert [t for ev in replay for t in ev.token_ids] == log[again:]
        assert replay[0].offset == again and replay[-1].finish_reason == reason
    assert router.num_takeovers == 1


def test_resume_of_a_finished_request_replays_from_the_offset(router: Router) -> None:
    log = [11, 12, 13, 14, 15]
    rid = logged_request(router, log, SamplingParams(max_new_tokens=5), RequestStatus.FINISHED,
                         owner_router=router.router_id)
    for offset in range(len(log) + 1):
        events = resume(router, rid, offset)
        assert [(ev.offset, ev.token_ids) for ev in events] == [(offset, log[offset:])]
        assert events[-1].finish_reason == "length"
    with pytest.raises(RouterError) as e:
        resume(router, rid, len(log) + 1)
    assert e.value.code == "INVALID_ARGUMENT"
    assert router.num_takeovers == 0 and counter(router, "request_takeovers") == 0
