"""`StreamWriter`: the engine's side of the hidden-state stream.

`submit()` only puts the batch on a bounded queue (microseconds, never blocks, never raises). A background thread
encodes and pipelines `XADD`s, and, when Redis is down, paused or full, drops and counts, then reconnects with
exponential backoff. Decoding must never wait for the stream. What the stream keeps is trim.py's: about every
`TRIM_EVERY_S` the writer trims acked and expired entries; while a trainers' group exists it never trims an unacked
entry for space but drops new captures once the unacked backlog fills the byte budget (`dropped_backlog`); before
any group exists its `MAXLEN ~` keeps the newest entries within the budget.
"""

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable

import redis
from pydantic import BaseModel
from redis.exceptions import RedisClusterException

from tide_sglang.capture import CaptureBatch
from tide_sglang.settings import TideSettings
from tide_sglang.stream.codec import CodecError, encode, encoded_size
from tide_sglang.stream.connection import Client, RedisUnavailable, connect
from tide_sglang.stream.trim import Backlog, trim

log = logging.getLogger("tide.stream.writer")

_REDIS_ERRORS = (redis.RedisError, RedisClusterException, RedisUnavailable, OSError)
MIB = 1 << 20
TRIM_EVERY_S = 0.5  # how stale the writer's view of the unacked backlog may get (several writers may overshoot)


class WriterStats(BaseModel):
    submitted: int = 0
    sent_entries: int = 0
    sent_tokens: int = 0
    sent_bytes: int = 0
    dropped_queue_full: int = 0
    dropped_redis_error: int = 0
    dropped_invalid: int = 0
    dropped_oversized: int = 0  # larger than TIDE_STREAM_MAX_ENTRY_MIB
    dropped_backlog: int = 0  # the trainers' unacked backlog filled the budget: what entered the stream is kept
    redis_errors: int = 0
    connected: bool = False
    maxlen: int = 0
    last_error: str | None = None

    @property
    def dropped(self) -> int:
        return (self.dropped_queue_full + self.dropped_redis_error + self.dropped_invalid + self.dropped_oversized
                + self.dropped_backlog)


def maxlen_for_budget(budget_bytes: int, entry_bytes: float, floor: int = 16) -> int:
    """Entries to keep so that the stream holds about `budget_bytes` (Redis trims whole nodes: `~`)."""
    return max(floor, int(budget_bytes // max(entry_bytes, 1.0)))


class StreamWriter:
    def __init__(
        self,
        connect: Callable[[], Client],
        stream: str,
        *,
        budget_bytes: int = 1 << 30,
        queue_entries: int = 64,
        max_pipeline: int = 16,
        backoff_s: tuple[float, float] = (0.05, 2.0),
        retention_s: float = 86400.0,
        max_entry_bytes: int = 64 * MIB,
    ) -> None:
        self._connect = connect
        self.stream = stream
        self._budget = budget_bytes
        self._retention_s, self._max_entry_bytes = retention_s, max_entry_bytes
        self._backlog: Backlog | None = None  # what trim() last left; None: not known yet
        self._room = float(budget_bytes)  # bytes the unacked backlog may still grow by (a group exists)
        self._next_trim = 0.0
        self._in_flight = 0  # batches of the current _send not yet counted anywhere
        self._max_pipeline = max_pipeline
        self._backoff = backoff_s
        self._queue: queue.Queue[CaptureBatch] = queue.Queue(maxsize=queue_entries)
        self._stats = WriterStats()  # updated by the sender thread only
        self._submitted = self._dropped_full = 0  # the caller's counters: plain ints keep submit() cheap
        self._entry_bytes = 0.0  # EWMA of encoded entry size, for MAXLEN
        self._client: Client | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tide-stream-writer", daemon=True)
        self._thread.start()

    @classmethod
    def from_settings(cls, settings: TideSettings, stream: str, **overrides: object) -> "StreamWriter":
        """The writer every engine runs: connection, budget, queue, retention and entry bound from TIDE_*."""
        kwargs: dict[str, object] = {
            "budget_bytes": settings.stream_budget_mib * MIB, "queue_entries": settings.stream_queue_entries,
            "retention_s": settings.stream_retention_s, "max_entry_bytes": settings.stream_max_entry_mib * MIB,
        }
        return cls(lambda: connect(settings, check=False), stream, **(kwargs | overrides))  # type: ignore[arg-type]

    # -- caller side (the engine's thread) ---------------------------------------------------------------

    def submit(self, batch: CaptureBatch) -> bool:
        """Queue a batch for the stream; False (and counted) when the queue is full. Never blocks or raises."""
        self._submitted += 1
        try:
            self._queue.put_nowait(batch)
            return True
        except queue.Full:
            self._dropped_full += 1
            return False

    @property
    def stats(self) -> WriterStats:
        return self._stats.model_copy(update={"submitted": self._submitted, "dropped_queue_full": self._dropped_full})

    @property
    def backlog(self) -> int:
        return self._queue.qsize()

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until everything queued so far was sent or dropped; False on timeout."""
        deadline = time.monotonic() + timeout
        while self._queue.unfinished_tasks:
            if time.monotonic() > deadline or not self._thread.is_alive():
                return False
            time.sleep(0.001)
        return True

    def close(self, timeout: float = 10.0) -> WriterStats:
        self.flush(timeout)
        self._stop.set()
        self._thread.join(timeout)
        return self.stats

    def __enter__(self) -> "StreamWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- background thread ---------------------------------------------------------------------------------

    def _run(self) -> None:
        delay = self._backoff[0]
        while not (self._stop.is_set() and self._queue.empty()):
            try:
                first = self._queue.get(timeout=0.05)
            except queue.Empty:
                continue
            batches = [first]
            while len(batches) < self._max_pipeline:
                try:
                    batches.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            try:
                self._send(batches)
                delay = self._backoff[0]
            except _REDIS_ERRORS as e:
                self._on_error(e, self._in_flight)
                self._stop.wait(delay)
                delay = min(delay * 2, self._backoff[1])
            finally:
                for _ in batches:
                    self._queue.task_done()

    def _send(self, batches: list[CaptureBatch]) -> None:
        encoded = []
        for b in batches:
            try:
                encoded.append((b, encode(b)))
            except CodecError as e:
                self._stats.dropped_invalid += 1
                log.error("dropping an invalid capture batch: %s", e)
        self._in_flight = len(encoded)  # what a Redis error from here on drops (each batch counted once)
        if not encoded:
            return
        if self._client is None:
            self._client = self._connect()
            self._stats.connected = True
        self._trim()
        pipe, sent = self._client.pipeline(), []  # MULTI on one server: all or nothing, so counts are exact
        for batch, fields in encoded:
            size = encoded_size(fields)
            if size > self._max_entry_bytes:
                self._stats.dropped_oversized += 1
                log.error("dropping a %d-byte entry: larger than TIDE_STREAM_MAX_ENTRY_MIB", size)
                continue
            self._entry_bytes = size if not self._entry_bytes else 0.9 * self._entry_bytes + 0.1 * size
            self._stats.maxlen = maxlen_for_budget(self._budget, self._entry_bytes)
            if self._backlog is not None and self._backlog.group:
                if self._room < size:
                    self._stats.dropped_backlog += 1
                    continue
                self._room -= size
                pipe.xadd(self.stream, fields)  # never MAXLEN: it could trim entries no trainer has acked
            else:
                pipe.xadd(self.stream, fields, maxlen=self._stats.maxlen, approximate=True)
            sent.append((batch, size))
        self._in_flight = len(sent)
        if sent:
            pipe.execute()
        for batch, size in sent:
            self._stats.sent_entries += 1
            self._stats.sent_tokens += batch.num_tokens
            self._stats.sent_bytes += size

    def _trim(self) -> None:
        """Every TRIM_EVERY_S: trim acked and expired entries, and learn how much the unacked backlog may grow."""
        if time.monotonic() < self._next_trim:
            return
        assert self._client is not None
        self._backlog = trim(self._client, self.stream, self._retention_s, maxlen=self._stats.maxlen)
        self._room = self._budget - self._backlog.entries * self._entry_bytes
        self._next_trim = time.monotonic() + TRIM_EVERY_S

    def _on_error(self, error: BaseException, lost: int) -> None:
        if self._stats.connected or self._stats.last_error is None:
            log.warning("Redis write failed, dropping %d batch(es) and reconnecting: %s", lost, error)
        self._stats.dropped_redis_error += lost
        self._stats.last_error = f"{type(error).__name__}: {error}"
        self._stats.connected = False
        self._stats.redis_errors += 1
        self._next_trim = 0.0  # trim first on the next try: at maxmemory that is what frees room
        if self._client is not None:
            with contextlib.suppress(*_REDIS_ERRORS):
                self._client.close()
        self._client = None
