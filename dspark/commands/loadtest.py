"""Load-test a running fleet on loopback: concurrent streams, TTFT/ITL, throughput, errors.

Bounded on purpose: at most `--max-requests` requests within `--duration` seconds (plus one
`--timeout` for the requests still in flight), and only to loopback targets (127.0.0.0/8,
::1, localhost), so it can never be pointed at someone else's service by mistake.

Latency definitions: TTFT = request sent -> first message carrying tokens. A speculative
step commits several tokens in one message, so ITL is the gap between consecutive
messages divided by the tokens of the later one, counted once per token (the per-token
latency a reader of the stream experiences). Exit status 1 when any request failed or KV
slots leaked, so CI can run it as a check.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import ipaddress
import json
import sys
import time
from typing import Any
from urllib.parse import urlsplit

from dspark.errors import UserError

MAX_STREAMS = 1024
MAX_DURATION_S = 3600.0
MAX_REQUESTS = 1_000_000
LEAK_SETTLE_S = 5.0  # frees after the last stream may land a little later: poll this long


@dataclasses.dataclass(frozen=True)
class LoadConfig:
    host: str
    port: int
    http: bool = False
    streams: int = 8
    duration_s: float = 10.0
    max_requests: int = 100
    prompt: str = "Hello"
    max_new_tokens: int = 32
    api_key: str | None = None
    timeout_s: float = 120.0
    leak_check_url: str | None = None
    ca_file: str | None = None  # TLS: trust this CA (both modes)


@dataclasses.dataclass
class RequestResult:
    code: str  # "OK", a gRPC status name, or an HTTP status number
    tokens: int = 0
    ttft_s: float | None = None
    itl_s: list[float] = dataclasses.field(default_factory=list)


# -- loopback only ----------------------------------------------------------------------

def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # any other name could resolve anywhere


def parse_target(target: str) -> tuple[str, int]:
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise UserError(f"--target must be HOST:PORT, got {target!r}")
    host = host.strip("[]")
    if not is_loopback(host):
        raise UserError(f"refusing non-loopback target {host!r}: the load test only runs against "
                        "127.0.0.0/8, ::1 or localhost")
    return host, int(port)


def check_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not is_loopback(parts.hostname or ""):
        raise UserError(f"refusing --leak-check-url {url!r}: only http(s) on loopback")
    return url


# -- one request per transport ----------------------------------------------------------

class _Timer:
    """Turns message arrival times into TTFT and per-token ITL samples."""

    def __init__(self, result: RequestResult) -> None:
        self.result, self.start, self.last = result, time.perf_counter(), None

    def tokens(self, n: int) -> None:
        if n <= 0:
            return
        now = time.perf_counter()
        if self.last is None:
            self.result.ttft_s = now - self.start
        else:
            self.result.itl_s += [(now - self.last) / n] * n
        self.last = now
        self.result.tokens += n


async def grpc_request(stub: Any, cfg: LoadConfig) -> RequestResult:
    import grpc

    from dspark.v1 import generation_pb2 as pb

    req = pb.GenerateRequest(text=cfg.prompt, sampling=pb.SamplingOptions(
        temperature=0.0, max_new_tokens=cfg.max_new_tokens))
    metadata = (("authorization", f"Bearer {cfg.api_key}"),) if cfg.api_key else None
    result = RequestResult("OK")
    timer, expected = _Timer(result), 0
    try:
        async for msg in stub.Generate(req, metadata=metadata, timeout=cfg.timeout_s):
            if msg.offset != expected:  # a gap or duplicate is a fleet bug: count it loudly
                result.code = "STREAM_GAP"
            expected = msg.offset + len(msg.token_ids)
            timer.tokens(len(msg.token_ids))
            if msg.finish_reason == pb.FINISH_REASON_ERROR:
                result.code = "FINISH_ERROR"
    except grpc.aio.AioRpcError as e:
        result.code = e.code().name
    return result


async def http_request(session: Any, base_url: str, cfg: LoadConfig) -> RequestResult:
    import aiohttp

    body = {"prompt": cfg.prompt, "max_tokens": cfg.max_new_tokens, "temperature": 0, "stream": True}
    headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
    result = RequestResult("OK")
    timer = _Timer(result)
    try:
        async with session.post(f"{base_url}/v1/completions", json=body, headers=headers,
                                timeout=aiohttp.ClientTimeout(total=cfg.timeout_s)) as resp:
            if resp.status != 200:
                result.code = str(resp.status)
                return result
            async for line in resp.content:
                data = line.strip()
                if not data.startswith(b"data:") or data == b"data: [DONE]":
                    continue
                chunk = json.loads(data[5:])
                if "error" in chunk:
                    result.code = "STREAM_ERROR"
                    continue
                choice = (chunk.get("choices") or [{}])[0]
                timer.tokens(len(choice.get("token_ids") or ()) or (1 if choice.get("text") else 0))
    except (aiohttp.ClientError, ValueError) as e:
        result.code = type(e).__name__
    except TimeoutError:
        result.code = "DEADLINE_EXCEEDED"
    return result


# -- the run -----------------------------------------------------------------------------

async def _used_slots(url: str, api_key: str | None) -> int:
    import aiohttp

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        async with aiohttp.ClientSession() as s, \
                s.get(url, headers=headers, timeout=aiohttp.ClientTimeout(total=10)) as r:
            r.raise_for_status()
            return int((await r.json())["used_slots"])
    except (aiohttp.ClientError, TimeoutError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"leak check {url} failed ({type(e).__name__}: {e}); it must answer "
                        '{"used_slots": n}') from None


async def _leak_check(url: str, api_key: str | None, before: int) -> dict[str, int]:
    deadline = time.monotonic() + LEAK_SETTLE_S
    after = await _used_slots(url, api_key)
    while after > before and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
        after = await _used_slots(url, api_key)
    return {"used_slots_before": before, "used_slots_after": after, "leaked_slots": max(0, after - before)}


async def run_loadtest(cfg: LoadConfig) -> dict[str, Any]:
    """Run the load and return the report (see `summarize`)."""
    url = cfg.leak_check_url
    before = await _used_slots(url, cfg.api_key) if url else None
    results: list[RequestResult] = []
    issued = 0
    start = time.perf_counter()
    stop_at = start + cfg.duration_s

    async def stream(send: Any) -> None:
        nonlocal issued
        # One event loop: the check-and-increment cannot interleave with another stream's.
        while issued < cfg.max_requests and time.perf_counter() < stop_at:
            issued += 1
            results.append(await send())

    async with _client(cfg) as send:
        await asyncio.gather(*(stream(send) for _ in range(cfg.streams)))
    elapsed = time.perf_counter() - start
    leak = await _leak_check(url, cfg.api_key, before) if url and before is not None else None
    return summarize(cfg, results, elapsed, leak)


class _client:  # noqa: N801 - used as `async with _client(cfg) as send`
    """Opens one shared channel/session; yields `send() -> RequestResult`."""

    def __init__(self, cfg: LoadConfig) -> None:
        self.cfg, self._close = cfg, None

    async def __aenter__(self) -> Any:
        cfg = self.cfg
        scheme = "https" if cfg.ca_file else "http"
        host = f"[{cfg.host}]" if ":" in cfg.host else cfg.host
        if cfg.http:
            import aiohttp

            from services.security.tls import http_client_context

            ssl = http_client_context(cfg.ca_file) if cfg.ca_file else None
            session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=cfg.streams, ssl=ssl))
            self._close = session.close
            base = f"{scheme}://{host}:{cfg.port}"
            return lambda: http_request(session, base, cfg)
        import grpc

        from dspark.v1 import generation_pb2_grpc as pb_grpc

        addr = f"{host}:{cfg.port}"
        if cfg.ca_file:
            from services.security.tls import grpc_channel_credentials

            channel = grpc.aio.secure_channel(addr, grpc_channel_credentials(cfg.ca_file))
        else:
            channel = grpc.aio.insecure_channel(addr)
        self._close = channel.close
        stub = pb_grpc.GenerationStub(channel)
        return lambda: grpc_request(stub, cfg)

    async def __aexit__(self, *exc: object) -> None:
        if self._close is not None:
            await self._close()


def percentile(values: list[float], q: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default); None when empty."""
    if not values:
        return None
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summarize(cfg: LoadConfig, results: list[RequestResult], elapsed_s: float,
              leak: dict[str, int] | None) -> dict[str, Any]:
    errors: dict[str, int] = {}
    for r in results:
        if r.code != "OK":
            errors[r.code] = errors.get(r.code, 0) + 1
    ttft = [r.ttft_s for r in results if r.ttft_s is not None]
    itl = [x for r in results for x in r.itl_s]
    tokens = sum(r.tokens for r in results)
    return {
        "target": f"{cfg.host}:{cfg.port}", "protocol": "http" if cfg.http else "grpc",
        "streams": cfg.streams, "requests": len(results), "ok": len(results) - sum(errors.values()),
        "errors": errors, "duration_s": elapsed_s, "tokens": tokens,
        "throughput_tok_s": tokens / elapsed_s if elapsed_s > 0 else 0.0,
        "ttft_s": {"p50": percentile(ttft, 50), "p99": percentile(ttft, 99)},
        "itl_s": {"p50": percentile(itl, 50), "p99": percentile(itl, 99)},
        "kv": leak,
    }


def format_table(report: dict[str, Any]) -> str:
    def ms(x: float | None) -> str:
        return "-" if x is None else f"{x * 1000:.1f} ms"

    rows = [("target", f"{report['target']} ({report['protocol']}, {report['streams']} streams)"),
            ("requests", f"{report['requests']} ({report['ok']} ok)"),
            ("errors", ", ".join(f"{k}={v}" for k, v in sorted(report["errors"].items())) or "0"),
            ("duration", f"{report['duration_s']:.2f} s"),
            ("tokens", str(report["tokens"])),
            ("throughput", f"{report['throughput_tok_s']:.1f} tok/s"),
            ("TTFT p50 / p99", f"{ms(report['ttft_s']['p50'])} / {ms(report['ttft_s']['p99'])}"),
            ("ITL p50 / p99", f"{ms(report['itl_s']['p50'])} / {ms(report['itl_s']['p99'])}")]
    if report["kv"] is not None:
        rows.append(("leaked KV slots", str(report["kv"]["leaked_slots"])))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


# -- command line ------------------------------------------------------------------------

def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", default="127.0.0.1:50051", help="router HOST:PORT (loopback only)")
    p.add_argument("--http", action="store_true", help="use the OpenAI HTTP front (target = its port)")
    p.add_argument("--streams", type=int, default=8, help="concurrent streams")
    p.add_argument("--duration", type=float, default=10.0, help="seconds to keep sending")
    p.add_argument("--max-requests", type=int, default=100, help="stop after this many requests")
    # Raw text (not chat): an instruction would make an instruct model end its turn at once.
    p.add_argument("--prompt", default="Once upon a time, a lighthouse keeper")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--api-key", default=None, help="sent as `authorization: Bearer <key>`")
    p.add_argument("--timeout", type=float, default=120.0, help="per-request deadline, seconds")
    p.add_argument("--leak-check-url", default=None,
                   help='loopback URL answering GET with {"used_slots": n}; checked before and after')
    p.add_argument("--ca-file", default=None, help="TLS: CA certificate to trust (PEM)")
    p.add_argument("--json", action="store_true", help="one JSON object on stdout")


def config_from_args(args: argparse.Namespace) -> LoadConfig:
    host, port = parse_target(args.target)
    if not 1 <= args.streams <= MAX_STREAMS:
        raise UserError(f"--streams must be in [1, {MAX_STREAMS}]")
    if not 0 < args.duration <= MAX_DURATION_S:
        raise UserError(f"--duration must be in (0, {MAX_DURATION_S:.0f}] seconds")
    if not 1 <= args.max_requests <= MAX_REQUESTS:
        raise UserError(f"--max-requests must be in [1, {MAX_REQUESTS}]")
    if args.max_new_tokens < 1 or not 0 < args.timeout <= MAX_DURATION_S:
        raise UserError("--max-new-tokens must be >= 1 and --timeout in (0, 3600]")
    return LoadConfig(host=host, port=port, http=args.http, streams=args.streams, duration_s=args.duration,
                      max_requests=args.max_requests, prompt=args.prompt, max_new_tokens=args.max_new_tokens,
                      api_key=args.api_key, timeout_s=args.timeout, ca_file=args.ca_file,
                      leak_check_url=check_url(args.leak_check_url) if args.leak_check_url else None)


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    report = asyncio.run(run_loadtest(cfg))
    print(json.dumps(report) if args.json else format_table(report))
    failed = bool(report["errors"]) or bool(report["kv"] and report["kv"]["leaked_slots"])
    if failed:
        print("loadtest: errors or leaked KV slots (see report)", file=sys.stderr)
    return 1 if failed else 0
