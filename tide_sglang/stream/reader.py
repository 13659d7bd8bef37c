"""`StreamReader`: the trainer's side of the hidden-state stream (consumer group `trainers`).

Delivery is at-least-once: an entry is acked only after the caller has used it (`ack`). On start a consumer first
re-reads its own pending entries (a restarted trainer with the same name resumes), and it periodically claims
entries that a dead consumer left pending longer than `claim_idle_ms` (`XAUTOCLAIM`). An entry is dead-lettered
(moved to the dead-letter stream with its reason, and acked) when it does not decode (corrupt, oversized, out of
range, another target's vocabulary) or was delivered `max_deliveries` times without an ack (a poison entry that
crashes its trainer after decoding). Redis errors never reach the caller: `read` returns nothing and backs off,
`ack` keeps the ids and acks them at the next call, and a group lost with the server's data is created again.
"""

import logging
import time
from collections.abc import Callable
from typing import TypeVar

import redis
from pydantic import BaseModel, ConfigDict
from redis.exceptions import RedisClusterException

from tide_sglang.capture import CaptureBatch
from tide_sglang.keys import TRAINER_GROUP
from tide_sglang.settings import TideSettings
from tide_sglang.stream.codec import CodecError, decode
from tide_sglang.stream.connection import Client
from tide_sglang.stream.trim import trim

log = logging.getLogger("tide.stream.reader")

MIB = 1 << 20
DEAD_LETTERS_KEPT = 64  # the dead-letter stream keeps this many; each holds at most budget / DEAD_LETTERS_KEPT bytes
_REDIS_ERRORS = (redis.RedisError, RedisClusterException, OSError)

Raw = list[tuple[bytes, dict[bytes, bytes] | None]]
T = TypeVar("T")


class StreamEntry(BaseModel):
    model_config = ConfigDict(arbitrary_types_allowed=True, frozen=True)

    id: str
    batch: CaptureBatch
    size_bytes: int


class ReaderStats(BaseModel):
    delivered: int = 0
    delivered_bytes: int = 0
    acked: int = 0
    claimed: int = 0
    dead_lettered: int = 0
    trimmed_unread: int = 0  # entries trimmed while pending: past the retention time, or trimmed by hand
    redis_errors: int = 0
    last_error: str | None = None


def group_lag(client: Client, stream: str, group: str = TRAINER_GROUP) -> int | None:
    """Entries in the stream not yet delivered to the group (None when Redis cannot tell)."""
    for g in client.xinfo_groups(stream):
        if g["name"] in (group, group.encode()):
            return g.get("lag")
    return None


def dead_letter_fields(fields: dict[bytes, bytes], eid: str, reason: str, error: str,
                       entry_cap: int) -> dict[bytes, bytes | str]:
    """A dead letter: why, where from, and the entry itself when it fits in `entry_cap` bytes (else only its
    size), so the dead-letter stream stays within its byte budget whatever was sent."""
    size = sum(len(v) for v in fields.values())
    out: dict[bytes, bytes | str] = {b"tide_reason": reason, b"tide_error": error[:1024], b"tide_source_id": eid,
                                     b"tide_bytes": str(size)}
    if size + 2048 <= entry_cap:
        out.update(fields)
    return out


def _id(entry_id: bytes | str) -> str:
    return entry_id.decode() if isinstance(entry_id, bytes) else entry_id


class StreamReader:
    def __init__(
        self,
        client: Client,
        stream: str,
        dead_letter: str,
        consumer: str,
        *,
        group: str = TRAINER_GROUP,
        count: int = 16,
        block_ms: int = 1000,
        claim_idle_ms: int = 30_000,
        max_deliveries: int = 5,
        dead_letter_bytes: int = 16 * MIB,
        max_entry_bytes: int = 64 * MIB,
        vocab_size: int | None = None,
        retention_s: float = 86400.0,
        backoff_s: tuple[float, float] = (0.05, 2.0),
    ) -> None:
        self.client, self.stream, self.dead_letter = client, stream, dead_letter
        self.consumer, self.group = consumer, group
        self.count, self.block_ms, self.claim_idle_ms = count, block_ms, claim_idle_ms
        self.max_deliveries, self.vocab_size, self.max_entry_bytes = max_deliveries, vocab_size, max_entry_bytes
        self.dead_letter_cap = dead_letter_bytes // DEAD_LETTERS_KEPT
        self.retention_s, self.backoff = retention_s, backoff_s
        self.stats = ReaderStats()
        # Resume after a restart: walk our own pending entries once, with a cursor (a caller may ack long after
        # reading, e.g. at checkpoints, so "pending from 0" would deliver the same entries again and again).
        self._pending_cursor: str | None = "0"
        self._next_claim = 0.0
        self._unacked: list[str] = []  # ids whose ack failed: acked at the next call that reaches Redis
        self._delay = 0.0
        self._group_ready = False
        self._call(self._ensure_group)

    @classmethod
    def from_settings(cls, client: Client, settings: TideSettings, stream: str, dead_letter: str, consumer: str,
                      **kwargs: object) -> "StreamReader":
        """The trainer's reader: delivery limit, dead-letter budget, entry bound and retention from TIDE_*."""
        bounds: dict[str, object] = {
            "max_deliveries": settings.stream_max_deliveries,
            "dead_letter_bytes": settings.stream_dead_letter_mib * MIB,
            "max_entry_bytes": settings.stream_max_entry_mib * MIB,
            "retention_s": settings.stream_retention_s,
        }
        return cls(client, stream, dead_letter, consumer, **(bounds | kwargs))  # type: ignore[arg-type]

    def _ensure_group(self) -> None:
        try:
            self.client.xgroup_create(self.stream, self.group, id="0", mkstream=True)
        except redis.ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise
        self._group_ready = True

    def read(self, wait: bool = True) -> list[StreamEntry]:
        """Up to `count` entries: own pending first, then claimed from dead consumers, then new ones, waiting up to
        `block_ms` for new ones when `wait` (a caller with other work to do passes False). Empty (after a backoff)
        while Redis fails."""
        return self._call(lambda: self._read(wait)) or []

    def _read(self, wait: bool) -> list[StreamEntry]:
        if not self._group_ready:
            self._ensure_group()
        self._flush_acks()
        if self._pending_cursor is not None:
            raw = self._xreadgroup(self._pending_cursor, block=None)
            if raw:
                self._pending_cursor = _id(raw[-1][0])
                return self._decode(self._over_limit(raw))
            self._pending_cursor = None
        if time.monotonic() >= self._next_claim:
            self._next_claim = time.monotonic() + self.claim_idle_ms / 2000
            trim(self.client, self.stream, self.retention_s)  # also when no engine writes
            claimed = self._claim()
            if claimed:
                return claimed
        return self._decode(self._xreadgroup(">", block=self.block_ms if wait else None))

    def ack(self, entries: list[StreamEntry]) -> None:
        """Ack after use; when Redis fails the ids are kept and acked by the next call that reaches it."""
        self.ack_ids([e.id for e in entries])

    def ack_ids(self, ids: list[str]) -> None:
        self._unacked += ids
        self._call(self._flush_acks)

    def _flush_acks(self) -> None:
        while self._unacked:
            batch = self._unacked[:1000]
            self.stats.acked += self.client.xack(self.stream, self.group, *batch)
            del self._unacked[: len(batch)]

    def pending(self) -> int:
        return int(self.client.xpending(self.stream, self.group)["pending"])

    def lag(self) -> int | None:
        return group_lag(self.client, self.stream, self.group)

    # -- Redis errors ----------------------------------------------------------------------------------------

    def _call(self, fn: Callable[[], T]) -> T | None:
        """Run fn; on a Redis error log, count, back off (doubling) and return None. A lost group (the server
        restarted without its data) is created again on the next call."""
        try:
            out = fn()
        except _REDIS_ERRORS as e:
            if isinstance(e, redis.ResponseError) and "NOGROUP" in str(e):
                self._group_ready, self._pending_cursor = False, "0"
            if self._delay == 0.0:
                log.warning("Redis failed, retrying with backoff: %s", e)
            self.stats.redis_errors += 1
            self.stats.last_error = f"{type(e).__name__}: {e}"
            self._delay = min(max(self._delay * 2, self.backoff[0]), self.backoff[1])
            time.sleep(self._delay)
            return None
        if self._delay:
            log.info("Redis answers again")
        self._delay = 0.0
        return out

    # -- entries -----------------------------------------------------------------------------------------------

    def _xreadgroup(self, start: str, block: int | None) -> Raw:
        reply = self.client.xreadgroup(self.group, self.consumer, {self.stream: start}, count=self.count, block=block)
        # RESP2 (the protocol our clients speak): [[stream, [(id, fields), ...]]]
        return reply[0][1] if reply else []

    def _claim(self) -> list[StreamEntry]:
        _, raw, deleted = self.client.xautoclaim(
            self.stream, self.group, self.consumer, self.claim_idle_ms, start_id="0-0", count=self.count
        )
        if deleted:
            self.stats.trimmed_unread += len(deleted)
            log.warning("%d pending entries were trimmed before any trainer used them", len(deleted))
        self.stats.claimed += len(raw)
        return self._decode(self._over_limit(raw))

    def _over_limit(self, raw: Raw) -> Raw:
        """Dead-letter the entries delivered more than max_deliveries times (re-read after restarts, or claimed):
        one that crashed its trainer each time would otherwise crash every trainer for ever."""
        if not raw:
            return raw
        pipe = self.client.pipeline(transaction=False)
        for entry_id, _ in raw:  # one id each: the pending list may hold many others between them
            pipe.xpending_range(self.stream, self.group, min=_id(entry_id), max=_id(entry_id), count=1)
        times = {_id(p["message_id"]): p["times_delivered"] for info in pipe.execute() for p in info}
        keep = []
        for entry_id, fields in raw:
            n = times.get(_id(entry_id), 0)
            if n > self.max_deliveries and fields:
                self._dead_letter(_id(entry_id), fields, "delivery_limit",
                                  f"delivered {n} times without an ack (TIDE_STREAM_MAX_DELIVERIES="
                                  f"{self.max_deliveries}): it may crash the trainer")
            else:
                keep.append((entry_id, fields))
        return keep

    def _decode(self, raw: Raw) -> list[StreamEntry]:
        good: list[StreamEntry] = []
        for entry_id, fields in raw:
            eid = _id(entry_id)
            if not fields:  # trimmed while pending: nothing left to use, only to ack
                self.stats.trimmed_unread += 1
                self.client.xack(self.stream, self.group, eid)
                continue
            try:
                batch = decode(fields, vocab_size=self.vocab_size, max_bytes=self.max_entry_bytes)
            except CodecError as e:
                self._dead_letter(eid, fields, "invalid", str(e))
                continue
            size = sum(len(v) for v in fields.values())
            good.append(StreamEntry(id=eid, batch=batch, size_bytes=size))
            self.stats.delivered += 1
            self.stats.delivered_bytes += size
        return good

    def _dead_letter(self, eid: str, fields: dict[bytes, bytes], reason: str, error: str) -> None:
        """Move an entry to the dead-letter stream (exactly DEAD_LETTERS_KEPT newest kept) and ack it. Not a
        transaction: at maxmemory the XADD is refused but the XACK still goes through, so the entry never comes
        back (it is lost, and logged, rather than blocking the stream)."""
        log.error("entry %s of %s moved to %s (%s): %s", eid, self.stream, self.dead_letter, reason, error)
        pipe = self.client.pipeline(transaction=False)
        pipe.xadd(self.dead_letter, dead_letter_fields(fields, eid, reason, error, self.dead_letter_cap),
                  maxlen=DEAD_LETTERS_KEPT, approximate=False)
        pipe.xack(self.stream, self.group, eid)
        added, _ = pipe.execute(raise_on_error=False)
        if isinstance(added, Exception):
            log.error("could not keep dead letter %s: %s", eid, added)
        self.stats.dead_lettered += 1
