"""NCCL KV transport: the gloo code path with CUDA tensors. NCCL refuses two ranks of one
communicator on the same GPU, so the round trip needs two devices."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from dspark.kv.handshake import KVSpec
from dspark.kv.rendezvous import InMemoryRendezvous
from dspark.kv.transport import TransferMeta, create_transport

pytestmark = pytest.mark.gpu


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_nccl_round_trip_between_two_gpus() -> None:
    rdv = InMemoryRendezvous()
    sender = create_transport("nccl", "prefill-0", rdv, device="cuda:0", connect_timeout_s=60.0)
    receiver = create_transport("nccl", "target-0", rdv, device="cuda:1", connect_timeout_s=60.0)
    spec = KVSpec("m", 2, 4, 64, torch.bfloat16, 128)
    layers = [(torch.randn(9, 4, 64, device="cuda:0").bfloat16(),) * 2 for _ in range(2)]
    got_layers: list[tuple[torch.Tensor, torch.Tensor]] = []
    with ThreadPoolExecutor(2) as pool:
        r = pool.submit(receiver.recv_kv, "prefill-0", spec,
                        lambda i, k, v: got_layers.append((k, v)))
        pool.submit(sender.send_kv, "target-0", iter(layers), TransferMeta(spec, "r", 9)).result(120)
        r.result(120)
    for (k, v), (gk, gv) in zip(layers, got_layers, strict=True):
        assert gk.device == torch.device("cuda:1") and torch.equal(gk.cpu(), k.cpu())
        assert torch.equal(gv.cpu(), v.cpu())
    sender.close()
    receiver.close()
