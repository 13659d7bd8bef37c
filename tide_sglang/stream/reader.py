"""`StreamReader`: the trainer's side of the hidden-state stream (consumer group `trainers`).

Delivery is at-least-once: an entry is acked only after the caller has used it (`ack`). On start a consumer first
re-reads its own pending entries (a restarted trainer with the same name resumes), and it periodically claims
entries that a dead consumer left pending longer than `claim_idle_ms` (`XAUTOCLAIM`). A corrupt entry goes to
the dead-letter stream with its error and is acked, so it never stops the reader.
"""

import logging
import time

import redis
from pydantic import BaseModel, ConfigDict

from tide_sglang.capture import CaptureBatch
from tide_sglang.keys import TRAINER_GROUP
from tide_sglang.stream.codec import CodecError, decode
from tide_sglang.stream.connection import Client

log = logging.getLogger("tide.stream.reader")

DEAD_LETTER_MAXLEN = 10_000


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
    trimmed_unread: int = 0  # entries trimmed by MAXLEN while pending: the stream budget was too small


def group_lag(client: Client, stream: str, group: str = TRAINER_GROUP) -> int | None:
    """Entries in the stream not yet delivered to the group (None when Redis cannot tell)."""
    for g in client.xinfo_groups(stream):
        if g["name"] in (group, group.encode()):
            return g.get("lag")
    return None


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
    ) -> None:
        self.client, self.stream, self.dead_letter = client, stream, dead_letter
        self.consumer, self.group = consumer, group
        self.count, self.block_ms, self.claim_idle_ms = count, block_ms, claim_idle_ms
        self.stats = ReaderStats()
        # Resume after a restart: walk our own pending entries once, with a cursor (a caller may ack long after
        # reading, e.g. at checkpoints, so "pending from 0" would deliver the same entries again and again).
        self._pending_cursor: str | None = "0"
        self._next_claim = 0.0
        self._ensure_group()

    def _ensure_group(self) -> None:
        try:
            self.client.xgroup_create(self.stream, self.group, id="0", mkstream=True)
        except redis.ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise

    def read(self) -> list[StreamEntry]:
        """Up to `count` entries: own pending first, then claimed from dead consumers, then new ones."""
        if self._pending_cursor is not None:
            raw = self._xreadgroup(self._pending_cursor, block=None)
            if raw:
                last = raw[-1][0]
                self._pending_cursor = last.decode() if isinstance(last, bytes) else last
                return self._decode(raw)
            self._pending_cursor = None
        if time.monotonic() >= self._next_claim:
            self._next_claim = time.monotonic() + self.claim_idle_ms / 2000
            claimed = self._claim()
            if claimed:
                return claimed
        return self._decode(self._xreadgroup(">", block=self.block_ms))

    def ack(self, entries: list[StreamEntry]) -> None:
        if entries:
            self.stats.acked += self.client.xack(self.stream, self.group, *[e.id for e in entries])

    def pending(self) -> int:
        return int(self.client.xpending(self.stream, self.group)["pending"])

    def lag(self) -> int | None:
        return group_lag(self.client, self.stream, self.group)

    def _xreadgroup(self, start: str, block: int | None) -> list[tuple[bytes, dict[bytes, bytes] | None]]:
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
        entries = self._decode(raw)
        self.stats.claimed += len(raw)
        return entries

    def _decode(self, raw: list[tuple[bytes, dict[bytes, bytes] | None]]) -> list[StreamEntry]:
        good: list[StreamEntry] = []
        for entry_id, fields in raw:
            eid = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
            if not fields:  # trimmed while pending: nothing left to use, only to ack
                self.stats.trimmed_unread += 1
                self.client.xack(self.stream, self.group, eid)
                continue
            try:
                batch = decode(fields)
            except CodecError as e:
                self._dead_letter(eid, fields, e)
                continue
            size = sum(len(v) for v in fields.values())
            good.append(StreamEntry(id=eid, batch=batch, size_bytes=size))
            self.stats.delivered += 1
            self.stats.delivered_bytes += size
        return good

    def _dead_letter(self, eid: str, fields: dict[bytes, bytes], error: CodecError) -> None:
        log.error("entry %s of %s is corrupt, moved to %s: %s", eid, self.stream, self.dead_letter, error)
        pipe = self.client.pipeline()
        pipe.xadd(self.dead_letter, {**fields, b"tide_error": str(error), b"tide_source_id": eid},
                  maxlen=DEAD_LETTER_MAXLEN, approximate=True)
        pipe.xack(self.stream, self.group, eid)
        pipe.execute()
        self.stats.dead_lettered += 1
