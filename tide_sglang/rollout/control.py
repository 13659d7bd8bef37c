"""The control state, `tide:{<ns>/<dep>}:ctl`: written by the operator (the demo and `scripts/gpu/` where none
runs), read by engines and the trainer.

Fields: `stable` and `canary` (versions; `canary` absent when no canary runs), `canary_pods` (a JSON list of
pod names), `train` and `collect` (`1` or `0`). A missing field takes its default; an unknown field or a
malformed value raises `RolloutError`, so a writer that drifts from the protocol fails loudly.
"""

import json
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tide_sglang import keys
from tide_sglang.rollout.common import RolloutError, fields_of
from tide_sglang.stream.connection import Client

Role = Literal["stable", "canary"]


class ControlState(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    stable: int = Field(0, ge=0, description="version every pod not named a canary loads (0: the imported draft)")
    canary: int | None = Field(None, ge=0, description="version the canary pods load; None: no canary")
    canary_pods: tuple[str, ...] = Field((), description="pod names (TIDE_POD_NAME) that load the canary")
    train: bool = Field(True, description="the trainer trains (off: it keeps reading but takes no steps)")
    collect: bool = Field(True, description="engines capture hidden states")

    def role_of(self, pod: str) -> Role:
        return "canary" if self.canary is not None and pod in self.canary_pods else "stable"

    def version_for(self, pod: str) -> int:
        return self.canary if self.role_of(pod) == "canary" else self.stable  # type: ignore[return-value]

    def to_hash(self) -> dict[str, str]:
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
    """Replace the whole hash in one transaction, so no reader sees a field left over from an earlier state."""
    key = keys.control(namespace, deployment)
    pipe = client.pipeline(transaction=True)
    pipe.delete(key)
    pipe.hset(key, mapping=state.to_hash())
    pipe.execute()


def delete_control(client: Client, namespace: str, deployment: str) -> None:
    """No control state: every engine keeps serving what it has (scripts that drive engines by hand)."""
    client.delete(keys.control(namespace, deployment))
