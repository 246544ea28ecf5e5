"""API keys: hashed key file, check, and the `dspark keys` command."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from dspark.cli import main
from dspark.errors import UserError
from services.security.auth import ApiKeyAuth, add_key, bearer_token, hash_key, parse_key_file


def test_add_and_check(tmp_path: Path) -> None:
    path = tmp_path / "keys"
    alice, bob = add_key(path, "alice"), add_key(path, "bob")
    text = path.read_text()
    assert alice not in text and bob not in text  # only hashes on disk
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    auth = ApiKeyAuth.from_file(path)
    assert auth.check(alice) == "alice" and auth.check(bob) == "bob"
    for bad in (None, "", alice + "x", alice[:-1], "é" * 10, "x" * 1000):
        assert auth.check(bad) is None
    assert auth.check_bearer(f"Bearer {alice}") == "alice"
    assert auth.check_bearer(f"bearer  {bob} ") == "bob"
    assert auth.check_bearer(alice) is None and auth.check_bearer(f"Basic {alice}") is None
    with pytest.raises(UserError, match="already has"):
        add_key(path, "alice")
    with pytest.raises(UserError, match="bad key name"):
        add_key(path, "no spaces")


def test_key_file_errors(tmp_path: Path) -> None:
    good = f"# comment\n\nalice:{hash_key('k')}\n"
    assert parse_key_file(good) == {"alice": hash_key("k")}
    for bad, match in [("alice", ":1:"), ("alice:md5$abc", ":1:"), (f"a b:{hash_key('k')}", ":1:"),
                       (f"{good}alice:{hash_key('j')}", "duplicate")]:
        with pytest.raises(UserError, match=match):
            parse_key_file(bad)
    with pytest.raises(UserError, match="no keys"):
        ApiKeyAuth({})
    with pytest.raises(UserError, match="cannot read"):
        ApiKeyAuth.from_file(tmp_path / "missing")


def test_bearer_token() -> None:
    assert bearer_token("Bearer abc") == "abc"
    assert bearer_token(None) is None and bearer_token("Token abc") is None


def test_keys_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "k"
    assert main(["keys", "add", "--file", str(path), "--name", "ci", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["name"] == "ci" and ApiKeyAuth.from_file(path).check(out["key"]) == "ci"
    assert main(["keys", "add", "--file", str(path), "--name", "ci"]) == 2  # duplicate: one-line error
    assert "already has" in capsys.readouterr().err
    assert main(["keys", "list", "--file", str(path)]) == 0
    assert capsys.readouterr().out.split() == ["ci"]
