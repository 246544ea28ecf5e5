"""Start and stop a private `redis-server` on 127.0.0.1 (tests, and `dspark serve` without
a Redis URL). Nothing persists: `--save "" --appendonly no` in a temporary directory."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

import redis

HOST = "127.0.0.1"


def free_port(host: str = HOST) -> int:
    """A port the OS just reported free on `host` (racy by nature: callers retry on clash)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class RedisServer:
    """`with RedisServer() as srv: FleetState.from_url(srv.url)`; the server dies on exit."""

    def __init__(self, port: int | None = None, workdir: Path | None = None,
                 executable: str = "redis-server", start_timeout_s: float = 10.0) -> None:
        self.port = port
        self.executable = executable
        self.start_timeout_s = start_timeout_s
        self._workdir = workdir
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self.pid: int | None = None

    @property
    def url(self) -> str:
        if self.port is None:
            raise RuntimeError("RedisServer is not started")
        return f"redis://{HOST}:{self.port}/0"

    @property
    def workdir(self) -> Path:
        if self._workdir is None:
            raise RuntimeError("RedisServer is not started")
        return self._workdir

    def start(self) -> RedisServer:
        exe = shutil.which(self.executable)
        if exe is None:
            raise FileNotFoundError(f"{self.executable!r} not found: `apt-get install redis-server` "
                                    "(or `make system-deps`), or pass a Redis URL")
        if self._workdir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="dspark-redis-")
            self._workdir = Path(self._tmp.name)
        explicit_port = self.port is not None
        for _ in range(1 if explicit_port else 5):  # a fresh port if another process won the race
            port = self.port if explicit_port else free_port()
            if self._launch(exe, port):
                self.port = port
                return self
        self.stop()
        raise RuntimeError(f"redis-server did not come up on {HOST} (see {self.workdir}/redis.log)")

    def _launch(self, exe: str, port: int) -> bool:
        pidfile = self.workdir / "redis.pid"
        pidfile.unlink(missing_ok=True)
        subprocess.run([exe, "--port", str(port), "--bind", HOST, "--save", "", "--appendonly", "no",
                        "--dir", str(self.workdir), "--daemonize", "yes", "--pidfile", str(pidfile),
                        "--logfile", str(self.workdir / "redis.log")],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis(host=HOST, port=port, socket_connect_timeout=0.5, socket_timeout=0.5)
        deadline = time.monotonic() + self.start_timeout_s
        try:
            while time.monotonic() < deadline:
                with contextlib.suppress(redis.ConnectionError, redis.TimeoutError, OSError):
                    # Only our server counts: its pidfile must exist (another Redis may own the port).
                    if pidfile.exists() and client.ping():
                        self.pid = int(client.info("server")["process_id"])
                        if self.pid == int(pidfile.read_text().strip()):
                            return True
                        self.pid = None
                time.sleep(0.02)
        finally:
            client.close()
        self._kill_from_pidfile(pidfile)
        return False

    def _kill_from_pidfile(self, pidfile: Path) -> None:
        with contextlib.suppress(FileNotFoundError, ValueError):
            self.pid = int(pidfile.read_text().strip())
        self.stop(cleanup=False)

    def stop(self, cleanup: bool = True, timeout_s: float = 5.0) -> None:
        if self.pid is not None:
            _terminate(self.pid, timeout_s)
            self.pid = None
        if cleanup and self._tmp is not None:
            self._tmp.cleanup()
            self._tmp, self._workdir = None, None

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


def _terminate(pid: int, timeout_s: float) -> None:
    """SIGTERM, then SIGKILL after `timeout_s`; returns once the process is gone."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not process_alive(pid):
            return
        time.sleep(0.02)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def process_alive(pid: int) -> bool:
    """True while `pid` runs. A daemonized server is re-parented to PID 1, which may reap it
    late, so an exited process that is still a zombie counts as gone."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no procfs: trust kill(0)
    return stat.rsplit(")", 1)[1].split()[0] != "Z"
