"""The one settings object: every `TIDE_*` environment variable is read here."""

import re
import socket
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

_PASSWORD_PARAM = re.compile(r"(?i)(password=)[^&#]*")  # redis-py also takes ?password= in any URL scheme


def redacted(url: str) -> str:
    """The URL without its password (in the user part or a `password=` query parameter), for reprs, logs and
    error messages."""
    parts = urlsplit(url)
    if parts.password is not None:
        netloc = f"{parts.username or ''}:***@{parts.hostname or ''}" + (f":{parts.port}" if parts.port else "")
        url = urlunsplit(parts._replace(netloc=netloc))
    return _PASSWORD_PARAM.sub(r"\1***", url)


class TideSettings(BaseSettings):
    # hide_input_in_errors: a rejected TIDE_REDIS_URL may hold a password; errors name the field, not its value.
    model_config = SettingsConfigDict(env_prefix="TIDE_", extra="forbid", frozen=True, hide_input_in_errors=True)

    deployment: str = Field("default", description="TideDeployment name; with the namespace, the hash tag of every "
                            "Redis key")
    namespace: str = Field("default", description="Kubernetes namespace of the TideDeployment (`default` outside one)")
    pod_name: str = Field(default_factory=socket.gethostname,
                          description="this pod's name (downward API); the operator names canary pods by it")
    heartbeat_s: float = Field(5.0, gt=0, description="how often an engine writes its heartbeat; a heartbeat older "
                               "than 3 times this counts as gone")

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
    stream_retention_s: float = Field(
        86400.0, gt=0, description="hidden states older than this are trimmed (by entry id), acked or not: the "
        "time bound on captured data (docs/security.md)")
    stream_max_entry_mib: int = Field(
        64, gt=0, description="largest entry a writer sends or a reader decodes; a larger one is dropped (writer) "
        "or dead-lettered (reader)")
    stream_max_deliveries: int = Field(
        5, ge=1, description="deliveries of one entry without an ack (trainer restarts, claims) before it goes to "
        "the dead-letter stream")
    stream_dead_letter_mib: int = Field(16, gt=0, description="Redis memory the dead-letter stream may hold")

    # SGLang plugin (tide_sglang/plugin, docs/sglang.md).
    capture_sample_rate: float = Field(1.0, ge=0, le=1, description="share of requests whose rows are captured")
    capture_max_acceptance: float = Field(
        1.0, ge=0, le=1, description="hard-example filter: skip a request's step whose acceptance is above this")
    capture_ring_slots: int = Field(
        8, ge=1, le=4096, description="slab slots in flight between scheduler and capture helper; all busy: drop")
    capture_slot_mib: int = Field(
        16, ge=1, le=1024, description="bytes per slab slot: a decode batch's verify rows (batch x draft tokens x "
        "K*H x dtype size), or a piece of a prefill; a batch that does not fit is dropped and counted")
    stats_flush_s: float = Field(5.0, gt=0, description="how often acceptance counts go to the stats hash")
    swap_poll_s: float = Field(5.0, gt=0, description="how often the control key is read for a new version")
    swap_allow_vocab_change: bool = Field(
        False, description="accept a version whose d2t differs (hot_token_id is then copied in place)")
    sync_interval_batches: int = Field(16, ge=1, description="batches between TP-rank agreements (swap, steps)")
    engine_metrics_port: int = Field(
        0, ge=0, le=65535, description="Prometheus port of `tide engine`, the reference engine as a pod (0: off); "
        "SGLang pods serve the same tide_* series on SGLang's own /metrics")

    # Draft registry and online trainer (tide_sglang/draft, tide_sglang/trainer, docs/trainer.md).
    registry_dir: Path | None = Field(None, description="draft registry directory (a ReadWriteMany volume)")
    registry_url: str | None = Field(
        None, pattern=r"^(s3|file)://", description="draft registry as s3://bucket/prefix (endpoint and credentials "
        "from AWS_ENDPOINT_URL_S3, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY) or file:///path; instead of registry_dir")
    target: str = Field("smollm2-135m", description="target checkpoint dir: embedding, lm_head, norm for the draft")
    train_checkpoint_dir: Path | None = Field(None, description="trainer state, to resume after a restart")
    train_checkpoint_interval_s: float = Field(60.0, gt=0, description="entries are acked at each checkpoint")
    train_consumer: str = Field(default_factory=socket.gethostname, description="name in consumer group trainers")
    train_device: str = Field("auto", description="auto (cuda when present), cpu, cuda or cuda:N")
    train_gate: Literal["always", "trigger"] = Field(
        "always", description="trigger: train only while the ctl hash field `train` is not 0")
    train_ttt_steps: int = Field(5, ge=1, le=16, description="training-time-test depth = draft steps evaluated")
    train_chunk_len: int = Field(64, ge=4, description="rows per training sequence")
    train_batch_chunks: int = Field(16, ge=1, description="sequences per optimizer step")
    train_lr: float = Field(1e-4, gt=0, description="AdamW learning rate")
    train_weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    train_draft_vocab_size: int = Field(32000, ge=16, description="new lineages only: lm_head rows")
    train_vocab_warmup_rows: int = Field(20000, ge=1, description="rows counted before choosing the vocabulary")
    train_recent_chunks: int = Field(512, ge=1, description="per domain: window of the newest sequences")
    train_reservoir_chunks: int = Field(2048, ge=0, description="per domain: reservoir sample of older ones")
    train_heldout_fraction: float = Field(0.05, gt=0, lt=1, description="share of requests held out")
    train_heldout_chunks: int = Field(256, ge=1, description="newest held-out sequences kept for evaluation")
    train_eval_interval_steps: int = Field(200, ge=1, description="optimizer steps between publish decisions")
    train_publish_margin: float = Field(0.05, ge=0, description="acceptance length gain over deployed to publish")
    train_min_heldout_rows: int = Field(256, ge=1, description="fewer held-out rows: no publish decision")
    train_nice: int = Field(
        0, ge=0, le=19, description="niceness of the training thread: where the trainer shares CPU cores with serving "
        "(the CPU demo), the engine goes first and training takes what is left")
    train_metrics_port: int = Field(9400, ge=0, le=65535, description="Prometheus port of tide train (0: off)")

    # Speculation controller (tide_sglang/control, docs/controller.md).
    control_profile: Path | None = Field(
        None, description="JSON cost profile (control.Profile); when set, `tide serve` runs TIDE's controller for "
        "the speculation steps")
    control_profile_pending: bool = Field(
        False, description="the profile is being measured (`tide serve`'s start-up profile): until the file exists "
        "the controller is off, then it starts")
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
    control_step_time_alpha: float = Field(
        0.02, ge=0, le=1, description="weight of one measured decode-step time in the cost model's online "
        "correction, per batch-size bucket and step count (0: the profile as measured)"
    )
    control_window_steps: int = Field(
        512, gt=0, description="request verify steps per sample fed to the training trigger and detector"
    )
    # Training trigger (TIDE Algorithm 1); counts are in windows of control_window_steps.
    trigger_short_alpha: float = Field(0.2, gt=0, le=1, description="weight of a new window, short EWMA")
    trigger_long_alpha: float = Field(0.01, gt=0, le=1, description="weight of a new window, long EWMA")
    trigger_epsilon: float = Field(0.02, ge=0, description="smallest acceptance gap between the EWMAs that counts "
                                   "(the trigger widens it to 2 standard deviations of the windows' noise)")
    trigger_n_init: int = Field(20, ge=1, description="windows collected before the first decision")
    trigger_n_threshold: int = Field(10, ge=1, description="consecutive windows needed to change state")
    # Change-point detector (one-sided CUSUM on window acceptance): starts training at once on a drop.
    changepoint_min_drop: float = Field(0.1, gt=0, le=1, description="smallest acceptance drop to detect")
    changepoint_false_alarm_rate: float = Field(
        1e-4, gt=0, lt=0.5, description="false alarms per window allowed on a stationary signal"
    )
    changepoint_warmup: int = Field(50, ge=5, description="windows that estimate the baseline after a reset")

    @property
    def registry(self) -> str | None:
        """Where the draft registry is, as `draft.open_registry` takes it; None when neither variable is set."""
        return self.registry_url or (None if self.registry_dir is None else str(self.registry_dir))

    @model_validator(mode="after")
    def _one_registry(self) -> "TideSettings":
        if self.registry_dir is not None and self.registry_url is not None:
            raise ValueError("set one of TIDE_REGISTRY_DIR and TIDE_REGISTRY_URL, not both")
        return self

    @field_validator("redis_url")
    @classmethod
    def _scheme(cls, url: str) -> str:
        if not url.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(f"TIDE_REDIS_URL must start with redis://, rediss:// or unix://, got {redacted(url)!r}")
        return url

    def __repr_args__(self) -> Any:
        for name, value in super().__repr_args__():
            yield name, redacted(value) if name == "redis_url" else value
