"""TargetWorker: holds the KV cache of its requests and verifies drafts.

Concurrent `verify` calls from many requests are batched by Serve into ONE target forward:
the engine's own `verify_round` applies the verification policy to the whole batch, checks
every draft and commits (rolls the KV back past rejected drafts). One verify batch is one
engine step, so the engine's draft gate (confidence policy) observes it and decides whether
the next step drafts; every reply carries that decision to its router. A request served alone
(or whose batches always hold the same requests) therefore gets the embedded engine's
decisions round for round (tests/unit/services/test_fleet_equals_engine.py); under
interleaved batches a router acts on the decision of the last batch its request was in,
which another request's batch may since have revised: one reply late, by design, since
waiting for the replica's latest decision would serialise the routers.

The worker holds each request's `Sequence` as an opaque handle: everything it replies comes
from the engine's `RoundResult`s (tokens, finish reason, next allowance, tapped features)."""

from __future__ import annotations

import asyncio
import threading

from ray import serve

from dspark.engine.build import load_target, make_gate, make_policy, resolve_method
from dspark.engine.engine import Engine, StepStats
from dspark.engine.sequence import Sequence
from dspark.kv.handshake import KVSpec
from dspark.spec.sampling import SamplingParams
from services.config import FleetConfig
from services.workers.base import make_transport, new_peer_id, setup_process
from services.workers.messages import ReceiveReply, StateLost, VerifyCall, VerifyReply, WorkerInfo


class TargetWorker:
    def __init__(self, config: dict, deployment: str = "TargetWorker") -> None:
        setup_process()
        self.cfg = FleetConfig.model_validate(config)
        spec = self.cfg.engine_spec("target")
        self.target = load_target(spec)
        policy, sps = make_policy(spec, self.target)
        self.engine = Engine(self.target.model, self.target.eos_token_ids, None, spec, policy, sps,
                             feature_layers=(), gate=make_gate(spec, sps, resolve_method(spec)))
        self.kv_spec = KVSpec.of_cache(self.engine.cache, self.cfg.model)
        self.deployment, self.peer_id = deployment, new_peer_id(deployment)
        self.transport = make_transport(self.cfg, self.peer_id)
        self.seqs: dict[str, Sequence] = {}
        self._lock = threading.Lock()
        pool = self.cfg.pool("target")
        self._verify_batch.set_max_batch_size(pool.max_batch_size)
        self._verify_batch.set_batch_wait_timeout_s(pool.batch_wait_timeout_s)

    def info(self) -> WorkerInfo:
        return WorkerInfo(self.deployment, self.peer_id, eos_token_ids=self.target.eos_token_ids,
                          max_context=self.engine.max_context, num_free_slots=self.engine.num_free_slots,
                          vocab_size=self.target.config.vocab_size)

    def num_free_slots(self) -> int:
        return self.engine.num_free_slots

    # -- admission: KV from a prefill worker ----------------------------------------------
    async def receive(self, request_id: str, prefill_peer: str, prompt_ids: list[int],
                      params: SamplingParams, committed: list[int] | None = None,
                      feature_layers: tuple[int, ...] = ()) -> ReceiveReply:
        """Import the KV of `prompt_ids` (+ `committed[:-1]` when re-prefilling after a
        failover) streamed by `prefill_peer`; replies how many drafts the first step can use
        and whether it drafts (the gate's decision for this engine's next step)."""
        return await asyncio.to_thread(self._receive, request_id, prefill_peer, prompt_ids, params,
                                       committed, feature_layers)

    def _receive(self, request_id: str, prefill_peer: str, prompt_ids: list[int],
                 params: SamplingParams, committed: list[int] | None,
                 feature_layers: tuple[int, ...]) -> ReceiveReply:
        with self._lock:
            self._free(request_id)  # a retried admission replaces the old state
            seq = self.engine.open_sequence(prompt_ids, params, taps=tuple(feature_layers))
        try:
            # Layers land in this request's own slot while others verify (disjoint rows).
            got = self.transport.recv_kv(prefill_peer, self.kv_spec, lambda i, k, v:
                                         self.engine.import_kv_layer(seq, i, k, v))
            if got.request_id != request_id:
                raise RuntimeError(f"KV for {got.request_id} arrived while expecting {request_id}")
        except BaseException:
            with self._lock:
                self.engine.close_sequence(seq)
            raise
        first = int(got.extras[0][0])
        with self._lock:
            self.engine.imported(seq, got.num_tokens, list(committed) if committed else [first])
            self.seqs[request_id] = seq
            return ReceiveReply(self.engine.max_drafts(seq), self.engine.draft_next)

    # -- one speculative step ---------------------------------------------------------------
    async def verify(self, call: VerifyCall) -> VerifyReply:
        reply = await self._verify_batch(call)
        if isinstance(reply, Exception):
            raise reply
        return reply

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.002)
    async def _verify_batch(self, calls: list[VerifyCall]) -> list[VerifyReply | StateLost]:
        return await asyncio.to_thread(self._verify, calls)

    def _verify(self, calls: list[VerifyCall]) -> list[VerifyReply | StateLost]:
        with self._lock:
            live = [c for c in calls if c.request_id in self.seqs]
            seqs = [self.seqs[c.request_id] for c in live]
            # The step drafted if the router called the drafter for any of its requests; the
            # drafter batches concurrent calls into one pass, so the slowest call is its cost.
            costs = [c.propose_s for c in live if c.propose_s is not None]
            stats = StepStats(proposed=bool(costs), propose_s=max(costs, default=0.0))
            results = self.engine.verify_round(seqs, [c.draft for c in live], stats) if seqs else []
            replies = {call.request_id: VerifyReply(r, len(seqs), stats.verify_s, self.engine.draft_next)
                       for call, r in zip(live, results, strict=True)}
        return [replies.get(c.request_id) or StateLost(f"{self.deployment} holds no request "
                                                       f"{c.request_id}") for c in calls]

    # -- release -----------------------------------------------------------------------------
    def free(self, request_id: str) -> bool:
        with self._lock:
            return self._free(request_id)

    def _free(self, request_id: str) -> bool:
        seq = self.seqs.pop(request_id, None)
        if seq is not None:
            self.engine.close_sequence(seq)
        return seq is not None

