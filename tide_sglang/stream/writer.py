"""`StreamWriter`: the engine's side of the hidden-state stream.

`submit()` only puts the batch on a bounded queue (microseconds, never blocks, never raises). A background thread
encodes, pipelines `XADD`s with an approximate `MAXLEN` derived from a byte budget, and, when Redis is down,
drops and counts, then reconnects with exponential backoff. Decoding must never wait for the stream.
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
from tide_sglang.stream.codec import CodecError, encode, encoded_size
from tide_sglang.stream.connection import Client, RedisUnavailable

log = logging.getLogger("tide.stream.writer")

_REDIS_ERRORS = (redis.RedisError, RedisClusterException, RedisUnavailable, OSError)


class WriterStats(BaseModel):
    submitted: int = 0
    sent_entries: int = 0
    sent_tokens: int = 0
    sent_bytes: int = 0
    dropped_queue_full: int = 0
    dropped_redis_error: int = 0
    dropped_invalid: int = 0
    redis_errors: int = 0
    connected: bool = False
    maxlen: int = 0
    last_error: str | None = None

    @property
    def dropped(self) -> int:
        return self.dropped_queue_full + self.dropped_redis_error + self.dropped_invalid


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
    ) -> None:
        self._connect = connect
        self.stream = stream
        self._budget = budget_bytes
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
                self._on_error(e, len(batches))
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
        if not encoded:
            return
        if self._client is None:
            self._client = self._connect()
            self._stats.connected = True
        pipe = self._client.pipeline()
        for _, fields in encoded:
            size = encoded_size(fields)
            self._entry_bytes = size if not self._entry_bytes else 0.9 * self._entry_bytes + 0.1 * size
            self._stats.maxlen = maxlen_for_budget(self._budget, self._entry_bytes)
            pipe.xadd(self.stream, fields, maxlen=self._stats.maxlen, approximate=True)
        pipe.execute()
        for batch, fields in encoded:
            self._stats.sent_entries += 1
            self._stats.sent_tokens += batch.num_tokens
            self._stats.sent_bytes += encoded_size(fields)

    def _on_error(self, error: BaseException, lost: int) -> None:
        if self._stats.connected or self._stats.last_error is None:
            log.warning("Redis write failed, dropping %d batch(es) and reconnecting: %s", lost, error)
        self._stats.dropped_redis_error += lost
        self._stats.last_error = f"{type(error).__name__}: {error}"
        self._stats.connected = False
        self._stats.redis_errors += 1
        if self._client is not None:
            with contextlib.suppress(*_REDIS_ERRORS):
                self._client.close()
        self._client = None
