"""The engines' side of the rollout wiring through Redis (DESIGN.md): read the control hash, add stats.

`tide:{dep}:ctl` (written by the operator): fields `stable` and `canary`, version numbers.
`tide:{dep}:stats:<version>` (added to by every engine): `tokens` draft tokens verified, `accepted` draft tokens
accepted, `verify_steps` request verify steps, `swap_failures`, `updated` (unix seconds of the last flush).
Acceptance rate = accepted / tokens; acceptance length = 1 + accepted / verify_steps.
"""

import logging
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Literal

import redis
from pydantic import BaseModel, ConfigDict
from redis.exceptions import RedisClusterException

from tide_sglang import keys
from tide_sglang.stream.connection import Client, RedisUnavailable

log = logging.getLogger("tide.stream.rollout")

Role = Literal["stable", "canary"]
FIELDS = ("tokens", "accepted", "verify_steps", "swap_failures")


class ControlState(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    stable: int | None = None
    canary: int | None = None

    @classmethod
    def parse(cls, raw: dict) -> "ControlState":
        """From the hash as Redis returns it (bytes or str); a missing or non-numeric field means no version."""
        fields = {(k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else str(v))
                  for k, v in raw.items()}
        return cls(**{f: int(fields[f]) for f in ("stable", "canary") if fields.get(f, "").isdigit()})

    def for_role(self, role: Role) -> int | None:
        """Canary pods fall back to stable when no canary runs."""
        return self.canary if role == "canary" and self.canary is not None else self.stable


def read_control(client: Client, deployment: str) -> ControlState:
    return ControlState.parse(client.hgetall(keys.control(deployment)))


def write_control(client: Client, deployment: str, state: ControlState) -> None:
    """What the operator does on promote/rollback; the demo uses it where no operator runs."""
    key = keys.control(deployment)
    pipe = client.pipeline()
    pipe.delete(key)
    values = {f: v for f, v in state.model_dump().items() if v is not None}
    if values:
        pipe.hset(key, mapping=values)
    pipe.execute()


class StatsReporter:
    """Adds per-version counts to Redis; a Redis failure keeps them for the next flush, never raises.

    `add` flushes by itself at most every `interval_s` (None: only explicit `flush()` calls, e.g. from the SGLang
    plugin's background thread). Thread-safe: the scheduler thread adds while another thread flushes.
    `client` may be a callable returning the client (created lazily in the process that flushes)."""

    def __init__(self, client: Client | Callable[[], Client], deployment: str,
                 interval_s: float | None = 1.0) -> None:
        self._client = client if callable(client) and not isinstance(client, Client) else (lambda: client)
        self.deployment, self.interval_s = deployment, interval_s
        self._lock = threading.Lock()
        self._pending: dict[int, dict[str, int]] = defaultdict(lambda: dict.fromkeys(FIELDS, 0))
        self._last = 0.0

    def add(self, version: int, **counts: int) -> None:
        unknown = set(counts) - set(FIELDS)
        if unknown:
            raise ValueError(f"unknown stats fields {sorted(unknown)}; known: {FIELDS}")
        with self._lock:
            for name, n in counts.items():
                self._pending[version][name] += n
        if self.interval_s is not None and time.monotonic() - self._last >= self.interval_s:
            self.flush()

    def flush(self) -> bool:
        """Write what accumulated; False when nothing was written (nothing pending, or Redis failed)."""
        self._last = time.monotonic()
        with self._lock:
            pending, self._pending = self._pending, defaultdict(lambda: dict.fromkeys(FIELDS, 0))
        if not pending:
            return False
        try:
            pipe = self._client().pipeline()
            for version, counts in pending.items():
                key = keys.stats(self.deployment, version)
                for name, n in counts.items():
                    if n:
                        pipe.hincrby(key, name, n)
                pipe.hset(key, "updated", f"{time.time():.3f}")
            pipe.execute()
            return True
        except (redis.RedisError, RedisClusterException, RedisUnavailable, OSError) as e:
            log.warning("could not add acceptance stats to Redis (kept for the next flush): %s", e)
            with self._lock:
                for version, counts in pending.items():
                    for name, n in counts.items():
                        self._pending[version][name] += n
            return False
