"""`dspark serve` security flags -> FleetConfig.security (no fleet started)."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from dspark.commands import serve
from dspark.errors import UserError
from services.config import load_config
from services.security.auth import add_key


def _args(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    serve.add_arguments(p)
    return p.parse_args(list(argv))


def test_no_flags_keep_the_config(tmp_path: Path) -> None:
    cfg = load_config(None)
    assert serve.apply_security_flags(cfg, _args()) is cfg
    assert cfg.security.api_key_file is None and cfg.security.tls_cert_file is None


def test_flags_override_the_yaml_section(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    add_key(keys, "ci")
    (tmp_path / "fleet.yaml").write_text("security: {rate_limit_per_s: 5, max_messages: 7}\n")
    cfg = serve.apply_security_flags(load_config(tmp_path / "fleet.yaml"),
                                     _args("--api-key-file", str(keys), "--rate-limit", "9"))
    assert cfg.security.api_key_file == keys
    assert cfg.security.rate_limit_per_s == 9 and cfg.security.max_messages == 7


def test_bad_flags_are_user_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="go together"):
        serve.apply_security_flags(load_config(None), _args("--tls-cert", "c.pem"))
    with pytest.raises(UserError, match="cannot read API key file"):
        serve.apply_security_flags(load_config(None), _args("--api-key-file", str(tmp_path / "missing")))
    with pytest.raises(UserError, match="invalid fleet config"):
        load_config(None, security={"unknown": 1})
