"""Per-pod heartbeats, `tide:{<ns>/<dep>}:pods`: one field per pod (its name), a JSON `Heartbeat`. Every engine
writes its own every `TIDE_HEARTBEAT_S`; the operator reads them to know which pods serve which version. A
heartbeat older than 3 x `TIDE_HEARTBEAT_S` counts as gone (the pod died or was scaled away)."""

import logging
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tide_sglang import keys
from tide_sglang.rollout.common import fields_of
from tide_sglang.rollout.control import Role
from tide_sglang.stream.connection import Client

log = logging.getLogger("tide.rollout.heartbeat")

STALE_AFTER = 3  # heartbeat periods


class Heartbeat(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    pod: str = Field(min_length=1, description="TIDE_POD_NAME")
    role: Role = Field(description="the role the control state gives this pod")
    version: int = Field(ge=0, description="draft version loaded and serving")
    swap_failures: int = Field(0, ge=0, description="failed swaps since the engine started")
    trigger: dict[str, float | bool | str] = Field(default_factory=dict, description="training trigger state")
    time: float = Field(description="unix seconds when written")

    def wants(self, flag: Literal["train", "collect"]) -> bool | None:
        """The trigger's vote for training or capture (`TrainingTrigger.report()`); None when the engine runs no
        trigger (the SGLang plugin without TIDE_CONTROL_PROFILE)."""
        vote = self.trigger.get(flag)
        return vote if isinstance(vote, bool) else None


def write_heartbeat(client: Client, namespace: str, deployment: str, beat: Heartbeat) -> None:
    client.hset(keys.pods(namespace, deployment), beat.pod, beat.model_dump_json())


def read_heartbeats(client: Client, namespace: str, deployment: str, *, now: float,
                    heartbeat_s: float) -> dict[str, Heartbeat]:
    """The live heartbeats by pod name; malformed fields are logged and skipped."""
    out = {}
    for pod, raw in fields_of(client.hgetall(keys.pods(namespace, deployment))).items():
        try:
            beat = Heartbeat.model_validate_json(raw)
            if beat.pod != pod:
                raise ValueError(f"field {pod!r} holds the heartbeat of {beat.pod!r}")
        except (ValueError, ValidationError) as e:
            log.warning("skipping malformed heartbeat of %s %r: %s", pod, raw, e)
            continue
        if beat.time >= now - STALE_AFTER * heartbeat_s:
            out[pod] = beat
    return out
