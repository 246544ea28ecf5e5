"""DrafterWorker: holds a proposer from the library's registry and drafts for many requests
at once (Serve batches concurrent `propose` calls into one `Proposer.propose`)."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import threading

import torch
from ray import serve

from dspark.engine.build import load_target, make_proposer, resolve_method
from dspark.spec.proposer import Draft, DraftRequest, take_features
from dspark.spec.sampling import SamplingParams, make_generator
from services.config import FleetConfig
from services.workers.base import make_transport, new_peer_id, setup_process
from services.workers.messages import ProposeCall, StateLost, WorkerInfo


@dataclasses.dataclass
class _Request:
    seq_id: int
    params: SamplingParams
    generator: torch.Generator | None
    pending_features: list[torch.Tensor] = dataclasses.field(default_factory=list)


class DrafterWorker:
    def __init__(self, config: dict, deployment: str = "DrafterWorker") -> None:
        setup_process()
        self.cfg = FleetConfig.model_validate(config)
        spec = self.cfg.engine_spec("drafter")
        target = load_target(spec) if self.cfg.pool("drafter").load_target else None
        self.proposer = make_proposer(spec, target, resolve_method(spec))
        layers = tuple(self.proposer.feature_layers) if self.proposer is not None else ()
        self.info_ = WorkerInfo(deployment, new_peer_id(deployment), feature_layers=layers,
                                has_proposer=self.proposer is not None)
        # Only drafters that read target features receive tensors from prefill workers.
        self.transport = make_transport(self.cfg, self.info_.peer_id) if layers else None
        self.requests: dict[str, _Request] = {}
        self._ids = itertools.count()
        self._lock = threading.Lock()
        pool = self.cfg.pool("drafter")
        self._propose_batch.set_max_batch_size(pool.max_batch_size)
        self._propose_batch.set_batch_wait_timeout_s(pool.batch_wait_timeout_s)

    def info(self) -> WorkerInfo:
        return self.info_

    async def start(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                    prefill_peer: str | None = None) -> None:
        """Begin drafting for a request; with `prefill_peer`, first receive the prompt's
        tapped features that the prefill worker streams here."""
        await asyncio.to_thread(self._start, request_id, prompt_ids, params, prefill_peer)

    def _start(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
               prefill_peer: str | None) -> None:
        features = []
        if prefill_peer is not None and self.transport is not None:
            got = self.transport.recv_tensors(prefill_peer)
            if got.request_id != request_id:
                raise RuntimeError(f"features for {got.request_id} arrived while expecting {request_id}")
            features = list(got.extras)
        with self._lock:
            self._finish(request_id)
            req = _Request(next(self._ids), params, make_generator(params.seed), features)
            self.requests[request_id] = req
            if self.proposer is not None:
                self.proposer.start(req.seq_id, prompt_ids)

    async def propose(self, call: ProposeCall) -> Draft:
        draft = await self._propose_batch(call)
        if isinstance(draft, Exception):
            raise draft
        return draft

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.002)
    async def _propose_batch(self, calls: list[ProposeCall]) -> list[Draft | StateLost]:
        return await asyncio.to_thread(self._propose, calls)

    def _propose(self, calls: list[ProposeCall]) -> list[Draft | StateLost]:
        with self._lock:
            live = [c for c in calls if c.request_id in self.requests]
            requests = []
            for c in live:
                req = self.requests[c.request_id]
                if c.new_features is not None:
                    req.pending_features.append(c.new_features)
                requests.append(DraftRequest(req.seq_id, c.token_ids, c.max_tokens, req.params,
                                             take_features(req.pending_features), req.generator))
            if self.proposer is None:
                drafts = [Draft([]) for _ in requests]
            else:
                drafts = self.proposer.propose(requests) if requests else []
        by_id = {c.request_id: d for c, d in zip(live, drafts, strict=True)}
        return [by_id.get(c.request_id) or StateLost(f"{self.info_.deployment} holds no request "
                                                     f"{c.request_id}") for c in calls]

    def finish(self, request_id: str) -> bool:
        with self._lock:
            return self._finish(request_id)

    def _finish(self, request_id: str) -> bool:
        req = self.requests.pop(request_id, None)
        if req is not None and self.proposer is not None:
            self.proposer.finish(req.seq_id)
        return req is not None

    def num_requests(self) -> int:
        return len(self.requests)
