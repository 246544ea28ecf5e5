"""One request's life in the router, as an explicit state machine.

    ADMITTED --prefilled--> PREFILLED --first_token_committed--> RUNNING --finished--> FINISHED
    RUNNING --step_committed--> RUNNING             (a drafted or plain round, verified)
    RUNNING --target_lost--> RECOVERING --recovered--> RUNNING   (re-prefill from the log)
    ADMITTED --taken_over--> RECOVERING             (its router died: continue from the log)
    ADMITTED --log_ended, finished--> FINISHED      (taken over, but the log already ended)
    any live phase --failed | cancelled--> FAILED | CANCELLED

The drafter is optional, so it has a sub-state of its own:

    NONE --drafter_placed--> ATTACHED --drafter_lost--> FALLBACK --drafter_attached--> ATTACHED
    any --workers_released--> NONE                  (re-admission places a drafter again)

In FALLBACK the rounds are plain (no draft) and a background attach is tried now and then.
Every transition checks the state it leaves and raises `IllegalTransition` otherwise; the
router calls them and never assigns a field. `phases` and `drafter_states` list the states
entered, in order. Each phase has the Redis `RequestStatus` the router records for it.
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import Sequence
from typing import Any

from dspark.engine.stop import TextStream
from dspark.spec.proposer import take_features
from services.router.validate import RequestSpec
from services.state.redis_state import RequestStatus
from services.workers.messages import PrefillResult, VerifyReply, WorkerInfo


class IllegalTransition(RuntimeError):
    """A transition the request's current state does not allow (a router bug)."""


class Phase(enum.Enum):
    ADMITTED = "admitted"  # registered; admission (prefill, KV hand-off) under way
    PREFILLED = "prefilled"  # admitted; the prefill's first token awaits its commit
    RUNNING = "running"  # drafting and verifying rounds
    RECOVERING = "recovering"  # re-prefilling prompt + logged tokens on healthy replicas
    FINISHED = "finished"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in (Phase.FINISHED, Phase.FAILED, Phase.CANCELLED)

    @property
    def status(self) -> RequestStatus:
        """What the registry in Redis says while the request is in this phase."""
        return _STATUS[self]


_STATUS = {Phase.ADMITTED: RequestStatus.PREFILLING, Phase.PREFILLED: RequestStatus.RUNNING,
           Phase.RUNNING: RequestStatus.RUNNING, Phase.RECOVERING: RequestStatus.PREFILLING,
           Phase.FINISHED: RequestStatus.FINISHED, Phase.FAILED: RequestStatus.FAILED,
           Phase.CANCELLED: RequestStatus.CANCELLED}
_PLACING = (Phase.ADMITTED, Phase.RECOVERING)  # phases in which admission places workers


class DrafterState(enum.Enum):
    NONE = "none"  # no drafter placed: before admission, or released for a re-admission
    ATTACHED = "attached"  # a drafter replica holds the request's draft state
    FALLBACK = "fallback"  # the drafter failed: plain rounds, a re-attach pending


class Request:
    """A request the router drives: its spec, committed tokens, the replicas it is pinned to
    and the target's latest draft decision. Read its fields; change them by transitions."""

    def __init__(self, spec: RequestSpec, text: TextStream, committed: Sequence[int] = ()) -> None:
        self.spec = spec
        self.text = text  # committed tokens -> client text, cut at the first stop string
        self.committed: list[int] = list(committed)  # what the token log holds
        self.first: PrefillResult | None = None  # the prefill's answer, until its token is committed
        self.finish_reason: str | None = None  # set by the commit that ends the output
        self.num_forwards = 0  # target forwards after the prefill
        self.phase = Phase.ADMITTED
        self.phases: list[Phase] = [Phase.ADMITTED]
        # Placement: the replicas holding the request, and ones to avoid (recently failed).
        self.target = ""
        self.avoid: set[str] = set()
        self.max_drafts = 0
        self.draft_next = True  # the target's draft gate: whether the next round drafts
        # The drafter.
        self.drafter = ""
        self.drafter_state = DrafterState.NONE
        self.drafter_states: list[DrafterState] = [DrafterState.NONE]
        self.drafter_info: WorkerInfo | None = None  # the last drafter's health answer; kept after
        # a loss: a method that reads target features cannot take a replacement mid-request
        self.retry_at = 0.0  # FALLBACK: monotonic time of the next attach attempt
        self.attach: asyncio.Task | None = None  # FALLBACK: a background attach under way
        # Tapped target features of committed positions not yet handed to the drafter: every
        # verify adds its positions', the next drafted round takes them all.
        self.features: list[Any] = []

    @property
    def request_id(self) -> str:
        return self.spec.request_id

    @property
    def generating(self) -> bool:
        """Rounds still to run: RUNNING, and no commit has ended the output."""
        return self.phase is Phase.RUNNING and self.finish_reason is None

    def outcome(self) -> tuple[RequestStatus, str]:
        """The final status and finish reason to record (a request that never reached a
        terminal phase, e.g. interrupted by a BaseException, ends FAILED)."""
        if self.phase is Phase.FINISHED:
            return RequestStatus.FINISHED, self.finish_reason or "stop"
        if self.phase is Phase.CANCELLED:
            return RequestStatus.CANCELLED, "abort"
        return RequestStatus.FAILED, "error"

    def _require(self, transition: str, *phases: Phase) -> None:
        if self.phase not in phases:
            raise IllegalTransition(f"request {self.request_id}: {transition} in phase {self.phase.value} "
                                    f"(allowed in {', '.join(p.value for p in phases)})")

    def _enter(self, phase: Phase) -> None:
        self.phase = phase
        self.phases.append(phase)

    # -- phases --------------------------------------------------------------------------------
    def prefilled(self, first: PrefillResult) -> None:
        """The admission's prefill answered; its first token is committed next."""
        self._require("prefilled", Phase.ADMITTED)
        self.first = first
        self._enter(Phase.PREFILLED)

    def first_token_committed(self, tokens: Sequence[int], finish_reason: str | None) -> None:
        """The prefill's token (none if a stop string cut it) is in the log."""
        self._require("first_token_committed", Phase.PREFILLED)
        self.first, self.committed, self.finish_reason = None, list(tokens), finish_reason
        self._enter(Phase.RUNNING)

    def step_committed(self, tokens: Sequence[int], finish_reason: str | None) -> None:
        """A verified round's tokens are in the log (one more target forward)."""
        self._require("step_committed", Phase.RUNNING)
        if self.finish_reason is not None:
            raise IllegalTransition(f"request {self.request_id}: step_committed after its output "
                                    f"ended ({self.finish_reason})")
        self.committed += tokens
        self.num_forwards += 1
        self.finish_reason = finish_reason

    def log_ended(self, reason: str) -> None:
        """Taken over with a log that already holds a finished output (its router died
        after logging the last token but before recording the finish)."""
        self._require("log_ended", Phase.ADMITTED)
        if not self.committed:
            raise IllegalTransition(f"request {self.request_id}: log_ended with an empty log")
        self.finish_reason = reason

    def taken_over(self) -> None:
        """Continued here after its router died: re-prefill from the log."""
        self._require("taken_over", Phase.ADMITTED)
        if not self.committed or self.finish_reason is not None:
            raise IllegalTransition(f"request {self.request_id}: taken_over needs an unfinished log")
        self._enter(Phase.RECOVERING)

    def target_lost(self) -> None:
        """Its target replica failed mid-stream: avoid it and re-prefill from the log."""
        self._require("target_lost", Phase.RUNNING)
        self.avoid = {self.target}
        self._enter(Phase.RECOVERING)

    def restarted_from_log(self, committed: Sequence[int]) -> None:
        """The log, not local memory, says what the client has been sent."""
        self._require("restarted_from_log", Phase.RECOVERING)
        self.committed, self.features = list(committed), []

    def recovered(self) -> None:
        """Re-admitted on healthy replicas with the logged tokens."""
        self._require("recovered", Phase.RECOVERING)
        self._enter(Phase.RUNNING)

    def finished(self) -> None:
        """The output ended (its reason recorded by the last commit, or by the log)."""
        self._require("finished", Phase.RUNNING, Phase.ADMITTED)
        if self.finish_reason is None:
            raise IllegalTransition(f"request {self.request_id}: finished without a finish reason")
        self._enter(Phase.FINISHED)

    def failed(self) -> None:
        self._require("failed", *_LIVE)
        self._enter(Phase.FAILED)

    def cancelled(self) -> None:
        self._require("cancelled", *_LIVE)
        self._enter(Phase.CANCELLED)

    # -- placement -----------------------------------------------------------------------------
    def target_placed(self, name: str) -> None:
        self._require("target_placed", *_PLACING)
        if self.target:
            raise IllegalTransition(f"request {self.request_id}: target_placed while on {self.target}")
        self.target = name

    def target_ready(self, max_drafts: int, draft_next: bool) -> None:
        """The target took the request (admission): its draft allowance and gate decision."""
        self._require("target_ready", *_PLACING)
        self._allow(max_drafts, draft_next)

    def verified(self, reply: VerifyReply) -> None:
        """A verify answered: the next round's draft allowance and gate decision, and the
        round's tapped features, kept for the drafter."""
        self._require("verified", Phase.RUNNING)
        self._allow(reply.round.max_drafts, reply.draft_next)
        if self.drafter and reply.round.features is not None:
            self.features.append(reply.round.features)

    def _allow(self, max_drafts: int, draft_next: bool) -> None:
        block = self.spec.block_size  # the request's own block size caps the drafts
        self.max_drafts = max_drafts if block is None else min(max_drafts, block)
        self.draft_next = draft_next

    def workers_released(self) -> list[str]:
        """Its replicas are being freed (before a re-admission, or at the end): stops a
        background attach and returns the names to release."""
        if self.attach is not None:
            self.attach.cancel()
            self.attach = None
        names = [n for n in (self.target, self.drafter) if n]
        self.target = self.drafter = ""
        self._drafter_enter(DrafterState.NONE)
        return names

    # -- the drafter ---------------------------------------------------------------------------
    def _require_drafter(self, transition: str, state: DrafterState) -> None:
        if self.drafter_state is not state or self.phase.terminal:
            raise IllegalTransition(f"request {self.request_id}: {transition} with drafter "
                                    f"{self.drafter_state.value} in phase {self.phase.value}")

    def _drafter_enter(self, state: DrafterState) -> None:
        if state is not self.drafter_state:
            self.drafter_state = state
            self.drafter_states.append(state)

    def drafter_placed(self, name: str) -> None:
        """Admission pinned a drafter replica (before asking its health)."""
        self._require("drafter_placed", *_PLACING)
        self._require_drafter("drafter_placed", DrafterState.NONE)
        self.drafter = name
        self._drafter_enter(DrafterState.ATTACHED)

    def drafter_answered(self, info: WorkerInfo) -> None:
        self._require_drafter("drafter_answered", DrafterState.ATTACHED)
        self.drafter_info = info

    def drafter_lost(self, retry_at: float) -> str:
        """The drafter failed: plain rounds from now on, an attach tried from `retry_at`.
        Returns the dropped replica (to avoid, and to free in the background)."""
        self._require_drafter("drafter_lost", DrafterState.ATTACHED)
        name, self.drafter, self.features = self.drafter, "", []
        self.avoid, self.retry_at = {name}, retry_at
        self._drafter_enter(DrafterState.FALLBACK)
        return name

    def attach_started(self, task: asyncio.Task) -> None:
        self._require_drafter("attach_started", DrafterState.FALLBACK)
        if self.attach is not None:
            raise IllegalTransition(f"request {self.request_id}: attach_started while one runs")
        self.attach = task

    def drafter_attached(self, name: str, info: WorkerInfo) -> None:
        """A replacement drafter took the request: drafted rounds again."""
        self._require_drafter("drafter_attached", DrafterState.FALLBACK)
        self.drafter, self.drafter_info, self.avoid = name, info, set()
        self._drafter_enter(DrafterState.ATTACHED)

    def drafter_refused(self, info: WorkerInfo) -> None:
        """The drafter answering reads target features: it cannot join mid-request, so the
        request stays in fallback (and stops trying)."""
        self._require_drafter("drafter_refused", DrafterState.FALLBACK)
        self.drafter_info = info

    def attach_failed(self, retry_at: float) -> None:
        self._require_drafter("attach_failed", DrafterState.FALLBACK)
        self.retry_at = retry_at

    def attach_ended(self) -> None:
        self.attach = None

    def take_features(self) -> Any:
        """The pending features as one tensor for the drafter (None if none); empties them."""
        return take_features(self.features)


_LIVE = tuple(p for p in Phase if not p.terminal)
