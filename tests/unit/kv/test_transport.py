"""KV transport over gloo between two threads of this process (fast); the cross-process
and peer-death cases live in tests/integration/test_kv_gloo.py."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import torch

from dspark.kv.cache import KVCache
from dspark.kv.dist_channel import TransportUnavailable
from dspark.kv.handshake import KVHandshakeError, KVSpec
from dspark.kv.rendezvous import InMemoryRendezvous
from dspark.kv.transport import (
    ChannelTransport,
    PeerLost,
    TransferFailed,
    TransferMeta,
    create_transport,
)

MODEL = "tiny-llama"


@pytest.fixture
def pair() -> Iterator[tuple[ChannelTransport, ChannelTransport]]:
    rdv = InMemoryRendezvous()
    opts: dict[str, Any] = {"connect_timeout_s": 10.0, "op_timeout_s": 10.0}
    sender = create_transport("gloo", "prefill-0", rdv, **opts)
    receiver = create_transport("gloo", "target-0", rdv, **opts)
    yield sender, receiver
    sender.close()
    receiver.close()


def filled_cache(dtype: torch.dtype, n: int = 5, num_layers: int = 3) -> tuple[KVCache, int]:
    cache = KVCache(num_layers, num_slots=2, max_len=16, num_kv_heads=2, head_dim=4, dtype=dtype)
    slot = cache.allocate()
    gen = torch.Generator().manual_seed(0)
    for layer in range(num_layers):
        cache.k[layer][slot, :n] = torch.randn(n, 2, 4, generator=gen).to(dtype)
        cache.v[layer][slot, :n] = torch.randn(n, 2, 4, generator=gen).to(dtype)
    cache.set_length(slot, n)
    return cache, slot


def both(send: Callable[[], Any], recv: Callable[[], Any]) -> tuple[Any, Any]:
    with ThreadPoolExecutor(2) as pool:
        r = pool.submit(recv)
        s = pool.submit(send)
        return s.result(timeout=30), r.result(timeout=30)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_round_trip_bit_exact_streamed_in_order(pair: tuple[ChannelTransport, ChannelTransport],
                                                dtype: torch.dtype) -> None:
    sender, receiver = pair
    src, src_slot = filled_cache(dtype)
    dst = KVCache(3, num_slots=1, max_len=16, num_kv_heads=2, head_dim=4, dtype=dtype)
    dst_slot = dst.allocate()
    features = torch.randn(5, 2, 8)  # (n, m, d) drafter context features
    spec = KVSpec.of_cache(src, MODEL)
    seen: list[int] = []

    def on_layer(i: int, k: torch.Tensor, v: torch.Tensor) -> None:
        seen.append(i)
        dst.import_layer(dst_slot, i, k, v)

    meta = TransferMeta(spec, "req-1", 5)
    for _ in range(2):  # second transfer reuses the cached pair
        seen.clear()
        _, got = both(lambda: sender.send_kv("target-0", src.export_layers(src_slot), meta, [features]),
                      lambda: receiver.recv_kv("prefill-0", KVSpec.of_cache(dst, MODEL), on_layer))
        assert seen == [0, 1, 2]
        assert got.request_id == "req-1" and got.num_tokens == 5 and got.spec == spec
        assert torch.equal(got.extras[0], features)
        dst.set_length(dst_slot, got.num_tokens)
        for layer in range(3):
            assert torch.equal(dst.k[layer][dst_slot, :5], src.k[layer][src_slot, :5])
            assert torch.equal(dst.v[layer][dst_slot, :5], src.v[layer][src_slot, :5])


@pytest.mark.parametrize("change, words", [
    ({"model_id": "other"}, "model_id"),
    ({"dtype": torch.bfloat16}, "dtype"),
    ({"num_kv_heads": 4}, "num_kv_heads"),
    ({"max_len": 3}, "exceed our max_len"),
    ({"protocol_version": 99}, "protocol_version"),
])
def test_handshake_rejects_incompatible_peer(pair: tuple[ChannelTransport, ChannelTransport],
                                             change: dict[str, Any], words: str) -> None:
    sender, receiver = pair
    src, slot = filled_cache(torch.float32)
    spec = KVSpec.of_cache(src, MODEL)
    expected = dataclasses.replace(spec, **change)
    calls: list[int] = []
    with ThreadPoolExecutor(2) as pool:
        r = pool.submit(receiver.recv_kv, "prefill-0", expected, lambda i, k, v: calls.append(i))
        s = pool.submit(sender.send_kv, "target-0", src.export_layers(slot),
                        TransferMeta(spec, "req", 5))
        with pytest.raises(KVHandshakeError, match=words):
            r.result(timeout=30)
        with pytest.raises(KVHandshakeError, match=f"refused.*{words}"):
            s.result(timeout=30)
    assert calls == []
    # The pair stays usable after a refusal.
    _, got = both(lambda: sender.send_tensors("target-0", "req-2", [torch.arange(3)]),
                  lambda: receiver.recv_tensors("prefill-0"))
    assert got.request_id == "req-2" and torch.equal(got.extras[0], torch.arange(3))


def test_receiver_callback_error_reaches_sender(pair: tuple[ChannelTransport, ChannelTransport]) -> None:
    sender, receiver = pair
    src, slot = filled_cache(torch.float32)
    spec = KVSpec.of_cache(src, MODEL)

    def bad(i: int, k: torch.Tensor, v: torch.Tensor) -> None:
        if i == 1:
            raise ValueError("no room")

    with ThreadPoolExecutor(2) as pool:
        r = pool.submit(receiver.recv_kv, "prefill-0", spec, bad)
        s = pool.submit(sender.send_kv, "target-0", src.export_layers(slot), TransferMeta(spec, "q", 5))
        with pytest.raises(ValueError, match="no room"):
            r.result(timeout=30)
        with pytest.raises(TransferFailed, match="no room"):
            s.result(timeout=30)
    # The stream was drained, so the next transfer is in sync.
    _, got = both(lambda: sender.send_tensors("target-0", "next", [torch.ones(2)]),
                  lambda: receiver.recv_tensors("prefill-0"))
    assert got.request_id == "next"


def test_wrong_layer_shape_is_refused_by_sender(pair: tuple[ChannelTransport, ChannelTransport]) -> None:
    sender, receiver = pair
    src, slot = filled_cache(torch.float32)
    spec = KVSpec.of_cache(src, MODEL)
    bad_layers = [(torch.zeros(5, 2, 4), torch.zeros(5, 2, 4)), (torch.zeros(4, 2, 4),) * 2]
    with ThreadPoolExecutor(2) as pool:
        r = pool.submit(receiver.recv_kv, "prefill-0", spec, lambda i, k, v: None)
        s = pool.submit(sender.send_kv, "target-0", iter(bad_layers), TransferMeta(spec, "q", 5))
        with pytest.raises(ValueError, match="layer 1"):
            s.result(timeout=30)
        with pytest.raises(PeerLost):  # the sender dropped the pair mid-stream
            r.result(timeout=30)


def test_spec_proto_round_trip() -> None:
    spec = KVSpec("m", 2, 4, 64, torch.bfloat16, 2048)
    assert KVSpec.from_proto(spec.to_proto()) == spec


def test_nccl_constructs_on_cpu_and_fails_clearly() -> None:
    transport = create_transport("nccl", "prefill-0", InMemoryRendezvous())
    assert transport.backend == "nccl"
    if torch.cuda.is_available():
        pytest.skip("CUDA present: covered by tests/gpu")
    with pytest.raises(TransportUnavailable, match="nccl.*CUDA"):
        transport.send_tensors("target-0", "r", [torch.ones(1)])


def test_unknown_backend() -> None:
    with pytest.raises(ValueError, match="unknown KV transport"):
        create_transport("carrier-pigeon", "x")


def test_sender_restart_rebuilds_the_pair() -> None:
    """The receiver's cached group breaks when its sender goes away; a new sender with the
    same id publishes the next generation and the receiver rejoins on its own."""
    rdv = InMemoryRendezvous()
    opts: dict[str, Any] = {"connect_timeout_s": 10.0, "op_timeout_s": 10.0}
    receiver = create_transport("gloo", "target-0", rdv, **opts)
    old = create_transport("gloo", "prefill-0", rdv, **opts)
    both(lambda: old.send_tensors("target-0", "a", [torch.ones(2)]),
         lambda: receiver.recv_tensors("prefill-0"))
    old.close()  # the old sender is gone: its group and store are shut down
    new = create_transport("gloo", "prefill-0", rdv, **opts)
    _, got = both(lambda: new.send_tensors("target-0", "b", [torch.full((3,), 7.0)]),
                  lambda: receiver.recv_tensors("prefill-0"))
    assert got.request_id == "b" and torch.equal(got.extras[0], torch.full((3,), 7.0))
    assert rdv.lookup_rendezvous("prefill-0->target-0")["generation"] == 2
    new.close()
    receiver.close()


def test_concurrent_sends_to_one_peer_are_serialized(
        pair: tuple[ChannelTransport, ChannelTransport]) -> None:
    sender, receiver = pair
    with ThreadPoolExecutor(3) as pool:
        sends = [pool.submit(sender.send_tensors, "target-0", f"r{i}", [torch.full((4,), float(i))])
                 for i in range(2)]
        got = [receiver.recv_tensors("prefill-0") for _ in range(2)]
        for s in sends:
            s.result(timeout=30)
    for transfer in got:
        assert torch.equal(transfer.extras[0], torch.full((4,), float(transfer.request_id[1:])))
    assert sorted(t.request_id for t in got) == ["r0", "r1"]
