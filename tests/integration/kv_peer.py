"""A KV receiver in its own process, for tests/integration/test_kv_gloo.py.

Receives `--count` transfers from `--peer` over gloo (rendezvous through Redis), imports each
layer into a KVCache slot as it arrives, saves {k, v, order, extras, request_id} to
`--out.<i>` and then either exits or, with `--hold`, waits to be killed.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from dspark.kv.cache import KVCache
from dspark.kv.handshake import KVSpec
from dspark.kv.transport import create_transport
from services.state.redis_state import FleetState, StateConfig


def main() -> None:
    ap = argparse.ArgumentParser()
    for flag in ("--redis-url", "--namespace", "--self-id", "--peer", "--out", "--model"):
        ap.add_argument(flag, required=True)
    ap.add_argument("--count", type=int, default=1)
    ap.add_argument("--hold", action="store_true")
    args = ap.parse_args()
    state = FleetState.from_url(args.redis_url, StateConfig(namespace=args.namespace))
    transport = create_transport("gloo", args.self_id, state, connect_timeout_s=60.0)
    cache = KVCache(num_layers=4, num_slots=1, max_len=64, num_kv_heads=2, head_dim=8)
    spec = KVSpec.of_cache(cache, args.model)
    print("ready", flush=True)
    for i in range(args.count):
        slot, order = cache.allocate(), []

        def on_layer(layer: int, k: torch.Tensor, v: torch.Tensor, slot: int = slot,
                     order: list[int] = order) -> None:
            order.append(layer)
            cache.import_layer(slot, layer, k, v)

        got = transport.recv_kv(args.peer, spec, on_layer)
        n = got.num_tokens
        torch.save({"k": [k[slot, :n].clone() for k in cache.k],
                    "v": [v[slot, :n].clone() for v in cache.v],
                    "order": order, "extras": got.extras, "request_id": got.request_id},
                   f"{args.out}.{i}")
        cache.free(slot)
        print("received", got.request_id, flush=True)
    while args.hold:
        time.sleep(1)
    transport.close()


if __name__ == "__main__":
    sys.exit(main())
