"""The Redis adapter: the operator's side of the rollout wiring (DESIGN.md, "Fixed names").

- reads `tide:{<namespace>/<deployment>}:events`, where the trainer appends one entry per published version
  with fields `version` (integer), `parent` (integer, or empty) and `metrics` (a JSON object; its numeric fields
  are kept on the DraftVersion, others such as per-domain counts are dropped);
- reads `tide:{<namespace>/<deployment>}:stats:<version>`, where engines HINCRBY `tokens`, `accepted`,
  `verify_steps`, `swap_failures` (and HSET `updated`, a Unix time) for the version that drafted the tokens;
- writes `tide:{<namespace>/<deployment>}:ctl`: field `stable` (a version), field `canary` present only during
  a canary.
"""

import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field

from redis.exceptions import RedisError

from tide_operator.models import Counters, Version
from tide_sglang import keys
from tide_sglang.rollout import COUNTS as STATS_FIELDS  # the engines' writer names the fields
from tide_sglang.settings import TideSettings
from tide_sglang.stream.connection import Client, RedisUnavailable, connect

log = logging.getLogger(__name__)

Unavailable = (RedisError, RedisUnavailable, OSError)


@dataclass(frozen=True)
class Published:
    """One entry of the events stream."""

    entry_id: str
    version: Version
    parent: Version | None = None
    metrics: dict[str, float] = field(default_factory=dict)


def parse_event(entry_id: str, fields: dict[str, str]) -> Published | None:
    """The entry as a `Published`, or None (logged) when it breaks the contract: a bad entry is skipped
    rather than blocking every later version."""
    try:
        version = int(fields["version"])
        parent = int(fields["parent"]) if fields.get("parent") not in (None, "") else None
        raw = json.loads(fields.get("metrics") or "{}")
        metrics = {str(k): float(v) for k, v in raw.items() if isinstance(v, int | float) and not isinstance(v, bool)}
        if version < 0 or (parent is not None and parent < 0):
            raise ValueError("negative version")
    except (KeyError, ValueError, TypeError, AttributeError) as e:
        log.warning("skipping malformed events entry %s %r: %s", entry_id, fields, e)
        return None
    return Published(entry_id, version, parent, metrics)


def client_for(deployment: str, url: str, password: str | None, cluster: bool, timeout_s: float) -> Client:
    settings = TideSettings(deployment=deployment, redis_url=url, redis_password=password,
                            redis_cluster=cluster, redis_timeout_s=timeout_s)
    return connect(settings)


def read_events(client: Client, namespace: str, deployment: str, cursor: str,
                count: int = 100) -> list[tuple[str, Published | None]]:
    """Entries after `cursor` (exclusive), oldest first: (entry id, event or None if malformed)."""
    raw = client.xrange(keys.events(namespace, deployment), min=f"({cursor}", count=count)
    out = []
    for entry_id, fields in raw:
        eid = _text(entry_id)
        out.append((eid, parse_event(eid, {_text(k): _text(v) for k, v in fields.items()})))
    return out


def read_stats(client: Client, namespace: str, deployment: str, versions: Iterable[int]) -> dict[int, Counters]:
    wanted = sorted(set(versions))
    pipe = client.pipeline(transaction=False)
    for v in wanted:
        pipe.hgetall(keys.stats(namespace, deployment, v))
    return {v: counters(raw) for v, raw in zip(wanted, pipe.execute(), strict=True)}


def counters(raw: dict[bytes | str, bytes | str]) -> Counters:
    got = {_text(k): _text(v) for k, v in raw.items()}
    return Counters(**{f: max(0, int(float(got.get(f, 0) or 0))) for f in STATS_FIELDS})


def write_control(client: Client, namespace: str, deployment: str, stable: int, canary: int | None) -> None:
    """One transaction, so no engine reads a canary field left over from the previous rollout."""
    key = keys.control(namespace, deployment)
    pipe = client.pipeline(transaction=True)
    pipe.hset(key, "stable", stable)
    if canary is None:
        pipe.hdel(key, "canary")
    else:
        pipe.hset(key, "canary", canary)
    pipe.execute()


def read_control(client: Client, namespace: str, deployment: str) -> dict[str, int]:
    return {_text(k): int(v) for k, v in client.hgetall(keys.control(namespace, deployment)).items()}


def forget(client: Client, namespace: str, deployment: str, versions: Iterable[int]) -> None:
    """Delete every key of a deleted TideDeployment (one key per call: they share a slot anyway)."""
    for key in (*keys.all_fixed(namespace, deployment), *(keys.stats(namespace, deployment, v) for v in versions)):
        client.delete(key)


def _text(x: bytes | str) -> str:
    return x.decode() if isinstance(x, bytes) else x
