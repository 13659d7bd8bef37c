"""Published versions, `tide:{<ns>/<dep>}:events`: the trainer appends one entry per version it published to the
registry; the operator reads them (and the demo, where no operator runs).

Entry fields: `version` (integer), `parent` (integer, or empty for none), `metrics` (a JSON object of numbers).
"""

import json
import logging

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tide_sglang import keys
from tide_sglang.rollout.common import fields_of, text
from tide_sglang.stream.connection import Client

log = logging.getLogger("tide.rollout.events")

MAXLEN = 1000  # entries kept (approximately): the operator reads them within seconds, a restart resumes by id


class Published(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    version: int = Field(ge=0)
    parent: int | None = Field(None, ge=0)
    metrics: dict[str, float] = Field(default_factory=dict, description="held-out evaluation, numbers only")

    def to_entry(self) -> dict[str, str]:
        return {"version": str(self.version), "parent": "" if self.parent is None else str(self.parent),
                "metrics": json.dumps(self.metrics)}

    @classmethod
    def from_entry(cls, raw: dict) -> "Published":
        fields = fields_of(raw)
        values: dict[str, object] = dict(fields)
        if fields.get("parent") == "":
            values["parent"] = None
        if "metrics" in fields:
            metrics = json.loads(fields["metrics"])
            if not isinstance(metrics, dict) or any(isinstance(v, bool | str) for v in metrics.values()):
                raise ValueError(f"metrics must be a JSON object of numbers, got {fields['metrics']!r}")
            values["metrics"] = metrics
        return cls.model_validate(values)


def append_event(client: Client, namespace: str, deployment: str, event: Published) -> str:
    """The new entry's id."""
    return text(client.xadd(keys.events(namespace, deployment), event.to_entry(), maxlen=MAXLEN, approximate=True))


def read_events(client: Client, namespace: str, deployment: str, after: str = "0-0",
                count: int = 100) -> list[tuple[str, Published]]:
    """Entries after the id `after` (exclusive), oldest first. A malformed entry is logged and skipped, so it
    never blocks the versions published after it."""
    return read_event_page(client, namespace, deployment, after, count)[0]


def read_event_page(client: Client, namespace: str, deployment: str, after: str = "0-0",
                    count: int = 100) -> tuple[list[tuple[str, Published]], str]:
    """`read_events` plus the id of the last entry read, malformed ones included: the cursor to continue from,
    so a malformed last entry is not read (and logged) again."""
    out, last = [], after
    for entry_id, raw in client.xrange(keys.events(namespace, deployment), min=f"({after}", count=count):
        last = text(entry_id)
        try:
            out.append((last, Published.from_entry(raw)))
        except (ValueError, TypeError, ValidationError) as e:
            log.warning("skipping malformed events entry %s %r: %s", last, fields_of(raw), e)
    return out, last
