"""PrefillWorker: runs the target over a prompt, samples the first token, and streams the
prompt's KV layer by layer to the target replica the router chose (the first token rides
along as an extra tensor); a DSpark-style drafter gets the prompt's tapped features."""

from __future__ import annotations

import asyncio
import threading
import time

import torch

from dspark.engine.build import load_target
from dspark.engine.engine import Engine, StepStats
from dspark.kv.handshake import KVSpec
from dspark.kv.transport import TransferMeta
from dspark.spec.sampling import SamplingParams
from services.config import FleetConfig
from services.workers.base import make_transport, new_peer_id, setup_process
from services.workers.messages import PrefillResult, WorkerInfo


class PrefillWorker:
    def __init__(self, config: dict, deployment: str = "PrefillWorker") -> None:
        setup_process()
        self.cfg = FleetConfig.model_validate(config)
        spec = self.cfg.engine_spec("prefill")
        self.target = load_target(spec)
        # A few slots: a slot only lives while its KV is being shipped.
        self.engine = Engine(self.target.model, self.target.eos_token_ids, None,
                             spec.replace(max_batch_size=2))
        self.kv_spec = KVSpec.of_cache(self.engine.cache, self.cfg.model)
        self.info_ = WorkerInfo(deployment, new_peer_id(deployment))
        self.transport = make_transport(self.cfg, self.info_.peer_id)
        self._lock = threading.Lock()  # the engine and its cache are single-threaded

    def info(self) -> WorkerInfo:
        return self.info_

    async def prefill(self, request_id: str, token_ids: list[int], params: SamplingParams,
                      target_peer: str, drafter_peer: str | None = None,
                      feature_layers: tuple[int, ...] = ()) -> PrefillResult:
        # Blocking transport calls run in a thread so the replica keeps serving.
        return await asyncio.to_thread(self._prefill, request_id, token_ids, params, target_peer,
                                       drafter_peer, feature_layers)

    def _prefill(self, request_id: str, token_ids: list[int], params: SamplingParams,
                 target_peer: str, drafter_peer: str | None,
                 feature_layers: tuple[int, ...]) -> PrefillResult:
        with self._lock:
            seq = self.engine.open_sequence(token_ids, params, taps=tuple(feature_layers))
            try:
                t0 = time.perf_counter()
                (first,) = self.engine.prefill([seq], StepStats())
                t1 = time.perf_counter()
                n, layers = self.engine.export_kv(seq)
                meta = TransferMeta(self.kv_spec, request_id, n)
                self.transport.send_kv(target_peer, layers, meta,
                                       [torch.tensor(first.tokens[:1], dtype=torch.int64)])
                if drafter_peer is not None and first.features is not None:
                    self.transport.send_tensors(drafter_peer, request_id, [first.features])
                t2 = time.perf_counter()
            finally:
                self.engine.close_sequence(seq)
        elem = self.kv_spec.dtype.itemsize * self.kv_spec.num_kv_heads * self.kv_spec.head_dim
        reason = None if first.finish_reason is None else first.finish_reason.value
        return PrefillResult(first.tokens[0], reason, n, 2 * self.kv_spec.num_layers * n * elem, t1 - t0,
                             t2 - t1, first.logprobs)
