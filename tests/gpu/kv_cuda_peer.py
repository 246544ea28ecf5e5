"""One side of a KV transfer in its own process, for tests/gpu/test_kv_cuda.py.

    kv_cuda_peer.py --role send|recv --backend nccl|gloo --device cuda:0 --store-port P --out FILE

The two sides find each other through a TCPStore the test hosts (`StoreRendezvous`, so no
Redis is needed on a GPU machine). The sender fills a KV cache slot on `--device` with K
and V drawn separately from a seeded generator (`layers()`, which the test recomputes) and
streams it with the context features; the receiver imports every layer into its own cache
on `--device` as it arrives and saves what it got (plus the devices the tensors came on).
Any failure is saved as {"error": ...} and the process exits 3.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist

from dspark.kv.cache import KVCache
from dspark.kv.handshake import KVSpec
from dspark.kv.transport import TransferMeta, create_transport

LAYERS, KV_HEADS, HEAD_DIM, MAX_LEN, TOKENS = 3, 2, 16, 64, 37
SEED = 1234


def layers() -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
    """The K, V of every layer and the features the sender sends (CPU, float32): K and V are
    separate draws, so a transport that swaps or duplicates them is seen."""
    g = torch.Generator().manual_seed(SEED)
    ks, vs = [], []
    for _ in range(LAYERS):
        ks.append(torch.randn(TOKENS, KV_HEADS, HEAD_DIM, generator=g))
        vs.append(torch.randn(TOKENS, KV_HEADS, HEAD_DIM, generator=g))
    return ks, vs, torch.randn(TOKENS, 2, 8, generator=g)


class StoreRendezvous:
    """`RendezvousStore` on a torch.distributed TCPStore (JSON records under `rdv/<pair>`)."""

    def __init__(self, store: dist.Store) -> None:
        self.store = store

    def _key(self, pair: str) -> str:
        return f"rdv/{pair}"

    def publish_rendezvous(self, pair: str, record: Mapping[str, Any], *, replace: bool = True,
                           ttl_s: int | None = None) -> dict[str, Any]:
        if replace or self.lookup_rendezvous(pair) is None:
            self.store.set(self._key(pair), json.dumps(dict(record)))
        return self.lookup_rendezvous(pair) or {}

    def lookup_rendezvous(self, pair: str) -> dict[str, Any] | None:
        if not self.store.check([self._key(pair)]):
            return None
        text = self.store.get(self._key(pair)).decode()
        return json.loads(text) if text else None

    def clear_rendezvous(self, pair: str, generation: int | None = None) -> bool:
        record = self.lookup_rendezvous(pair)
        if record is None or (generation is not None and record.get("generation") != generation):
            return False
        self.store.set(self._key(pair), "")  # TCPStore.delete_key is not in every build
        return True


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--role", choices=["send", "recv"], required=True)
    ap.add_argument("--backend", choices=["nccl", "gloo"], required=True)
    ap.add_argument("--device", required=True)
    ap.add_argument("--store-port", type=int, required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    store = dist.TCPStore("127.0.0.1", args.store_port, None, False, datetime.timedelta(seconds=120))
    options: dict[str, Any] = {"connect_timeout_s": 60.0, "op_timeout_s": 60.0}
    if args.backend == "nccl":
        options["device"] = device  # gloo channels stage through host memory
    me, peer = ("prefill-0", "target-0") if args.role == "send" else ("target-0", "prefill-0")
    transport = create_transport(args.backend, me, StoreRendezvous(store), **options)
    cache = KVCache(LAYERS, 1, MAX_LEN, KV_HEADS, HEAD_DIM, device=device)
    spec = KVSpec.of_cache(cache, "tiny")
    slot = cache.allocate()
    try:
        if args.role == "send":
            ks, vs, features = layers()
            for i in range(LAYERS):
                cache.import_layer(slot, i, ks[i].to(device), vs[i].to(device))
            cache.set_length(slot, TOKENS)
            transport.send_kv(peer, cache.export_layers(slot), TransferMeta(spec, "req-1", TOKENS),
                              [features.to(device)])
            result: dict[str, Any] = {"sent": True}
        else:
            devices: list[str] = []

            def on_layer(i: int, k: torch.Tensor, v: torch.Tensor) -> None:
                devices.append(f"{k.device}|{v.device}")
                cache.import_layer(slot, i, k, v)

            got = transport.recv_kv(peer, spec, on_layer)
            n = got.num_tokens
            result = {"request_id": got.request_id, "devices": devices, "cache_device": str(cache.k[0].device),
                      "k": [k[slot, :n].cpu() for k in cache.k], "v": [v[slot, :n].cpu() for v in cache.v],
                      "extras": [e.cpu() for e in got.extras]}
    except Exception as e:  # reported to the test, which tells a refusal from a bug
        torch.save({"error": f"{type(e).__name__}: {e}"}, args.out)
        return 3
    finally:
        transport.close()
    torch.save(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
