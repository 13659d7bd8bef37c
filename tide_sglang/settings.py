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

    # Speculation controller (tide_sglang/control, docs/controller.md).
    control_max_steps: int = Field(5, ge=1, le=16, description="k: the policy picks draft steps in 0..k")
    control_prior_acceptance: float = Field(
        0.7, ge=0, le=1, description="per-token acceptance assumed for a version not yet measured"
    )
    control_half_life_steps: float = Field(
        2048, gt=0, description="acceptance EWMA half-life, in request verify steps (batch-size independent)"
    )
    control_switch_margin: float = Field(
        0.03, ge=0, description="a new step count must beat the current one's predicted speedup by this ratio"
    )
    control_switch_patience: int = Field(8, ge=1, description="...for this many consecutive decisions")
    control_probe_interval: int = Field(
        512, ge=0, description="while off for low acceptance, speculate once every N decisions (0: never)"
    )
    control_window_steps: int = Field(
        512, gt=0, description="request verify steps per sample fed to the training trigger and detector"
    )
    # Training trigger (TIDE Algorithm 1); counts are in windows of control_window_steps.
    trigger_short_alpha: float = Field(0.2, gt=0, le=1, description="weight of a new window, short EWMA")
    trigger_long_alpha: float = Field(0.01, gt=0, le=1, description="weight of a new window, long EWMA")
    trigger_epsilon: float = Field(0.02, ge=0, description="acceptance gap between the EWMAs that counts")
    trigger_n_init: int = Field(20, ge=1, description="windows collected before the first decision")
    trigger_n_threshold: int = Field(10, ge=1, description="consecutive windows needed to change state")
    # Change-point detector (one-sided CUSUM on window acceptance): starts training at once on a drop.
    changepoint_min_drop: float = Field(0.1, gt=0, le=1, description="smallest acceptance drop to detect")
    changepoint_false_alarm_rate: float = Field(
        1e-4, gt=0, lt=0.5, description="false alarms per window allowed on a stationary signal"
    )
    changepoint_warmup: int = Field(50, ge=5, description="windows that estimate the baseline after a reset")

    @field_validator("redis_url")
    @classmethod
    def _scheme(cls, url: str) -> str:
        if not url.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(f"TIDE_REDIS_URL must start with redis://, rediss:// or unix://, got {url!r}")
        return url
