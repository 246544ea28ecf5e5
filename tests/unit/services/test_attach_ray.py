"""`dspark serve --attach` through Ray Client retries a head whose per-client server died
while starting (seen in CI on a loaded machine), and still fails loudly in the end."""
from __future__ import annotations

from typing import Any

import pytest

from services import launcher


class FlakyInit:
    def __init__(self, failures: int, error: Exception) -> None:
        self.failures, self.error, self.calls = failures, error, []

    def __call__(self, **kwargs: Any) -> None:
        self.calls.append(kwargs)
        if len(self.calls) <= self.failures:
            raise self.error


@pytest.fixture
def no_sleep(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    waits: list[float] = []
    monkeypatch.setattr(launcher.time, "sleep", waits.append)
    monkeypatch.setattr(launcher.ray, "shutdown", lambda: None)
    return waits


def test_client_attach_retries_with_growing_waits(monkeypatch: pytest.MonkeyPatch, no_sleep: list[float],
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    init = FlakyInit(2, ConnectionAbortedError("Initialization failure from server:\nStarting Ray client "
                                               "server failed."))
    monkeypatch.setattr(launcher, "_init_ray", init)
    launcher._attach_ray("ray://head:10001", attempts=4, first_wait_s=5.0)
    assert len(init.calls) == 3 and all(c == {"address": "ray://head:10001", "namespace": "dspark"}
                                        for c in init.calls)
    assert no_sleep == [5.0, 10.0]
    err = capsys.readouterr().err
    assert "attempt 2 of 4" in err and "attempt 3 of 4" in err and "Starting Ray client server failed." in err


def test_client_attach_gives_up_after_the_last_attempt(monkeypatch: pytest.MonkeyPatch,
                                                       no_sleep: list[float]) -> None:
    init = FlakyInit(10, ConnectionAbortedError("nope"))
    monkeypatch.setattr(launcher, "_init_ray", init)
    with pytest.raises(ConnectionAbortedError):
        launcher._attach_ray("ray://head:10001", attempts=3, first_wait_s=1.0)
    assert len(init.calls) == 3 and no_sleep == [1.0, 2.0]


def test_gcs_address_is_not_retried(monkeypatch: pytest.MonkeyPatch, no_sleep: list[float]) -> None:
    """A GCS address (`host:port`) is a driver on the cluster's own network: its failure
    is not the client server's start-up race, so it surfaces at once."""
    init = FlakyInit(1, ConnectionError("refused"))
    monkeypatch.setattr(launcher, "_init_ray", init)
    with pytest.raises(ConnectionError):
        launcher._attach_ray("127.0.0.1:6379")
    assert len(init.calls) == 1 and no_sleep == []


def test_a_programming_error_is_not_retried(monkeypatch: pytest.MonkeyPatch, no_sleep: list[float]) -> None:
    init = FlakyInit(1, TypeError("bad kwarg"))
    monkeypatch.setattr(launcher, "_init_ray", init)
    with pytest.raises(TypeError):
        launcher._attach_ray("ray://head:10001")
    assert len(init.calls) == 1


def test_a_failed_init_keeps_the_process_sigterm_handler(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ray installs its own SIGTERM handler (sys.exit) inside ray.init, also when the connect
    then fails; the router's handler must be back after a failed attempt, or the retry that
    succeeds leaves the process exiting 15 on SIGTERM instead of stopping gracefully."""
    import signal

    def ours(signum: int, frame: Any) -> None:  # pragma: no cover - never delivered
        pass

    def ray_init(**kwargs: Any) -> None:
        signal.signal(signal.SIGTERM, lambda *_: None)  # what Ray does
        raise ConnectionAbortedError("Starting Ray client server failed.")

    previous = signal.signal(signal.SIGTERM, ours)
    try:
        monkeypatch.setattr(launcher.ray, "init", ray_init)
        with pytest.raises(ConnectionAbortedError):
            launcher._init_ray(address="ray://head:10001")
        assert signal.getsignal(signal.SIGTERM) is ours
    finally:
        signal.signal(signal.SIGTERM, previous)
