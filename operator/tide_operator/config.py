"""The operator's own settings (`TIDE_OPERATOR_*`), read once at import: kopf fixes a timer's interval
when the handler is registered."""

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

FINALIZER = "tide.dev/finalizer"


class OperatorSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TIDE_OPERATOR_", extra="forbid", frozen=True)

    interval_s: float = Field(10.0, gt=0, description="reconcile every TideDeployment this often")
    redis_timeout_s: float = Field(3.0, gt=0, description="connect/read timeout towards Redis")
    events_batch: int = Field(100, ge=1, description="events entries read per pass")
    metrics_port: int = Field(9401, ge=0, le=65535, description="Prometheus port of the operator's rollout-state "
                              "gauges, tide_tidedeployment_* and tide_draftversion_* (0: off)")
    namespace: str | None = Field(None, description="the operator pod's namespace (downward API): the managed "
                                  "Redis's NetworkPolicy admits operator pods from it only; unset: from any")
