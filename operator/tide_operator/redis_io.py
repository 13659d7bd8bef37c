"""The Redis adapter: the operator's side of the rollout protocol, all of it through `tide_sglang.rollout` (the one
owner of the keys, their fields and their parsing; DESIGN.md, "Fixed names").

The operator reads the published versions (events), the per-version stats and the pods' heartbeats, and
writes the control state. This module only connects and converts to the operator's own types.
"""

import time
from collections.abc import Iterable

from tide_operator.models import Counters
from tide_sglang import rollout
from tide_sglang.rollout import ControlState, Heartbeat, Published
from tide_sglang.settings import TideSettings
from tide_sglang.stream.connection import Client, connect

Unavailable = rollout.UNAVAILABLE
Malformed = rollout.RolloutError  # a key holds what the protocol does not allow


def client_for(deployment: str, url: str, password: str | None, cluster: bool, timeout_s: float) -> Client:
    settings = TideSettings(deployment=deployment, redis_url=url, redis_password=password,
                            redis_cluster=cluster, redis_timeout_s=timeout_s)
    return connect(settings)


def read_events(client: Client, namespace: str, deployment: str, cursor: str,
                count: int) -> tuple[list[Published], str]:
    """Published versions after `cursor`, oldest first, and the cursor to continue from (malformed entries are
    skipped by the protocol module and never read again)."""
    page, last = rollout.read_event_page(client, namespace, deployment, cursor, count)
    return [event for _, event in page], last


def read_stats(client: Client, namespace: str, deployment: str, versions: Iterable[int]) -> dict[int, Counters]:
    fields = set(Counters.model_fields)
    return {v: Counters(**rollout.read_stats(client, namespace, deployment, v).model_dump(include=fields))
            for v in sorted(set(versions))}


def read_heartbeats(client: Client, namespace: str, deployment: str, heartbeat_s: float) -> dict[str, Heartbeat]:
    return rollout.read_heartbeats(client, namespace, deployment, now=time.time(), heartbeat_s=heartbeat_s)


def write_control(client: Client, namespace: str, deployment: str, state: ControlState) -> None:
    rollout.write_control(client, namespace, deployment, state)


def forget(client: Client, namespace: str, deployment: str) -> None:
    """Delete every key of a deleted TideDeployment."""
    rollout.delete_deployment_keys(client, namespace, deployment)
