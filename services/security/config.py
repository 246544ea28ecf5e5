"""Edge-security settings of the router (`FleetConfig.security`): API keys, TLS, rate limit
and request-size limits. Pure pydantic, so `services.config` can hold it without importing
the router (which imports the config)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class SecurityConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    api_key_file: Path | None = Field(None, description="`name:sha256$hash` lines (`dspark keys add`); "
                                      "None: no authentication")
    tls_cert_file: Path | None = Field(None, description="PEM certificate chain for both public ports")
    tls_key_file: Path | None = Field(None, description="PEM private key of tls_cert_file")
    tls_client_ca_file: Path | None = Field(None, description="PEM CA: require client certificates (mTLS)")
    rate_limit_per_s: float | None = Field(None, gt=0, description="requests per second per API key, "
                                           "shared by all routers through Redis; None: no limit")
    rate_limit_burst: int = Field(20, ge=1, description="requests a key may send at once after idling")
    max_prompt_bytes: int = Field(1 << 20, ge=1, description="UTF-8 bytes of a prompt (text or messages)")
    max_messages: int = Field(1024, ge=1, description="chat messages per request")

    def model_post_init(self, _: Any) -> None:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("tls_cert_file and tls_key_file go together")
        if self.tls_client_ca_file is not None and self.tls_cert_file is None:
            raise ValueError("tls_client_ca_file needs tls_cert_file and tls_key_file")
