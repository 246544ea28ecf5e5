"""The router's per-request state machine (`services.router.request`): every legal transition
moves the request as documented, every other one raises `IllegalTransition`, and each phase
maps to the Redis status the router records for it. No Ray, no Redis, no workers."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from dspark.engine.engine import RoundResult
from dspark.engine.sequence import FinishReason
from dspark.spec.sampling import SamplingParams
from services.router.request import DrafterState, IllegalTransition, Phase, Request
from services.router.validate import RequestSpec
from services.state.redis_state import RequestStatus
from services.workers.messages import PrefillResult, VerifyReply, WorkerInfo

A, F, N = DrafterState.ATTACHED, DrafterState.FALLBACK, DrafterState.NONE


class Text:
    """Stands in for the stop-string detokenizer (the state machine only carries it)."""


def request(committed: list[int] | None = None, block_size: int | None = None) -> Request:
    spec = RequestSpec("r1", [1, 2, 3], SamplingParams(max_new_tokens=8), block_size=block_size)
    return Request(spec, Text(), committed or [])  # type: ignore[arg-type]


def prefill_result(token: int = 7) -> PrefillResult:
    return PrefillResult(token, None, 3, 0, 0.0, 0.0)


def reply(tokens: list[int], max_drafts: int = 4, draft_next: bool = True, features: object = None,
          finish: str | None = None) -> VerifyReply:
    reason = None if finish is None else FinishReason(finish)
    return VerifyReply(RoundResult(tokens, 0, 0, reason, None, max_drafts, features),  # type: ignore[arg-type]
                       1, 0.0, draft_next=draft_next)


def admitted(drafter: bool = True) -> Request:
    """ADMITTED, placed on T0 (and D0), the target's answer in."""
    req = request()
    req.target_placed("T0")
    if drafter:
        req.drafter_placed("D0")
        req.drafter_answered(WorkerInfo("D0", "D0"))
    req.target_ready(4, True)
    return req


def running(drafter: bool = True) -> Request:
    req = admitted(drafter)
    req.prefilled(prefill_result())
    req.first_token_committed([7], None)
    return req


def test_a_request_starts_admitted_with_no_drafter() -> None:
    req = request()
    assert req.phase is Phase.ADMITTED and req.phases == [Phase.ADMITTED]
    assert req.drafter_state is N and not req.generating


def test_the_undisturbed_path() -> None:
    req = admitted()
    pres = prefill_result(7)
    req.prefilled(pres)
    assert req.phase is Phase.PREFILLED and req.first is pres
    req.first_token_committed([7], None)
    assert req.phase is Phase.RUNNING and req.first is None and req.committed == [7] and req.generating
    req.verified(reply([8, 9]))
    req.step_committed([8, 9], None)
    req.step_committed([10], "length")
    assert req.committed == [7, 8, 9, 10] and req.num_forwards == 2 and not req.generating
    req.finished()
    assert req.phases == [Phase.ADMITTED, Phase.PREFILLED, Phase.RUNNING, Phase.FINISHED]
    assert req.outcome() == (RequestStatus.FINISHED, "length")


def test_a_first_token_that_ends_the_output() -> None:
    req = admitted()
    req.prefilled(prefill_result())
    req.first_token_committed([], "stop")  # a stop string cut it
    assert req.phase is Phase.RUNNING and not req.generating
    req.finished()
    assert req.outcome() == (RequestStatus.FINISHED, "stop")


def test_target_lost_recovers_from_the_log() -> None:
    req = running()
    req.step_committed([8], None)
    req.target_lost()
    assert req.phase is Phase.RECOVERING and req.avoid == {"T0"} and not req.generating
    assert req.workers_released() == ["T0", "D0"] and req.target == req.drafter == ""
    req.features.append("stale")
    req.restarted_from_log([7, 8])
    assert req.committed == [7, 8] and req.features == []
    req.target_placed("T1")
    req.drafter_placed("D0")
    req.target_ready(4, False)
    req.recovered()
    assert req.phase is Phase.RUNNING and req.draft_next is False and req.generating
    assert req.phases == [Phase.ADMITTED, Phase.PREFILLED, Phase.RUNNING, Phase.RECOVERING, Phase.RUNNING]
    assert req.drafter_states == [N, A, N, A]


def test_a_takeover_recovers_from_the_log() -> None:
    req = request([7, 8])
    req.taken_over()
    assert req.phase is Phase.RECOVERING
    req.restarted_from_log([7, 8, 9])
    req.target_placed("T0")
    req.recovered()
    req.step_committed([10], "length")
    req.finished()
    assert req.phases == [Phase.ADMITTED, Phase.RECOVERING, Phase.RUNNING, Phase.FINISHED]


def test_a_takeover_of_an_ended_log_finishes_at_once() -> None:
    req = request([7, 8])
    req.log_ended("length")
    assert req.phase is Phase.ADMITTED and not req.generating
    req.finished()
    assert req.phases == [Phase.ADMITTED, Phase.FINISHED] and req.outcome() == (RequestStatus.FINISHED, "length")


@pytest.mark.parametrize("make", [request, admitted, lambda: _prefilled(), running, lambda: _recovering()])
@pytest.mark.parametrize("end", ["failed", "cancelled"])
def test_every_live_phase_can_fail_or_be_cancelled(make: Callable[[], Request], end: str) -> None:
    req = make()
    getattr(req, end)()
    assert req.phase is (Phase.FAILED if end == "failed" else Phase.CANCELLED)
    status = RequestStatus.FAILED if end == "failed" else RequestStatus.CANCELLED
    assert req.outcome() == (status, "error" if end == "failed" else "abort")


def _prefilled() -> Request:
    req = admitted()
    req.prefilled(prefill_result())
    return req


def _recovering() -> Request:
    req = running()
    req.target_lost()
    return req


def test_a_request_interrupted_before_a_terminal_phase_records_failed() -> None:
    assert running().outcome() == (RequestStatus.FAILED, "error")


def test_each_phase_has_its_redis_status() -> None:
    assert {p: p.status for p in Phase} == {
        Phase.ADMITTED: RequestStatus.PREFILLING, Phase.PREFILLED: RequestStatus.RUNNING,
        Phase.RUNNING: RequestStatus.RUNNING, Phase.RECOVERING: RequestStatus.PREFILLING,
        Phase.FINISHED: RequestStatus.FINISHED, Phase.FAILED: RequestStatus.FAILED,
        Phase.CANCELLED: RequestStatus.CANCELLED}
    assert [p for p in Phase if p.terminal] == [Phase.FINISHED, Phase.FAILED, Phase.CANCELLED]


def test_the_block_size_caps_the_targets_draft_allowance() -> None:
    req = request(block_size=2)
    req.target_placed("T0")
    req.target_ready(4, True)
    assert req.max_drafts == 2
    req.prefilled(prefill_result())
    req.first_token_committed([7], None)
    req.verified(reply([8], max_drafts=1, draft_next=False))
    assert (req.max_drafts, req.draft_next) == (1, False)


def test_verified_features_wait_for_the_drafter_only_while_one_is_attached() -> None:
    req = running()
    req.verified(reply([8], features="f1"))
    req.verified(reply([9], features="f2"))
    assert req.features == ["f1", "f2"]
    req.drafter_lost(retry_at=5.0)
    assert req.features == []
    req.verified(reply([10], features="f3"))
    assert req.features == []  # plain rounds: nobody to hand them to


# -- the drafter sub-state ---------------------------------------------------------------------

def test_drafter_lost_falls_back_then_reattaches() -> None:
    req = running()
    assert req.drafter_lost(retry_at=12.5) == "D0"
    assert req.drafter_state is F and req.drafter == "" and req.avoid == {"D0"} and req.retry_at == 12.5
    req.attach_failed(retry_at=14.0)
    assert req.drafter_state is F and req.retry_at == 14.0
    info = WorkerInfo("D1", "D1")
    req.drafter_attached("D1", info)
    assert req.drafter_state is A and req.drafter == "D1" and req.drafter_info is info and req.avoid == set()
    assert req.drafter_states == [N, A, F, A]


def test_a_feature_reading_drafter_is_refused_and_the_request_stays_in_fallback() -> None:
    req = running()
    req.drafter_lost(retry_at=0.0)
    info = WorkerInfo("D1", "D1", feature_layers=(1, 2))
    req.drafter_refused(info)
    assert req.drafter_state is F and req.drafter_info is info and req.drafter == ""


def test_a_background_attach_is_cancelled_when_the_workers_are_released() -> None:
    async def go() -> None:
        req = running()
        req.drafter_lost(retry_at=0.0)
        task = asyncio.ensure_future(asyncio.sleep(10))
        req.attach_started(task)
        with pytest.raises(IllegalTransition):
            req.attach_started(task)  # one attach at a time
        assert req.workers_released() == ["T0"]
        await asyncio.sleep(0)
        assert task.cancelled() and req.attach is None and req.drafter_state is N
    asyncio.run(go())


def test_admission_without_an_answering_drafter() -> None:
    req = request()
    req.target_placed("T0")
    req.drafter_placed("D0")
    assert req.drafter_lost(retry_at=1.0) == "D0"  # no health answer: plain decoding from the start
    req.target_ready(4, True)
    req.prefilled(prefill_result())
    assert req.drafter_states == [N, A, F]


# -- illegal transitions -----------------------------------------------------------------------

def finished() -> Request:
    req = running()
    req.step_committed([8], "length")
    req.finished()
    return req


@pytest.mark.parametrize(("make", "transition"), [
    (finished, lambda r: r.step_committed([9], None)),  # committing tokens after FINISHED
    (finished, lambda r: r.failed()),
    (finished, lambda r: r.cancelled()),
    (finished, lambda r: r.target_lost()),
    (finished, lambda r: r.finished()),
    (finished, lambda r: r.drafter_lost(0.0)),  # no drafter transitions once the request ended
    (running, lambda r: r.drafter_attached("D1", WorkerInfo("D1", "D1"))),  # one is attached
    (running, lambda r: r.drafter_placed("D1")),
    (running, lambda r: r.attach_failed(0.0)),
    (running, lambda r: r.prefilled(prefill_result())),
    (running, lambda r: r.first_token_committed([8], None)),
    (running, lambda r: r.recovered()),
    (running, lambda r: r.restarted_from_log([7])),
    (running, lambda r: r.taken_over()),
    (running, lambda r: r.target_placed("T1")),  # placement only while (re-)admitting
    (running, lambda r: r.target_ready(4, True)),
    (running, lambda r: r.finished()),  # no finish reason yet
    (request, lambda r: r.first_token_committed([7], None)),  # before the prefill answered
    (request, lambda r: r.step_committed([7], None)),
    (request, lambda r: r.verified(reply([7]))),
    (request, lambda r: r.target_lost()),
    (request, lambda r: r.taken_over()),  # nothing logged to continue from
    (request, lambda r: r.log_ended("length")),
    (request, lambda r: r.finished()),
    (request, lambda r: r.drafter_lost(0.0)),  # no drafter placed
    (request, lambda r: r.drafter_answered(WorkerInfo("D0", "D0"))),
    (admitted, lambda r: r.target_placed("T1")),  # already on T0
    (admitted, lambda r: r.drafter_placed("D1")),  # already on D0
    (_prefilled, lambda r: r.prefilled(prefill_result())),
    (_prefilled, lambda r: r.step_committed([8], None)),
    (_recovering, lambda r: r.target_lost()),
    (_recovering, lambda r: r.verified(reply([8]))),
    (lambda: request([7]), lambda r: r.log_ended("length") or r.taken_over()),  # the log already ended
])
def test_illegal_transitions_raise(make: Callable[[], Request], transition: Callable[[Request], object]) -> None:
    req = make()
    with pytest.raises(IllegalTransition):
        transition(req)


def test_a_step_after_the_output_ended_raises() -> None:
    req = running()
    req.step_committed([8], "stop")
    with pytest.raises(IllegalTransition, match="after its output ended"):
        req.step_committed([9], None)


def test_an_illegal_transition_leaves_the_state_as_it_was() -> None:
    req = finished()
    before = (req.phase, list(req.phases), list(req.committed), req.drafter_state)
    with pytest.raises(IllegalTransition):
        req.step_committed([9], None)
    assert (req.phase, req.phases, req.committed, req.drafter_state) == before
