"""Fleet vs embedded throughput on one machine (`python -m services.bench_fleet`).

Measures per-user tokens/s at 1 stream and aggregate tokens/s at N concurrent streams,
greedy, same prompts and method, and one speculative step's breakdown: in the embedded
engine (draft and verify compute) and in the fleet as the router sees it (propose call,
verify call, the rest = router + Redis + streaming). Prints one JSON object."""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
from typing import Any

PROMPTS = ["The capital of France is", "def fibonacci(n):\n    ", "1, 2, 3, 4, 5,",
           "Write a haiku about the sea.", "Explain why the sky is blue."]


def _embedded(cfg: Any, max_new: int, streams: int) -> dict[str, float]:
    import torch

    from dspark.engine.build import build_engine
    from dspark.engine.config import EngineConfig
    from dspark.spec.sampling import SamplingParams

    torch.set_num_threads(1)
    target, engine, _ = build_engine(EngineConfig(model=cfg.model, method=cfg.method, block_size=cfg.block_size,
                                                max_batch_size=max(streams, 1)))
    prompts = [target.tokenizer.encode(p) for p in PROMPTS]
    params = SamplingParams(max_new_tokens=max_new, ignore_eos=True)
    engine.generate([prompts[0]], params)  # warm-up
    out: dict[str, float] = {}
    t0 = time.perf_counter()
    (one,) = engine.generate([prompts[0]], params)
    out["single_tok_s"] = len(one.token_ids) / (time.perf_counter() - t0)
    batch = [prompts[i % len(prompts)] for i in range(streams)]
    t0 = time.perf_counter()
    outs = engine.generate(batch, params)
    out["aggregate_tok_s"] = sum(len(o.token_ids) for o in outs) / (time.perf_counter() - t0)
    # One step at batch 1: draft and verify compute.
    engine.add_request(prompts[0], params)
    engine.step()
    stats = [engine.step() for _ in range(8)]
    out["step_propose_ms"] = 1e3 * sum(s.propose_s for s in stats) / len(stats)
    out["step_verify_ms"] = 1e3 * sum(s.verify_s for s in stats) / len(stats)
    out["step_total_ms"] = 1e3 * sum(s.step_s for s in stats) / len(stats)
    return out


def _fleet(cfg: Any, max_new: int, streams: int) -> dict[str, float]:
    import grpc

    from dspark.v1 import generation_pb2 as pb
    from dspark.v1 import generation_pb2_grpc as pb_grpc
    from services.launcher import LocalFleet

    def req(prompt: str) -> Any:
        return pb.GenerateRequest(text=prompt, sampling=pb.SamplingOptions(temperature=0, max_new_tokens=max_new),
                                  stop=pb.StopOptions(ignore_eos=True))

    with LocalFleet(cfg, metrics_port=None) as fleet:
        s = pb_grpc.GenerationStub(grpc.insecure_channel(f"127.0.0.1:{fleet.ports['grpc']}"))
        list(s.Generate(req(PROMPTS[0])))  # warm-up
        out: dict[str, float] = {}
        hist_before = _hist(fleet)
        t0 = time.perf_counter()
        msgs = list(s.Generate(req(PROMPTS[0])))
        wall = time.perf_counter() - t0
        n = sum(len(m.token_ids) for m in msgs)
        out["single_tok_s"] = n / wall
        hist = {k: (v[0] - hist_before[k][0], v[1] - hist_before[k][1]) for k, v in _hist(fleet).items()}
        steps = max(1, hist["verify"][1])
        out["step_propose_call_ms"] = 1e3 * hist["propose"][0] / max(1, hist["propose"][1])
        out["step_verify_call_ms"] = 1e3 * hist["verify"][0] / steps
        out["step_total_ms"] = 1e3 * wall / (len(msgs) or 1)
        out["step_router_overhead_ms"] = (out["step_total_ms"] - out["step_verify_call_ms"]
                                          - out["step_propose_call_ms"] * hist["propose"][1] / steps)
        counts: list[int] = []

        def one(i: int) -> None:
            counts.append(sum(len(m.token_ids) for m in s.Generate(req(PROMPTS[i % len(PROMPTS)]))))

        threads = [threading.Thread(target=one, args=(i,)) for i in range(streams)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        out["aggregate_tok_s"] = sum(counts) / (time.perf_counter() - t0)
    return out


def _hist(fleet: Any) -> dict[str, tuple[float, float]]:
    """(sum, count) of the router's propose and verify call latencies."""
    m = fleet.metrics
    out = {}
    for key, h in (("propose", m.propose_latency), ("verify", m.verify_latency)):
        samples = {s.name: s.value for metric in h.collect() for s in metric.samples}
        out[key] = (sum(v for k, v in samples.items() if k.endswith("_sum")),
                    sum(v for k, v in samples.items() if k.endswith("_count")))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="deploy/serve/fleet.yaml")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--streams", type=int, default=8)
    args = p.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from services.config import load_config

    cfg = load_config(args.config)
    result = {"model": cfg.model, "method": cfg.method, "max_new_tokens": args.max_new_tokens,
              "streams": args.streams, "embedded": _embedded(cfg, args.max_new_tokens, args.streams),
              "fleet": _fleet(cfg, args.max_new_tokens, args.streams)}
    result["fleet_over_embedded_single"] = result["fleet"]["single_tok_s"] / result["embedded"]["single_tok_s"]
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
