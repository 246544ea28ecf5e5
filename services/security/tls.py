"""TLS for the public fronts, from PEM files (certificate chain + private key).

gRPC and aiohttp take different credential objects; both are built here so `dspark serve
--tls-cert C --tls-key K` means the same on both ports. An optional client CA turns on
mutual TLS (clients must present a certificate signed by it).
"""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any

from dspark.errors import UserError


def _read(path: str | Path, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise UserError(f"cannot read TLS {what} {path}: {e.strerror}") from None


def grpc_server_credentials(cert_file: str | Path, key_file: str | Path,
                            client_ca_file: str | Path | None = None) -> Any:
    """-> grpc.ServerCredentials for `server.add_secure_port(addr, creds)`."""
    import grpc

    ca = _read(client_ca_file, "client CA") if client_ca_file else None
    return grpc.ssl_server_credentials([(_read(key_file, "key"), _read(cert_file, "certificate"))],
                                       root_certificates=ca, require_client_auth=ca is not None)


def grpc_channel_credentials(ca_file: str | Path | None = None) -> Any:
    """-> grpc.ChannelCredentials trusting `ca_file` (or the system roots when None)."""
    import grpc

    return grpc.ssl_channel_credentials(root_certificates=_read(ca_file, "CA") if ca_file else None)


def http_server_context(cert_file: str | Path, key_file: str | Path,
                        client_ca_file: str | Path | None = None) -> ssl.SSLContext:
    """-> ssl.SSLContext for `web.TCPSite(runner, host, port, ssl_context=ctx)`."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(str(cert_file), str(key_file))
        if client_ca_file:
            ctx.load_verify_locations(str(client_ca_file))
            ctx.verify_mode = ssl.CERT_REQUIRED
    except (OSError, ssl.SSLError) as e:
        raise UserError(f"cannot load TLS certificate/key ({cert_file}, {key_file}): {e}") from None
    return ctx


def http_client_context(ca_file: str | Path | None = None) -> ssl.SSLContext:
    """-> ssl.SSLContext for clients (load test, tests) trusting `ca_file`."""
    return ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
