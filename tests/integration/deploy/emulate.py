"""Run a container of docker-compose.yml or of a rendered Helm manifest as a local process.

No Docker engine or cluster runs here, so the deployment test does what they would do with
the same inputs: it reads the image (docker/Dockerfile: ENV, WORKDIR, USER, ENTRYPOINT, CMD),
applies the orchestrator's rules (compose `command`/`environment`; Kubernetes
`command`/`args`/`env`/configMap volumes) and starts the resulting argv with that
environment. `Localizer` is the only translation, and it is explicit:

- hostnames of other services -> 127.0.0.1, each (host, port) -> the local stand-in's port;
- the container's own listening ports -> free loopback ports, 0.0.0.0 -> 127.0.0.1;
- image paths (/app from `COPY . /app`, volume mounts) -> the repository, the model cache
  or a folder holding the mounted files;
- the `dspark` console script -> the one in this virtual environment, `tini --` dropped
  (it only forwards signals and reaps children, which this machine's init does here).

Everything else (flags, variables, config files) is passed through unchanged, so a drift
between the image, the manifests and what `dspark serve` accepts fails the test.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

LOOPBACK = "127.0.0.1"
VENV_BIN = Path(sys.executable).parent
MARKER = "DEPLOY_TEST_MARKER"  # every process a test starts carries it; leftovers are found by it


# -- the image -------------------------------------------------------------------------------
@dataclass
class Image:
    env: dict[str, str] = field(default_factory=dict)
    args: dict[str, str] = field(default_factory=dict)
    workdir: str = "/"
    user: str = "root"
    entrypoint: list[str] = field(default_factory=list)
    cmd: list[str] = field(default_factory=list)
    expose: list[int] = field(default_factory=list)
    copies: list[tuple[str, str]] = field(default_factory=list)
    runs: list[str] = field(default_factory=list)
    base: str = ""


def parse_dockerfile(path: Path) -> Image:
    """The instructions a container's start depends on (single stage, exec-form CMD)."""
    image = Image()
    for instruction, rest in _instructions(path.read_text()):
        if instruction == "FROM":
            image.base = rest
        elif instruction == "ARG":
            name, _, default = rest.partition("=")
            image.args[name] = default
        elif instruction == "ENV":
            for pair in shlex.split(rest):
                key, sep, value = pair.partition("=")
                assert sep and "$" not in value, f"ENV {pair}: KEY=VALUE without variables expected"
                image.env[key] = value
        elif instruction == "WORKDIR":
            image.workdir = rest
        elif instruction == "USER":
            image.user = rest
        elif instruction in ("ENTRYPOINT", "CMD"):
            value = json.loads(rest)  # exec form only: a shell form would add /bin/sh -c
            setattr(image, instruction.lower(), value)
        elif instruction == "EXPOSE":
            image.expose += [int(p.split("/")[0]) for p in rest.split()]
        elif instruction == "COPY":
            *sources, dest = [w for w in rest.split() if not w.startswith("--")]
            image.copies += [(s, dest) for s in sources]
        elif instruction == "RUN":
            image.runs.append(rest)
    return image


def _instructions(text: str) -> Iterable[tuple[str, str]]:
    logical = ""
    for line in text.splitlines():
        stripped = line.strip()
        if not logical and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue  # comment inside a continued instruction
        if stripped.endswith("\\"):
            logical += stripped[:-1] + " "
            continue
        logical += stripped
        instruction, _, rest = logical.partition(" ")
        yield instruction.upper(), " ".join(rest.split())
        logical = ""


# -- containers ------------------------------------------------------------------------------
@dataclass
class Container:
    name: str
    argv: list[str]
    env: dict[str, str]
    workdir: str
    files: dict[str, str] = field(default_factory=dict)  # mounted files: container path -> content


def compose_container(compose: Mapping[str, Any], service: str, image: Image) -> Container:
    """Compose: `entrypoint`/`command` replace the image's; `environment` adds to ENV."""
    svc = compose["services"][service]
    entrypoint = svc.get("entrypoint", image.entrypoint)
    command = svc.get("command", image.cmd)
    environment = svc.get("environment", {})
    if isinstance(environment, list):
        environment = dict(item.partition("=")[::2] for item in environment)
    env = {**image.env, **{k: str(v) for k, v in environment.items()}}
    return Container(service, [*entrypoint, *command], env, image.workdir)


def k8s_container(pod_spec: Mapping[str, Any], name: str, image: Image,
                  config_maps: Mapping[str, Mapping[str, str]]) -> Container:
    """Kubernetes: `command` replaces ENTRYPOINT (and then drops CMD), `args` replaces CMD;
    `env` adds to ENV (plain values only); configMap volumes become mounted files."""
    (c,) = [c for c in pod_spec["containers"] if c["name"] == name]
    if "command" in c:
        argv = [*c["command"], *c.get("args", [])]
    else:
        argv = [*image.entrypoint, *c.get("args", image.cmd)]
    env = dict(image.env)
    for item in c.get("env", []):
        assert "value" in item, f"{name}: env {item['name']} must be a plain value here"
        env[item["name"]] = str(item["value"])
    volumes = {v["name"]: v for v in pod_spec.get("volumes", [])}
    files = {}
    for mount in c.get("volumeMounts", []):
        volume = volumes[mount["name"]]
        assert "configMap" in volume, f"{name}: only configMap volumes are emulated"
        for key, content in config_maps[volume["configMap"]["name"]].items():
            files[f"{mount['mountPath'].rstrip('/')}/{key}"] = content
    return Container(name, argv, env, c.get("workingDir", image.workdir), files)


# -- localization ----------------------------------------------------------------------------
@dataclass
class Localizer:
    hosts: set[str]                      # names of other services / pods
    endpoints: dict[tuple[str, int], int]  # (host, port) -> local port
    own_ports: dict[int, int]            # this container's listening ports -> local ports
    paths: dict[str, Path]               # container path prefix -> local path
    bind_any: bool = True                # 0.0.0.0 -> 127.0.0.1 (False: read the container's own view)

    _HOST_PORT = re.compile(r"(?P<host>[A-Za-z0-9][A-Za-z0-9.-]*):(?P<port>\d+)")

    def value(self, text: str) -> str:
        if text == "0.0.0.0" and self.bind_any:
            return LOOPBACK
        for prefix in sorted(self.paths, key=len, reverse=True):
            if text == prefix or text.startswith(prefix.rstrip("/") + "/"):
                return str(self.paths[prefix]) + text[len(prefix.rstrip("/")):]
        return self._HOST_PORT.sub(self._endpoint, text)

    def text(self, content: str) -> str:
        """A mounted config file: every line localized."""
        return "".join(self.value(line[:-1]) + "\n" if line.endswith("\n") else self.value(line)
                       for line in content.splitlines(keepends=True))

    def _endpoint(self, m: re.Match[str]) -> str:
        host, port = m["host"], int(m["port"])
        is_ip = host.replace(".", "").isdigit()
        short = host if is_ip else host.split(".")[0]  # <svc>.<namespace>.svc.cluster.local
        if short not in self.hosts and host not in self.hosts:
            return m.group(0)
        key = (short, port) if (short, port) in self.endpoints else (host, port)
        assert key in self.endpoints, f"{host}:{port} is not served by any local stand-in"
        return f"{LOOPBACK}:{self.endpoints[key]}"

    def port(self, text: str) -> str:
        assert int(text) in self.own_ports, f"port {text} is not a port this container listens on"
        return str(self.own_ports[int(text)])

    def argv(self, argv: list[str]) -> list[str]:
        out = []
        for i, token in enumerate(argv):
            previous = argv[i - 1] if i else ""
            if previous.startswith("--") and previous.endswith("-port") and token.isdigit():
                out.append(self.port(token))
            elif token.startswith("--") and "=" in token:
                flag, _, value = token.partition("=")
                out.append(f"{flag}={self.port(value) if flag.endswith('-port') else self.value(value)}")
            else:
                out.append(self.value(token))
        return out

    def env(self, env: Mapping[str, str]) -> dict[str, str]:
        return {k: self.port(v) if k.endswith("_PORT") and v.isdigit() else self.value(v) for k, v in env.items()}


def executable(argv: list[str]) -> list[str]:
    """Drop the init shim and find the console script in this virtual environment."""
    if argv[:2] in (["tini", "--"], ["/usr/bin/tini", "--"]):
        argv = argv[2:]
    local = VENV_BIN / argv[0]
    assert local.exists(), f"{argv[0]}: not a console script of this project"
    return [str(local), *argv[1:]]


# -- processes -------------------------------------------------------------------------------
class LocalProcess:
    """One container's process: clean environment, own TMPDIR and HOME, a log file."""

    def __init__(self, name: str, argv: list[str], env: Mapping[str, str], cwd: Path, root: Path,
                 marker: str) -> None:
        self.name, self.argv, self.cwd, self.marker = name, argv, cwd, marker
        # A short TMPDIR: Ray's unix sockets live below it and may not exceed 107 bytes.
        self.tmpdir = Path(tempfile.mkdtemp(prefix="dt-"))
        self.home, self.log_path = root / "home", root / f"{name}.log"
        self.home.mkdir(parents=True, exist_ok=True)
        self.env = {"PATH": f"{VENV_BIN}:/usr/local/bin:/usr/bin:/bin", "HOME": str(self.home),
                    "TMPDIR": str(self.tmpdir), "LANG": "C.UTF-8", MARKER: marker,
                    # Keep Ray on loopback and one torch thread per process on this shared CPU;
                    # dspark serve sets both itself, the Ray CLI does not.
                    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "OMP_NUM_THREADS": "1", **env}
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> LocalProcess:
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(self.argv, cwd=self.cwd, env=self.env, stdout=log,
                                            stderr=subprocess.STDOUT, start_new_session=True)
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait_for(self, pattern: str, timeout_s: float) -> re.Match[str]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            found = re.search(pattern, self.log())
            if found:
                return found
            assert self.process is not None
            if self.process.poll() is not None:
                raise AssertionError(f"{self.name} exited with {self.process.returncode}:\n{self.log()[-6000:]}")
            time.sleep(0.5)
        raise AssertionError(f"{self.name}: no {pattern!r} after {timeout_s:.0f}s:\n{self.log()[-6000:]}")

    def terminate(self, grace_s: float) -> int:
        """SIGTERM, as `docker stop` / the kubelet send it; the exit status within `grace_s`."""
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            tail = self.log()[-6000:]
            raise AssertionError(f"{self.name} still running {grace_s:.0f}s after SIGTERM:\n{tail}") from None


    def remove_tmpdir(self) -> list[str]:
        """Empty the TMPDIR; returns what the process had left in it, which is moved next to
        its log for inspection (e.g. Ray's logs after a failed start)."""
        left = sorted(os.listdir(self.tmpdir)) if self.tmpdir.exists() else []
        if left:
            shutil.move(self.tmpdir, self.log_path.with_name(f"{self.name}-tmp-left"))
        shutil.rmtree(self.tmpdir, ignore_errors=True)
        return left


def new_marker() -> str:
    return uuid.uuid4().hex


def processes_with(marker: str) -> dict[int, str]:
    """pid -> command line of every live process whose environment carries `marker`
    (children inherit it, daemonized ones too)."""
    found = {}
    needle = f"{MARKER}={marker}".encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                stat = (entry / "stat").read_text()
                if stat.rsplit(")", 1)[1].split()[0] != "Z":  # zombies are gone, just not reaped
                    found[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()[:200]
        except OSError:
            continue
    return found


def wait_gone(marker: str, timeout_s: float) -> dict[int, str]:
    deadline = time.monotonic() + timeout_s
    while (left := processes_with(marker)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


def kill_all(marker: str) -> None:
    """Clean-up after a failed test: SIGKILL this test's own processes, by pid."""
    for pid in processes_with(marker):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
