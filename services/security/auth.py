"""API keys: a key file of hashed keys and the check a front runs on every request.

Key file: one `name:sha256$<64 hex>` per line; blank lines and `#` comments are ignored.
Only hashes are stored, so a leaked key file does not leak keys. Plain SHA-256 (no salt,
no slow KDF) is enough because keys are 256-bit random tokens made by `new_key`: salting
and stretching defend low-entropy passwords against guessing, which cannot work against a
256-bit secret, and a slow KDF would cost every request. Comparison is constant-time and
runs over every entry, so timing tells nothing about which (or whether a) prefix matched.
"""

from __future__ import annotations

import contextvars
import hashlib
import hmac
import os
import re
import secrets
from pathlib import Path

from dspark.errors import UserError

KEY_PREFIX = "dsk_"
HASH_SCHEME = "sha256"
NAME_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_HASH_RE = re.compile(r"sha256\$[0-9a-f]{64}")
MAX_TOKEN_LEN = 256
ANONYMOUS = "anonymous"  # the key name requests get when auth is off (rate limits still apply)

# The authenticated key name of the request being handled; set by the gRPC interceptor in
# the RPC's own task, so servicers can read it without a changed signature.
current_key_name: contextvars.ContextVar[str | None] = contextvars.ContextVar("dspark_key_name", default=None)


def new_key() -> str:
    """A fresh plaintext key: 32 random bytes, URL-safe, with a recognisable prefix."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_key(key: str) -> str:
    return f"{HASH_SCHEME}${hashlib.sha256(key.encode('utf-8')).hexdigest()}"


def parse_key_file(text: str, source: str = "key file") -> dict[str, str]:
    """Key file text -> {name: hash}; a malformed line is a UserError naming its number."""
    entries: dict[str, str] = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, digest = line.partition(":")
        if not sep or not NAME_RE.fullmatch(name) or not _HASH_RE.fullmatch(digest):
            raise UserError(f"{source}:{lineno}: expected `name:sha256$<64 hex>` (names: letters, digits, _.-)")
        if name in entries:
            raise UserError(f"{source}:{lineno}: duplicate key name {name!r}")
        entries[name] = digest
    return entries


def add_key(path: Path, name: str) -> str:
    """Append a new key named `name` to the key file (created 0600) and return its plaintext,
    which is stored nowhere: the caller shows it once."""
    if not NAME_RE.fullmatch(name):
        raise UserError(f"bad key name {name!r}: use 1-64 letters, digits, '_', '.', '-'")
    existing = parse_key_file(path.read_text(), str(path)) if path.exists() else {}
    if name in existing:
        raise UserError(f"{path} already has a key named {name!r}")
    key = new_key()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    with os.fdopen(fd, "a") as f:
        f.write(f"{name}:{hash_key(key)}\n")
    return key


class ApiKeyAuth:
    """`check(token) -> key name | None` against a fixed set of hashed keys."""

    def __init__(self, entries: dict[str, str]) -> None:
        if not entries:
            raise UserError("the API key file holds no keys: every request would be refused")
        # (name, digest bytes) pairs; compare_digest wants equal-type operands.
        self._entries = [(name, digest.encode("ascii")) for name, digest in entries.items()]

    @classmethod
    def from_file(cls, path: str | Path) -> ApiKeyAuth:
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as e:
            raise UserError(f"cannot read API key file {path}: {e.strerror}") from None
        return cls(parse_key_file(text, str(path)))

    @property
    def names(self) -> list[str]:
        return [name for name, _ in self._entries]

    def check(self, token: str | None) -> str | None:
        if not token or len(token) > MAX_TOKEN_LEN or not token.isascii():
            return None
        digest = hash_key(token).encode("ascii")
        found = None
        for name, stored in self._entries:  # no early exit: constant work per request
            if hmac.compare_digest(digest, stored):
                found = name
        return found

    def check_bearer(self, header: str | None) -> str | None:
        """`Authorization: Bearer <key>` header value -> key name | None."""
        return self.check(bearer_token(header))


def bearer_token(header: str | None) -> str | None:
    if not header:
        return None
    scheme, _, token = header.strip().partition(" ")
    return token.strip() if scheme.lower() == "bearer" else None
