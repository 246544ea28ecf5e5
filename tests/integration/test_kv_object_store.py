"""The Ray object-store fallback transport (one test: a local Ray costs seconds)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from dspark.kv.cache import KVCache
from dspark.kv.handshake import KVHandshakeError, KVSpec
from dspark.kv.transport import TransferMeta, create_transport

pytestmark = pytest.mark.integration


def test_object_store_round_trip_and_handshake(monkeypatch: pytest.MonkeyPatch) -> None:
    ray = pytest.importorskip("ray")
    monkeypatch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # keep Ray on 127.0.0.1
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=1, include_dashboard=False, object_store_memory=256 * 2**20,
                 log_to_driver=False)
    try:
        src = KVCache(3, num_slots=1, max_len=16, num_kv_heads=2, head_dim=4, dtype=torch.bfloat16)
        slot = src.allocate()
        for layer in range(3):
            src.k[layer][slot, :6] = torch.randn(6, 2, 4).bfloat16()
            src.v[layer][slot, :6] = torch.randn(6, 2, 4).bfloat16()
        src.set_length(slot, 6)
        spec = KVSpec.of_cache(src, "m")
        sender = create_transport("object_store", "prefill-0", namespace="t", timeout_s=60.0)
        receiver = create_transport("object_store", "target-0", namespace="t", timeout_s=60.0)
        layers: list[tuple[int, torch.Tensor, torch.Tensor]] = []
        features = torch.randn(6, 2, 8)
        with ThreadPoolExecutor(2) as pool:
            r = pool.submit(receiver.recv_kv, "prefill-0", spec,
                            lambda i, k, v: layers.append((i, k, v)))
            pool.submit(sender.send_kv, "target-0", src.export_layers(slot),
                        TransferMeta(spec, "req", 6), [features]).result(timeout=120)
            got = r.result(timeout=120)
        assert [i for i, _, _ in layers] == [0, 1, 2] and torch.equal(got.extras[0], features)
        for i, k, v in layers:
            assert torch.equal(k, src.k[i][slot, :6]) and torch.equal(v, src.v[i][slot, :6])

        wrong = KVSpec("other-model", 3, 2, 4, torch.bfloat16, 16)
        with ThreadPoolExecutor(2) as pool:
            r = pool.submit(receiver.recv_kv, "prefill-0", wrong, lambda i, k, v: None)
            s = pool.submit(sender.send_kv, "target-0", src.export_layers(slot),
                            TransferMeta(spec, "req2", 6))
            with pytest.raises(KVHandshakeError, match="model_id"):
                s.result(timeout=120)
            with pytest.raises(KVHandshakeError):
                r.result(timeout=120)
    finally:
        if started:
            ray.shutdown()
