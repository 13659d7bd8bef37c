"""`tide_*` Prometheus metrics of the scheduler process, and per-version acceptance counts for the operator.

The metrics are created on first use inside the scheduler process: SGLang sets PROMETHEUS_MULTIPROC_DIR before it
spawns schedulers, so values land in its multiprocess directory and SGLang's /metrics serves them with its own.
Labels: deployment and draft_version (DESIGN.md, "Fixed names").
"""

import logging
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram

from tide_sglang.capture import CaptureBatch
from tide_sglang.control.policy import bucket
from tide_sglang.stream import WriterStats

log = logging.getLogger("tide.plugin.metrics")

LABELS = ("deployment", "draft_version")
# tide_capture_drops_total reasons for the drops the stream writer's own thread makes (docs/metrics.md)
WRITER_DROPS = {"redis_error": "dropped_redis_error", "backlog": "dropped_backlog", "oversized": "dropped_oversized",
                "invalid": "dropped_invalid"}


def writer_drops(stats: WriterStats, reported: dict[str, int]) -> dict[str, int]:
    """Drops by reason since `reported` (the counts already exported), which is brought up to date."""
    out = {}
    for reason, field in WRITER_DROPS.items():
        now = getattr(stats, field)
        if now > reported.get(reason, 0):
            out[reason] = now - reported.get(reason, 0)
            reported[reason] = now
    return out


class PluginMetrics:
    def __init__(self, deployment: str, registry: CollectorRegistry = REGISTRY) -> None:
        self.deployment = deployment
        self._step_version = -1
        self._step_children: dict[tuple[int, int], Any] = {}  # (batch size, draft steps) -> step_seconds child
        r = {"registry": registry}
        self.captured_tokens = Counter("tide_captured_tokens_total", "Accepted rows handed to the stream", LABELS, **r)
        self.captured_bytes = Counter("tide_captured_bytes_total", "Hidden-state bytes handed to the stream",
                                      LABELS, **r)
        self.drops = Counter("tide_capture_drops_total", "Capture batches dropped instead of blocking",
                             (*LABELS, "reason"), **r)
        self.invalid_domains = Counter("tide_capture_invalid_domains_total",
                                       "Requests whose domain was not a label (their rows went to the default domain)",
                                       LABELS, **r)
        self.swaps = Counter("tide_draft_swaps_total", "Draft versions copied in place", LABELS, **r)
        self.swap_seconds = Histogram("tide_draft_swap_seconds", "Time the in-place copy held the scheduler",
                                      LABELS, **r, buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5))
        self.swap_failures = Counter("tide_draft_swap_failures_total", "Versions refused or failed to stage",
                                     LABELS, **r)
        self.scheduler_seconds = Histogram(
            "tide_plugin_scheduler_seconds", "Scheduler-thread CPU time in TIDE code per decode batch", LABELS, **r,
            buckets=(5e-6, 1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 1e-2))
        # The per-version counts the stats hash holds (rollout.stats.COUNTS), as counters a dashboard can rate.
        self.draft_tokens = Counter("tide_draft_tokens_total", "Draft tokens verified", LABELS, **r)
        self.accepted_tokens = Counter("tide_draft_accepted_tokens_total", "Draft tokens accepted", LABELS, **r)
        self.verify_steps = Counter("tide_verify_steps_total", "Request verify steps", LABELS, **r)
        self.version = Gauge("tide_draft_version", "Draft version loaded in this engine", ("deployment",),
                             multiprocess_mode="mostrecent", **r)
        self.steps = Gauge("tide_speculation_steps", "Draft steps TIDE chose, by batch-size slot",
                           (*LABELS, "batch_size"), multiprocess_mode="mostrecent", **r)
        # Whole decode steps by batch-size bucket and draft steps: what `tide profile` times, and what the
        # controller's online correction reads (docs/controller.md).
        self.step_seconds = Histogram("tide_decode_step_seconds", "Time of one decode batch (the interval between "
                                      "consecutive decode results)", (*LABELS, "batch_size", "draft_steps"), **r,
                                      buckets=(0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56))
        self._serving: set[int] = set()
        self._writer_drops: dict[str, int] = {}  # the stream writer's drops already counted, by reason

    def serving(self, version: int, drop_reasons: tuple[str, ...]) -> None:
        """Create a version's counters at 0 the first time it serves: a panel then plots 0 for what has not
        happened yet (no drop, no swap failure) instead of "No data", and rate() has a first sample."""
        if version in self._serving:
            return
        self._serving.add(version)
        labels = self.labels(version)
        for counter in (self.captured_tokens, self.captured_bytes, self.invalid_domains, self.swap_failures,
                        self.draft_tokens, self.accepted_tokens, self.verify_steps):
            counter.labels(**labels)
        for reason in drop_reasons:
            self.drops.labels(**labels, reason=reason)

    def captured(self, batch: CaptureBatch, submitted: bool) -> None:
        """A capture batch handed to the stream writer, or dropped because its queue was full."""
        labels = self.labels(batch.draft_version)
        if submitted:
            self.captured_tokens.labels(**labels).inc(batch.num_tokens)
            self.captured_bytes.labels(**labels).inc(batch.hidden.numel() * batch.hidden.itemsize)
        else:
            self.drops.labels(**labels, reason="writer_full").inc()

    def writer_dropped(self, version: int, stats: WriterStats) -> None:
        """Count the drops the stream writer's own thread made since the last call (its stats are running totals)."""
        for reason, n in writer_drops(stats, self._writer_drops).items():
            self.drops.labels(**self.labels(version), reason=reason).inc(n)

    def verified(self, version: int, tokens: int, accepted: int, verify_steps: int) -> None:
        """The per-version counts the stats hash gets (rollout.StatsReporter.add), as counters."""
        labels = self.labels(version)
        self.draft_tokens.labels(**labels).inc(tokens)
        self.accepted_tokens.labels(**labels).inc(accepted)
        self.verify_steps.labels(**labels).inc(verify_steps)

    def decode_step(self, version: int, batch_size: int, draft_steps: int, seconds: float) -> None:
        """One decode batch of `batch_size` requests at `draft_steps`, in its batch-size bucket (a power of two, as
        SGLang's adaptive slots and the controller's buckets)."""
        if version != self._step_version:  # children of the current version only
            self._step_children.clear()
            self._step_version = version
        key = (batch_size, draft_steps)
        child = self._step_children.get(key)
        if child is None:  # once per version, batch size and step count: `labels()` costs the scheduler ~15 µs
            child = self._step_children[key] = self.step_seconds.labels(
                **self.labels(version), batch_size=str(bucket(batch_size)), draft_steps=str(draft_steps))
        child.observe(seconds)

    def labels(self, version: int) -> dict[str, str]:
        return {"deployment": self.deployment, "draft_version": str(version)}
