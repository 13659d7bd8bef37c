"""The control state, `tide:{<ns>/<dep>}:ctl`: written by the operator (the demo and `scripts/gpu/` where none
runs), read by engines and the trainer.

Fields: `stable` and `canary` (versions; `canary` absent when no canary runs), `canary_pods` (a JSON list of
pod names), `train` and `collect` (`1` or `0`): the routing, which `write_control` replaces as a whole. And
`force:<pod>` (draft steps that pod runs at every batch size), which `tide profile` writes alone
(`write_forced_steps`) while it times the pod, and which `write_control` leaves as they are, so an operator's
reconcile never cuts a profile short. A missing field takes its default; an unknown field or a malformed value
raises `RolloutError`, so a writer that drifts from the protocol fails loudly.
"""

import json
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from tide_sglang import keys
from tide_sglang.rollout.common import RolloutError, fields_of
from tide_sglang.stream.connection import Client

Role = Literal["stable", "canary"]
ROUTING = ("stable", "canary", "canary_pods", "train", "collect")  # the fields write_control replaces
FORCE = "force:"  # prefix of the per-pod forced-steps fields


class ControlState(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    stable: int = Field(0, ge=0, description="version every pod not named a canary loads (0: the imported draft)")
    canary: int | None = Field(None, ge=0, description="version the canary pods load; None: no canary")
    canary_pods: tuple[str, ...] = Field((), description="pod names (TIDE_POD_NAME) that load the canary")
    train: bool = Field(True, description="the trainer trains (off: it keeps reading but takes no steps)")
    collect: bool = Field(True, description="engines capture hidden states")
    force_steps: dict[str, int] = Field(default_factory=dict, description="pod name -> draft steps it runs at "
                                        "every batch size, whatever its controller says (`tide profile`)")

    @field_validator("force_steps")
    @classmethod
    def _steps(cls, forced: dict[str, int]) -> dict[str, int]:
        if any(g < 0 for g in forced.values()):
            raise ValueError(f"forced draft steps must be >= 0, got {forced}")
        return forced

    def role_of(self, pod: str) -> Role:
        return "canary" if self.canary is not None and pod in self.canary_pods else "stable"

    def version_for(self, pod: str) -> int:
        return self.canary if self.role_of(pod) == "canary" else self.stable  # type: ignore[return-value]

    def forced_steps(self, pod: str) -> int | None:
        """Draft steps `pod` must run now (None: its controller, or SGLang, decides)."""
        return self.force_steps.get(pod)

    def to_hash(self) -> dict[str, str]:
        """The routing fields (ROUTING); the forced steps have their own writer."""
        out = {"stable": str(self.stable), "canary_pods": json.dumps(list(self.canary_pods)),
               "train": str(int(self.train)), "collect": str(int(self.collect))}
        if self.canary is not None:
            out["canary"] = str(self.canary)
        return out

    @classmethod
    def from_hash(cls, raw: dict) -> "ControlState":
        fields = fields_of(raw)
        try:
            values: dict[str, object] = dict(fields)
            if "canary_pods" in fields:
                values["canary_pods"] = tuple(json.loads(fields["canary_pods"]))
            forced = {k: v for k, v in fields.items() if k.startswith(FORCE)}
            for k in forced:
                del values[k]
            if forced:
                values["force_steps"] = {k.removeprefix(FORCE): int(v) for k, v in forced.items()}
            for flag in ("train", "collect"):
                if flag in fields and fields[flag] not in ("0", "1"):
                    raise ValueError(f"{flag} must be 0 or 1, got {fields[flag]!r}")
            return cls.model_validate(values)
        except (ValueError, TypeError, ValidationError) as e:  # JSONDecodeError is a ValueError
            raise RolloutError(f"malformed control hash {fields!r}: {e}") from None


def read_control(client: Client, namespace: str, deployment: str) -> ControlState | None:
    """None when the key is absent (no operator has written it yet)."""
    raw = client.hgetall(keys.control(namespace, deployment))
    return ControlState.from_hash(raw) if raw else None


def write_control(client: Client, namespace: str, deployment: str, state: ControlState) -> None:
    """Replace the routing in one transaction, so no reader sees a routing field left over from an earlier state;
    `force_steps` stays as it is (its writer is `write_forced_steps`)."""
    key = keys.control(namespace, deployment)
    pipe = client.pipeline(transaction=True)
    pipe.hdel(key, *ROUTING)
    pipe.hset(key, mapping=state.to_hash())
    pipe.execute()


def write_forced_steps(client: Client, namespace: str, deployment: str, pod: str, steps: int | None) -> None:
    """Force `pod` to run `steps` draft steps at every batch size (None: release it): one field per pod, so two
    profilers forcing two pods at once never overwrite each other."""
    if steps is not None and steps < 0:
        raise ValueError(f"forced draft steps must be >= 0, got {steps}")
    key = keys.control(namespace, deployment)
    if steps is None:
        client.hdel(key, FORCE + pod)
    else:
        client.hset(key, FORCE + pod, str(steps))


def delete_control(client: Client, namespace: str, deployment: str) -> None:
    """No control state: every engine keeps serving what it has (scripts that drive engines by hand)."""
    client.delete(keys.control(namespace, deployment))
