"""`dspark serve` security flags -> FleetConfig.security (no fleet started)."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from dspark.commands import serve
from dspark.errors import UserError
from services.security.auth import ApiKeyAuth, add_key
from services.settings import resolve


def _settings(*argv: str, environ: dict[str, str] | None = None):  # type: ignore[no-untyped-def]
    p = argparse.ArgumentParser()
    serve.add_arguments(p)
    return resolve(p.parse_args(list(argv)), environ or {})


def test_no_flags_keep_the_config(tmp_path: Path) -> None:
    (tmp_path / "fleet.yaml").write_text("security: {rate_limit_per_s: 5, max_messages: 7}\n")
    sec = _settings("--config", str(tmp_path / "fleet.yaml")).fleet.security
    assert sec.api_key_file is None and sec.tls_cert_file is None
    assert sec.rate_limit_per_s == 5 and sec.max_messages == 7


def test_flags_override_the_yaml_section(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    add_key(keys, "ci")
    (tmp_path / "fleet.yaml").write_text("security: {rate_limit_per_s: 5, max_messages: 7}\n")
    sec = _settings("--config", str(tmp_path / "fleet.yaml"), "--api-key-file", str(keys),
                    "--rate-limit", "9").fleet.security
    assert Path(sec.api_key_file) == keys
    assert sec.rate_limit_per_s == 9 and sec.max_messages == 7  # the flag wins, the rest of the YAML stays


def test_environment_sets_security_and_flags_win(tmp_path: Path) -> None:
    sec = _settings("--rate-limit", "3", environ={"DSPARK_RATE_LIMIT": "8"}).fleet.security
    assert sec.rate_limit_per_s == 3
    assert _settings(environ={"DSPARK_RATE_LIMIT": "8"}).fleet.security.rate_limit_per_s == 8


def test_bad_flags_are_user_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="go together"):
        _settings("--tls-cert", "c.pem")
    with pytest.raises(UserError, match="--rate-limit"):
        _settings("--rate-limit", "fast")
    with pytest.raises(UserError, match="cannot read API key file"):  # what `dspark serve` checks before starting
        ApiKeyAuth.from_file(_settings("--api-key-file", str(tmp_path / "missing")).fleet.security.api_key_file)
