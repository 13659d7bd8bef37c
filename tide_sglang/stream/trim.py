"""What the hidden-state stream keeps, and the one place that trims it (writers and readers both call `trim`).

- An entry the trainers' group has not acked (pending, or not yet delivered) is never trimmed for space: when the
  unacked backlog fills the byte budget, writers drop new captures and count them instead (capture is best
  effort; what entered the stream is kept until a checkpoint holds it).
- Acked entries are of no further use (the trainer's checkpoint holds their rows) and are trimmed at once.
- Every entry, acked or not, is trimmed once it is older than the retention time (`TIDE_STREAM_RETENTION_S`, by
  entry id, which is the Redis server's clock in ms): the time bound on captured data (docs/security.md).
- Before any trainer created the group, nothing is owed to anyone: the writers' `MAXLEN ~` keeps the newest
  entries within the budget.
"""

import redis
from pydantic import BaseModel, ConfigDict

from tide_sglang.keys import TRAINER_GROUP
from tide_sglang.stream.connection import Client


class Backlog(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    entries: int  # entries left in the stream after trimming
    group: bool  # the trainers' group exists: every entry left is unacked


def parse_id(entry_id: str | bytes) -> tuple[int, int]:
    text = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


def format_id(ms_seq: tuple[int, int]) -> str:
    return f"{ms_seq[0]}-{ms_seq[1]}"


def oldest_unacked(pending_min: str | bytes | None, last_delivered: str | bytes) -> tuple[int, int]:
    """The smallest entry id a group still owes an ack for: its oldest pending entry, or else the first entry
    after the last one delivered (everything before is acked)."""
    ms, seq = parse_id(last_delivered)
    after = (ms, seq + 1)
    return min(parse_id(pending_min), after) if pending_min else after


def trim_point(unacked: tuple[int, int] | None, now_ms: int, retention_s: float) -> tuple[int, int]:
    """MINID to trim to: past the retention time always, past every acked entry when a group exists."""
    expired = (max(0, now_ms - int(retention_s * 1000)), 0)
    return expired if unacked is None else max(expired, unacked)


def _group(client: Client, stream: str, group: str) -> dict | None:
    try:
        groups = client.xinfo_groups(stream)
    except redis.ResponseError:  # no such key: no stream yet, so no group
        return None
    return next((g for g in groups if g["name"] in (group, group.encode())), None)


def trim(client: Client, stream: str, retention_s: float, *, maxlen: int = 0, group: str = TRAINER_GROUP) -> Backlog:
    """Trim acked and expired entries, and with no group beyond `maxlen` (0: not); return what is left. XTRIM is
    allowed at maxmemory where XADD (and its own MAXLEN) is not: this is how a full Redis frees the stream's share.
    Raises redis errors to the caller, which backs off."""
    info = _group(client, stream, group)
    unacked = None
    if info is not None:
        pending_min = client.xpending(stream, group)["min"] if info["pending"] else None
        unacked = oldest_unacked(pending_min, info["last-delivered-id"])
    seconds, micros = client.time()
    client.xtrim(stream, minid=format_id(trim_point(unacked, seconds * 1000 + micros // 1000, retention_s)),
                 approximate=False)
    if info is None and maxlen:
        client.xtrim(stream, maxlen=maxlen, approximate=True)
    return Backlog(entries=int(client.xlen(stream)), group=info is not None)
