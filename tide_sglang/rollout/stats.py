"""Per-version counts, `tide:{<ns>/<dep>}:stats:<version>`: every engine adds what it verified with that version
drafting; the operator judges canaries on them.

Fields: `tokens` draft tokens verified, `accepted` draft tokens accepted, `verify_steps` request verify steps,
`swap_failures` failed swaps to the version (HINCRBY), `updated` unix seconds of the last addition (HSET).
Acceptance rate = accepted / tokens; acceptance length = 1 + accepted / verify_steps.
"""

import logging
import threading
import time
from collections import defaultdict
from collections.abc import Callable

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from redis.client import Pipeline
from redis.cluster import ClusterPipeline

from tide_sglang import keys
from tide_sglang.rollout.common import UNAVAILABLE, RolloutError, fields_of
from tide_sglang.stream.connection import Client

log = logging.getLogger("tide.rollout.stats")

COUNTS = ("tokens", "accepted", "verify_steps", "swap_failures")


class Stats(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    tokens: int = Field(0, ge=0, description="draft tokens verified")
    accepted: int = Field(0, ge=0, description="draft tokens accepted")
    verify_steps: int = Field(0, ge=0, description="request verify steps")
    swap_failures: int = Field(0, ge=0, description="failed swaps to this version")
    updated: float | None = Field(None, description="unix seconds of the last addition; None: never")

    @property
    def acceptance_rate(self) -> float | None:
        return self.accepted / self.tokens if self.tokens else None

    @property
    def accept_length(self) -> float | None:
        return 1 + self.accepted / self.verify_steps if self.verify_steps else None


def add_stats(pipe_or_client: Client | Pipeline | ClusterPipeline, namespace: str, deployment: str, version: int,
              **counts: int) -> None:
    """HINCRBY the non-zero counts and HSET `updated`; on a pipeline the caller executes it."""
    unknown = set(counts) - set(COUNTS)
    if unknown:
        raise ValueError(f"unknown stats fields {sorted(unknown)}; known: {COUNTS}")
    key = keys.stats(namespace, deployment, version)
    for name, n in counts.items():
        if n:
            pipe_or_client.hincrby(key, name, n)
    pipe_or_client.hset(key, "updated", f"{time.time():.3f}")


def read_stats(client: Client, namespace: str, deployment: str, version: int) -> Stats:
    """All zero for a version nobody reported on."""
    fields = fields_of(client.hgetall(keys.stats(namespace, deployment, version)))
    try:
        return Stats.model_validate(fields)
    except ValidationError as e:
        raise RolloutError(f"malformed stats of version {version} {fields!r}: {e}") from None


class StatsReporter:
    """Adds per-version counts to Redis; a Redis failure keeps them for the next flush, never raises.

    `add` flushes by itself at most every `interval_s` (None: only explicit `flush()` calls, e.g. from the SGLang
    plugin's background thread). Thread-safe: the scheduler thread adds while another thread flushes.
    `client` may be a callable returning the client (created lazily in the process that flushes)."""

    def __init__(self, client: Client | Callable[[], Client], namespace: str, deployment: str,
                 interval_s: float | None = 1.0) -> None:
        self._client = client if callable(client) and not isinstance(client, Client) else (lambda: client)
        self.namespace, self.deployment, self.interval_s = namespace, deployment, interval_s
        keys.stats(namespace, deployment, 0)  # a bad name fails here, not at the first flush
        self._lock = threading.Lock()
        self._pending: dict[int, dict[str, int]] = defaultdict(lambda: dict.fromkeys(COUNTS, 0))
        self._last = 0.0

    def add(self, version: int, **counts: int) -> None:
        unknown = set(counts) - set(COUNTS)
        if unknown:
            raise ValueError(f"unknown stats fields {sorted(unknown)}; known: {COUNTS}")
        with self._lock:
            for name, n in counts.items():
                self._pending[version][name] += n
        if self.interval_s is not None and time.monotonic() - self._last >= self.interval_s:
            self.flush()

    def flush(self) -> bool:
        """Write what accumulated; False when nothing was written (nothing pending, or Redis failed)."""
        self._last = time.monotonic()
        with self._lock:
            pending, self._pending = self._pending, defaultdict(lambda: dict.fromkeys(COUNTS, 0))
        if not pending:
            return False
        try:
            pipe = self._client().pipeline()
            for version, counts in pending.items():
                add_stats(pipe, self.namespace, self.deployment, version, **counts)
            pipe.execute()
            return True
        except UNAVAILABLE as e:
            log.warning("could not add acceptance stats to Redis (kept for the next flush): %s", e)
            with self._lock:
                for version, counts in pending.items():
                    for name, n in counts.items():
                        self._pending[version][name] += n
            return False
