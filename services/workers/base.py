"""What every worker does the same way: thread limits, identity, KV transport."""

from __future__ import annotations

import os
import uuid

import torch

from dspark.kv.transport import ChannelTransport, create_transport
from services.config import FleetConfig


def setup_process() -> None:
    # Replicas share few cores; torch's default thread pool oversubscribes them badly.
    # No global grad switch: the runner already runs under inference_mode, and a global
    # switch would leak into anything else sharing the process (in-process tests, training).
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))


def new_peer_id(deployment: str) -> str:
    """Unique per process, so a restarted replica gets fresh transport pairs."""
    return f"{deployment}-{uuid.uuid4().hex[:8]}"


def make_transport(cfg: FleetConfig, peer_id: str) -> ChannelTransport:
    if cfg.kv_transport == "object_store":
        return create_transport("object_store", peer_id, namespace=cfg.app_name,
                                timeout_s=cfg.kv_timeout_s)
    from services.state.redis_state import FleetState, StateConfig

    if cfg.redis_url is None:
        raise ValueError(f"the {cfg.kv_transport} KV transport needs redis_url for its rendezvous")
    state = FleetState.from_url(cfg.redis_url, StateConfig(namespace=cfg.redis_namespace))
    return create_transport(cfg.kv_transport, peer_id, state, connect_timeout_s=cfg.kv_timeout_s,
                            op_timeout_s=cfg.kv_timeout_s)
