"""`tide_*` Prometheus metrics of the scheduler process, and per-version acceptance counts for the operator.

The metrics are created on first use inside the scheduler process: SGLang sets PROMETHEUS_MULTIPROC_DIR before it
spawns schedulers, so values land in its multiprocess directory and SGLang's /metrics serves them with its own.
Labels: deployment and draft_version (DESIGN.md, "Fixed names").
"""

import logging
import threading
import time
from collections import defaultdict
from collections.abc import Callable

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram

from tide_sglang import keys
from tide_sglang.stream.connection import Client

log = logging.getLogger("tide.plugin.metrics")

LABELS = ("deployment", "draft_version")


class PluginMetrics:
    def __init__(self, deployment: str, registry: CollectorRegistry = REGISTRY) -> None:
        self.deployment = deployment
        r = {"registry": registry}
        self.captured_tokens = Counter("tide_captured_tokens_total", "Accepted rows handed to the stream", LABELS, **r)
        self.captured_bytes = Counter("tide_captured_bytes_total", "Hidden-state bytes handed to the stream",
                                      LABELS, **r)
        self.drops = Counter("tide_capture_drops_total", "Capture batches dropped instead of blocking",
                             (*LABELS, "reason"), **r)
        self.swaps = Counter("tide_draft_swaps_total", "Draft versions copied in place", LABELS, **r)
        self.swap_seconds = Histogram("tide_draft_swap_seconds", "Time the in-place copy held the scheduler",
                                      LABELS, **r, buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5))
        self.swap_failures = Counter("tide_draft_swap_failures_total", "Versions refused or failed to stage",
                                     LABELS, **r)
        self.version = Gauge("tide_draft_version", "Draft version loaded in this engine", ("deployment",),
                             multiprocess_mode="mostrecent", **r)
        self.steps = Gauge("tide_speculation_steps", "Draft steps TIDE chose, by batch-size slot",
                           (*LABELS, "batch_size"), multiprocess_mode="mostrecent", **r)

    def labels(self, version: int) -> dict[str, str]:
        return {"deployment": self.deployment, "draft_version": str(version)}


class AcceptanceStats:
    """Adds engine counts to `tide:{<deployment>}:stats:<version>` (tokens, accepted, verify_steps,
    swap_failures, updated). Counts accumulate in memory and are flushed by a background thread's call."""

    FIELDS = ("tokens", "accepted", "verify_steps", "swap_failures")

    def __init__(self, deployment: str, client: Callable[[], Client]) -> None:
        self.deployment = deployment
        self._client = client
        self._lock = threading.Lock()
        self._pending: dict[int, dict[str, int]] = defaultdict(lambda: dict.fromkeys(self.FIELDS, 0))

    def add(self, version: int, **counts: int) -> None:
        with self._lock:
            entry = self._pending[version]
            for name, value in counts.items():
                entry[name] += value

    def flush(self) -> bool:
        """Write what accumulated; on a Redis error keep it for the next flush. False when nothing was written."""
        with self._lock:
            pending, self._pending = self._pending, defaultdict(lambda: dict.fromkeys(self.FIELDS, 0))
        if not pending:
            return False
        try:
            pipe = self._client().pipeline(transaction=False)
            for version, counts in pending.items():
                key = keys.stats(self.deployment, version)
                for name, value in counts.items():
                    if value:
                        pipe.hincrby(key, name, value)
                pipe.hset(key, "updated", f"{time.time():.3f}")
            pipe.execute()
            return True
        except Exception as e:  # any Redis failure: the counts are re-queued, serving goes on
            log.warning("could not write acceptance stats (kept for the next flush): %s", e)
            for version, counts in pending.items():
                self.add(version, **counts)
            return False
