"""`dspark client --prompt` and `dspark generate --prompt` mean the same: a chat message by
default, a plain completion prompt with `--raw`."""

from __future__ import annotations

import argparse

import pytest

from dspark.commands import client, generate
from dspark.errors import UserError


def client_args(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    client.add_arguments(p)
    return p.parse_args(["--prompt", "Hi", *argv])


def test_client_sends_chat_by_default_and_raw_on_request() -> None:
    req = client.build_request(client_args())
    assert req.WhichOneof("prompt") == "messages"
    assert [(m.role, m.content) for m in req.messages.messages] == [("user", "Hi")]
    req = client.build_request(client_args("--system", "Be brief.", "--stop", "\n", "--stop", "."))
    assert [m.role for m in req.messages.messages] == ["system", "user"] and list(req.stop.stop) == ["\n", "."]
    raw = client.build_request(client_args("--raw"))
    assert raw.WhichOneof("prompt") == "text" and raw.text == "Hi"
    with pytest.raises(UserError):
        client.build_request(client_args("--raw", "--system", "x"))


def test_generate_has_the_same_switch() -> None:
    p = argparse.ArgumentParser()
    generate.add_arguments(p)
    assert p.parse_args(["--prompt", "Hi"]).raw is False
    assert p.parse_args(["--prompt", "Hi", "--raw", "--stop", "x"]).raw is True
