"""Bring a whole fleet up and down in this process: Ray (a private local one on loopback with
simulated pools, or an existing cluster), a private redis-server unless a URL is configured,
the Serve application (deployed here, or attached to when someone else deploys it, e.g.
KubeRay), and the router on its own asyncio loop thread. Used by `dspark serve` and by the
integration tests.

Everything started here is stopped by `stop()`, which also removes the temporary folders
(Redis's and the local Ray's session folder)."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import signal
import sys
import tempfile
import threading
import time
from typing import Any

from services.ray_env import LOOPBACK, REPLICA_SETUP_HOOK, ray_env

ray_env()  # must precede `import ray` (see services/ray_env.py)
import ray  # noqa: E402
from ray import serve  # noqa: E402

from services.app import INGRESS, build_fleet  # noqa: E402
from services.config import FleetConfig  # noqa: E402
from services.metrics import FleetMetrics  # noqa: E402
from services.ray_metrics import MetricsRelay  # noqa: E402
from services.router.server import RouterServer  # noqa: E402
from services.state.redis_state import FleetState, StateConfig  # noqa: E402
from services.state.server import RedisServer, free_port  # noqa: E402

OBJECT_STORE_BYTES = 512 * 2**20
STOP_STEP_TIMEOUT_S = 20.0
LOCAL_RAY_ATTEMPTS = 3
CLIENT_ATTACH_ATTEMPTS = 4  # ray:// connects, with 5, 10 and 20 s of waiting between them


class LocalFleet:
    """`ray_address`: use that cluster instead of starting a local Ray. `attach`: do not
    deploy the Serve application, wait until the one named `cfg.app_name` is RUNNING (its
    deployments must be the ones `cfg` describes). `ray_metrics_port`: serve the local Ray
    node's metrics on `host:ray_metrics_port` (Ray itself stays on loopback)."""

    def __init__(self, cfg: FleetConfig, host: str = LOOPBACK, grpc_port: int = 0, http_port: int = 0,
                 metrics_port: int | None = 0, num_cpus: int | None = None,
                 deploy_timeout_s: float = 300.0, *, ray_address: str | None = None, attach: bool = False,
                 ray_metrics_port: int | None = None) -> None:
        self.cfg, self.host = cfg, host
        self.ports = {"grpc": grpc_port, "http": http_port}
        self.metrics_port, self.num_cpus, self.deploy_timeout_s = metrics_port, num_cpus, deploy_timeout_s
        self.ray_address, self.attach, self.ray_metrics_port = ray_address, attach, ray_metrics_port
        self.redis: RedisServer | None = None
        self.state: FleetState | None = None
        self.metrics = FleetMetrics(cfg.model, cfg.method)
        self.server: RouterServer | None = None
        self._metrics_http: Any = None
        self._ray_metrics: MetricsRelay | None = None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="router", daemon=True)
        self._own_ray = False
        self._deployed = False
        self._ray_tmp: str | None = None
        self._stopped = False
        self._keep_ray_logs = False

    # -- lifecycle -----------------------------------------------------------------------------
    def start(self) -> LocalFleet:
        try:
            return self._start()
        except BaseException as e:
            # A half-started fleet must not leave redis-server or Ray running; a failed one
            # keeps Ray's logs for diagnosis (an interrupted one does not).
            self._keep_ray_logs = not isinstance(e, KeyboardInterrupt)
            self.stop()
            raise

    def _start(self) -> LocalFleet:
        ray_env()
        if self.cfg.redis_url is None:
            self.redis = RedisServer().start()
            self.cfg = self.cfg.model_copy(update={"redis_url": self.redis.url})
        self.state = FleetState.from_url(self.cfg.redis_url, StateConfig(namespace=self.cfg.redis_namespace))
        self._start_ray()
        if self.attach:
            self._await_app()
        else:
            self._deploy()
        self._thread.start()
        self.server = RouterServer(self.cfg, self.state, self.metrics)
        grpc_port, http_port = self.run(self.server.start(self.host, self.ports["grpc"], self.ports["http"]))
        self.ports.update(grpc=grpc_port, http=http_port)
        if self.metrics_port is not None:
            self._metrics_http = self.metrics.start_http_server(self.metrics_port, self.host)
            self.ports["metrics"] = self._metrics_http.server_port
        return self

    def _start_ray(self) -> None:
        if ray.is_initialized():
            return
        if self.ray_address:
            _attach_ray(self.ray_address)
            return
        kwargs: dict[str, Any] = {}
        if self.ray_metrics_port is not None:
            kwargs["_metrics_export_port"] = free_port(LOOPBACK)
        for attempt in range(1, LOCAL_RAY_ATTEMPTS + 1):
            # A private session folder, removed by stop() (Ray would leave /tmp/ray/session_* behind).
            self._ray_tmp = tempfile.mkdtemp(prefix="dspark-ray-")
            try:
                _init_ray(address="local", num_cpus=self.num_cpus or 4, include_dashboard=False,
                          object_store_memory=OBJECT_STORE_BYTES, resources=self.cfg.pool_resources(),
                          namespace="dspark", _node_ip_address=LOOPBACK, _temp_dir=self._ray_tmp,
                          runtime_env={"worker_process_setup_hook": REPLICA_SETUP_HOOK}, **kwargs)
                break
            except Exception as e:
                # The raylet gives its agents ~15 s to come up and aborts otherwise; on a loaded
                # small machine the Python agents can take longer (observed: 21 s).
                if "timed out during startup" not in str(e) or attempt == LOCAL_RAY_ATTEMPTS:
                    raise
                print(f"fleet start: local Ray did not come up ({e}); attempt {attempt + 1} of "
                      f"{LOCAL_RAY_ATTEMPTS}", file=sys.stderr, flush=True)
                ray.shutdown()
                shutil.rmtree(self._ray_tmp, ignore_errors=True)
        self._own_ray = True
        if "_metrics_export_port" in kwargs:
            relay = MetricsRelay(kwargs["_metrics_export_port"], self.host, self.ray_metrics_port)
            self._ray_metrics = relay.start()
            self.ports["ray_metrics"] = self._ray_metrics.port

    def _deploy(self) -> None:
        serve.start(proxy_location="Disabled")
        # Not blocking: unsatisfiable pool resources would otherwise hang forever.
        serve.api._run(build_fleet(self.cfg), _blocking=False, name=self.cfg.app_name, route_prefix=None,
                       logging_config={"enable_access_log": False, "log_level": "WARNING"})
        self._deployed = True
        self._wait_running(f"pool resources available? {ray.available_resources()}")

    def _await_app(self) -> None:
        """Attach to an application deployed by someone else (KubeRay's serveConfigV2)."""
        self._wait_running("is it deployed (serveConfigV2 / `serve deploy`) under this name?")
        expected = {name for pool in ("prefill", "target", "drafter") for name in self.cfg.deployment_names(pool)}
        found = set(serve.status().applications[self.cfg.app_name].deployments)
        if not expected <= found:
            raise RuntimeError(f"Serve application {self.cfg.app_name!r} has deployments {sorted(found)}, but "
                               f"this fleet config expects {sorted(expected)}: the router and the application "
                               "must read the same fleet config")

    def _wait_running(self, hint: str) -> None:
        deadline = time.monotonic() + self.deploy_timeout_s
        while time.monotonic() < deadline:
            app = serve.status().applications.get(self.cfg.app_name)
            if app is not None and app.status == "RUNNING":
                return
            if app is not None and app.status == "DEPLOY_FAILED":
                raise RuntimeError(f"fleet deployment failed: {app.message}")
            time.sleep(0.5)
        raise TimeoutError(f"Serve application {self.cfg.app_name!r} not RUNNING after "
                           f"{self.deploy_timeout_s:.0f}s ({hint})")

    def run(self, coro: object, timeout: float | None = None) -> object:
        """Run a coroutine on the router's loop from another thread."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)  # type: ignore[arg-type]

    def stop(self) -> None:
        """Idempotent: `start()` calls it on failure and callers may call it again."""
        if self._stopped:
            return
        self._stopped = True
        try:
            self._stop_serving()
        finally:
            self._stop_local()  # redis-server and temp folders are ours: remove them whatever else failed

    def _stop_serving(self) -> None:
        if self.server is not None:
            with contextlib.suppress(Exception):
                self.run(self.server.stop(), timeout=10)
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=5)
        for http in (self._metrics_http, self._ray_metrics):
            if http is not None:
                http.shutdown()
                http.server_close()
        if not ray.is_initialized():
            return
        if self._deployed:  # an attached application belongs to whoever deployed it
            _bounded(lambda: serve.delete(self.cfg.app_name), "deleting the Serve application")
        if self._own_ray:
            _bounded(serve.shutdown, "stopping Ray Serve")
        ray.shutdown()

    def _stop_local(self) -> None:
        if self.state is not None:
            self.state.close()
        if self.redis is not None:
            self.redis.stop()
            self.redis = None
        if self._ray_tmp is not None:
            if self._keep_ray_logs:
                print(f"fleet start failed: Ray's logs are in {self._ray_tmp}", file=sys.stderr, flush=True)
            else:
                shutil.rmtree(self._ray_tmp, ignore_errors=True)
            self._ray_tmp = None

    def __enter__(self) -> LocalFleet:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _bounded(step: Any, what: str, timeout_s: float = STOP_STEP_TIMEOUT_S) -> None:
    """A graceful shutdown step that may never return: when systemd (or `timeout`) signals
    the whole process group, Ray's own raylet and GCS die with us and Serve calls wait for
    them forever, until Ray's core kills the process and leaves redis-server behind. Give up
    on the step after `timeout_s`; `ray.shutdown()` and the local clean-up still run."""
    done = threading.Event()

    def run() -> None:
        with contextlib.suppress(Exception):
            step()
        done.set()

    threading.Thread(target=run, name=f"stop: {what}", daemon=True).start()
    if not done.wait(timeout_s):
        print(f"fleet stop: {what} did not finish in {timeout_s:.0f}s, going on", file=sys.stderr, flush=True)


def _attach_ray(address: str, attempts: int = CLIENT_ATTACH_ATTEMPTS, first_wait_s: float = 5.0) -> None:
    """Connect to an existing cluster. Through Ray Client (`ray://`), the head starts one
    server process per client; on a loaded or still-starting head that process can die
    before it serves ("Starting Ray client server failed"), and a router pod that gave up
    at once would crash-loop. Retry a few times with a growing wait, then fail loudly."""
    wait_s = first_wait_s
    for attempt in range(1, attempts + 1):
        try:
            _init_ray(address=address, namespace="dspark")
            return
        except ConnectionError as e:  # ConnectionAbortedError (the server died) is one
            if not address.startswith("ray://") or attempt == attempts:
                raise
            reason = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__  # Ray's last line
            print(f"fleet start: could not attach to {address} ({reason}); attempt {attempt + 1} of "
                  f"{attempts} in {wait_s:.0f}s", file=sys.stderr, flush=True)
            with contextlib.suppress(Exception):
                ray.shutdown()
            time.sleep(wait_s)
            wait_s *= 2


def _init_ray(**kwargs: Any) -> None:
    """`ray.init` that keeps the process's SIGTERM handler. Ray installs one that calls
    `sys.exit` from the signal handler; the exception then unwinds through Ray's own
    shutdown and the process aborts half-way (exit 134), leaving redis-server and the
    temporary folders behind. The process's own handler (`dspark serve`'s) stays in charge."""
    main = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGTERM) if main else None
    try:
        ray.init(**kwargs)
    finally:  # a failed attempt too: a retry would otherwise keep Ray's handler (exit 15 on SIGTERM)
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


__all__ = ["INGRESS", "LocalFleet", "ray_env"]
