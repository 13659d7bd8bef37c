"""The rollout protocol between trainer, operator and engines through Redis (DESIGN.md, "Fixed names"), one
owner per fact: control state (`control`), published versions (`events`), per-version stats (`stats`), per-pod
heartbeats (`heartbeat`). Nothing else reads or writes those keys. Torch-free: the operator imports it.
docs/rollout.md describes the protocol."""

from tide_sglang import keys
from tide_sglang.rollout.common import UNAVAILABLE, RolloutError
from tide_sglang.rollout.control import (
    ControlState,
    Role,
    delete_control,
    read_control,
    write_control,
    write_forced_steps,
)
from tide_sglang.rollout.events import Published, append_event, read_event_page, read_events
from tide_sglang.rollout.heartbeat import Heartbeat, read_heartbeats, write_heartbeat
from tide_sglang.rollout.stats import COUNTS, Stats, StatsReporter, add_stats, read_stats
from tide_sglang.stream.connection import Client


def delete_deployment_keys(client: Client, namespace: str, deployment: str) -> None:
    """Every key of the deployment, stats of every version included (what the operator does on delete).
    One key per call: under a Redis Cluster they share a slot anyway."""
    stale = [*keys.all_fixed(namespace, deployment),
             *client.scan_iter(match=keys.stats_pattern(namespace, deployment), count=1000)]
    for key in stale:
        client.delete(key)


__all__ = [
    "COUNTS", "UNAVAILABLE", "ControlState", "Heartbeat", "Published", "Role", "RolloutError", "Stats",
    "StatsReporter", "add_stats", "append_event", "delete_control", "delete_deployment_keys", "read_control",
    "read_event_page", "read_events", "read_heartbeats", "read_stats", "write_control", "write_forced_steps",
    "write_heartbeat",
]
