"""The one settings object: every `TIDE_*` environment variable is read here."""

from pathlib import Path

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class TideSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TIDE_", extra="forbid", frozen=True)

    deployment: str = Field("default", description="TideDeployment name; the hash tag of every Redis key")

    # Redis connection. The password may come from the URL, TIDE_REDIS_PASSWORD, or a mounted secret file.
    redis_url: str = Field("redis://127.0.0.1:6379/0", description="redis:// or rediss:// (TLS) URL")
    redis_password: SecretStr | None = Field(None, description="overrides a password in the URL")
    redis_password_file: Path | None = Field(None, description="file holding the password (a Secret mount)")
    redis_cluster: bool = Field(False, description="the URL names one node of a Redis Cluster")
    redis_tls_ca_file: Path | None = Field(None, description="CA bundle to verify the server (rediss://)")
    redis_tls_cert_file: Path | None = Field(None, description="client certificate for mutual TLS")
    redis_tls_key_file: Path | None = Field(None, description="client key for mutual TLS")
    redis_tls_verify: bool = Field(True, description="verify the server certificate and host name")
    redis_timeout_s: float = Field(5.0, gt=0, description="socket connect/read timeout")

    # Hidden-state stream.
    stream_budget_mib: int = Field(1024, gt=0, description="Redis memory the stream may hold (MAXLEN ~)")
    stream_queue_entries: int = Field(64, gt=0, description="writer queue; a full queue drops, never blocks")

    @field_validator("redis_url")
    @classmethod
    def _scheme(cls, url: str) -> str:
        if not url.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(f"TIDE_REDIS_URL must start with redis://, rediss:// or unix://, got {url!r}")
        return url
