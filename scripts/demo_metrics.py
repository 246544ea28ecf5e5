"""Run a local fleet under load with a real Prometheus scraping it, then render the main
dashboard panels to a PNG (deploy/grafana/render_panels.py). Everything on 127.0.0.1, free
ports, and stopped at the end.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/demo_metrics.py --seconds 150 --out docs/img/dashboard.png

Load: greedy gRPC streams whose concurrency ramps 2 -> 4 -> 8 -> 4, and an invalid request
(empty prompt) every 15 s so the errors panel has something to show. Needs redis-server and
prometheus (make system-deps).
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import threading
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "1, 2, 3, 4, 5,",
    "Write a haiku about the sea.",
    "Monday, Tuesday, Wednesday,",
    "import numpy as np\nimport",
]


def concurrency(elapsed: float, total: float) -> int:
    """2 -> 4 -> 8 -> 4 streams over the run."""
    for frac, n in ((0.15, 2), (0.4, 4), (0.8, 8)):
        if elapsed < frac * total:
            return n
    return 4


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=150.0, help="load duration")
    parser.add_argument("--config", default=str(REPO / "deploy/serve/fleet.yaml"))
    parser.add_argument("--scrape-interval", type=float, default=2.0)
    parser.add_argument("--rate-interval", default="30s", help="$__rate_interval for the rendering")
    parser.add_argument("--out", type=Path, default=REPO / "docs/img/dashboard.png")
    parser.add_argument("--all", action="store_true", help="render every panel")
    args = parser.parse_args()

    import grpc

    from deploy.grafana import render_panels
    from dspark.v1 import generation_pb2 as pb
    from dspark.v1 import generation_pb2_grpc as pb_grpc
    from services.config import load_config
    from services.launcher import LocalFleet
    from tests.integration.prometheus_util import PrometheusServer

    cfg = load_config(args.config, max_in_flight=16)
    stats = {"ok": 0, "failed": 0, "tokens": 0}
    lock = threading.Lock()
    with LocalFleet(cfg, metrics_port=0) as fleet:
        print(f"fleet up: {fleet.ports}", file=sys.stderr, flush=True)
        target = f"127.0.0.1:{fleet.ports['metrics']}"
        with PrometheusServer.start([target], job="dspark-router",
                                    scrape_interval=f"{args.scrape_interval:g}s") as prom:
            prom.wait_for_targets_up()
            print(f"prometheus {prom.url} scraping {target}", file=sys.stderr, flush=True)
            stub = pb_grpc.GenerationStub(grpc.insecure_channel(f"127.0.0.1:{fleet.ports['grpc']}"))
            t0 = time.time()
            stop = threading.Event()

            def worker(i: int) -> None:
                rng = random.Random(i)
                while not stop.is_set():
                    if i >= concurrency(time.time() - t0, args.seconds):
                        stop.wait(0.5)
                        continue
                    req = pb.GenerateRequest(text=rng.choice(PROMPTS), sampling=pb.SamplingOptions(
                        temperature=0, max_new_tokens=rng.choice((16, 24, 32))))
                    try:
                        n = sum(len(m.token_ids) for m in stub.Generate(req, timeout=120))
                        with lock:
                            stats["ok"] += 1
                            stats["tokens"] += n
                    except grpc.RpcError:
                        with lock:
                            stats["failed"] += 1

            threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(8)]
            for t in threads:
                t.start()
            while time.time() - t0 < args.seconds:
                try:  # an empty prompt: INVALID_ARGUMENT, counted by dspark:request_errors_total
                    list(stub.Generate(pb.GenerateRequest(text=""), timeout=10))
                except grpc.RpcError:
                    pass
                time.sleep(15)
            stop.set()
            for t in threads:
                t.join(timeout=150)
            time.sleep(2 * args.scrape_interval)  # let the last requests be scraped
            print(f"load done: {stats}", file=sys.stderr, flush=True)
            argv = ["--prometheus", prom.url, "--start", f"{t0 - 10:.3f}", "--end", f"{time.time():.3f}",
                    "--rate-interval", args.rate_interval, "--out", str(args.out)]
            rc = render_panels.main(argv + (["--all"] if args.all else []))
    return rc


if __name__ == "__main__":
    sys.exit(main())
