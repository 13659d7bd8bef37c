"""The trainer's Prometheus metrics (names fixed by docs/metrics.md and read by the training dashboard).

Each trainer owns its registry (several trainers can live in one test process); `tide train` serves it on
TIDE_TRAIN_METRICS_PORT, the container port named `metrics`.
"""

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server


class TrainerMetrics:
    def __init__(self, deployment: str, registry: CollectorRegistry | None = None) -> None:
        self.deployment = deployment
        self.registry = registry or CollectorRegistry()
        r, d = self.registry, ("deployment",)
        self.loss = Gauge("tide_trainer_loss", "Training-time-test loss of the last step before the last "
                          "evaluation (read back only then: reading it every step would wait for the GPU)", d,
                          registry=r)
        self.tokens = Counter("tide_trainer_tokens", "Captured tokens trained on", d, registry=r)
        self.heldout = Gauge("tide_trainer_heldout_acceptance", "Held-out acceptance length of the candidate "
                             "and the deployed draft", (*d, "draft_version", "model"), registry=r)
        self.lag = Gauge("tide_stream_lag_entries", "Stream entries not yet delivered to the trainers", d,
                         registry=r)
        self.pending = Gauge("tide_stream_pending_entries", "Entries delivered and not yet acknowledged", d,
                             registry=r)
        self.dead_letters = Counter("tide_stream_dead_letters", "Entries moved to the dead-letter stream: refused "
                                    "by the codec or delivered too often without an ack", d, registry=r)
        self.redis_errors = Counter("tide_trainer_redis_errors", "Redis errors the trainer's stream reader "
                                    "retried with backoff", d, registry=r)
        self._reader_counts = (0, 0)  # dead letters and Redis errors already counted

    def step(self, rows: int) -> None:
        self.tokens.labels(self.deployment).inc(rows)

    def evaluation(self, candidate: float, deployed: float, deployed_version: int | None, loss: float) -> None:
        self.loss.labels(self.deployment).set(loss)
        version = str(deployed_version if deployed_version is not None else 0)
        self.heldout.labels(self.deployment, version, "deployed").set(deployed)
        self.heldout.labels(self.deployment, version, "candidate").set(candidate)

    def reader(self, dead_lettered: int, redis_errors: int) -> None:
        """The reader's running totals; the counters grow by what is new since the last call."""
        done_dead, done_errors = self._reader_counts
        self.dead_letters.labels(self.deployment).inc(dead_lettered - done_dead)
        self.redis_errors.labels(self.deployment).inc(redis_errors - done_errors)
        self._reader_counts = (dead_lettered, redis_errors)

    def stream(self, lag: int | None, pending: int) -> None:
        if lag is not None:
            self.lag.labels(self.deployment).set(lag)
        self.pending.labels(self.deployment).set(pending)

    def serve(self, port: int) -> None:
        start_http_server(port, registry=self.registry)
