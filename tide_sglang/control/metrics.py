"""Controller decisions and their inputs as Prometheus metrics, so a dashboard can explain every switch.

Metrics are created lazily, on first write, in the registry given: SGLang runs the scheduler in spawned
processes with prometheus_client's multiprocess mode, where metrics must be created inside that process and
registered nowhere (pass `registry=None`; values go to PROMETHEUS_MULTIPROC_DIR and SGLang's collector reads
them). Gauges use multiprocess mode "mostrecent": the last writer wins, which is what a decision gauge means.
"""

import threading
from dataclasses import dataclass

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge

_BASE = ("deployment", "draft_version")
_BATCH = (*_BASE, "batch")  # per batch-size bucket: decisions are per bucket (policy.py)


@dataclass(frozen=True)
class _Family:
    spec_steps: Gauge
    predicted_speedup: Gauge
    best_steps: Gauge
    switches: Counter
    probes: Counter
    acceptance_ewma: Gauge
    acceptance_window: Gauge
    changepoint: Counter
    changepoint_statistic: Gauge
    changepoint_threshold: Gauge
    trigger_active: Gauge
    trigger_collect: Gauge
    short_ewma: Gauge
    long_ewma: Gauge


def _gauge(name: str, doc: str, labels: tuple[str, ...], registry: CollectorRegistry | None) -> Gauge:
    return Gauge(name, doc, labels, registry=registry, multiprocess_mode="mostrecent")


def _create(r: CollectorRegistry | None) -> _Family:
    return _Family(
        spec_steps=_gauge("tide_controller_spec_steps", "Draft steps chosen (0: speculation off)", _BATCH, r),
        predicted_speedup=_gauge("tide_controller_predicted_speedup",
                                 "Model speedup S at the chosen steps (1: no speculation)", _BATCH, r),
        best_steps=_gauge("tide_controller_best_steps",
                          "The model's argmax steps, before hysteresis adopts it", _BATCH, r),
        switches=Counter("tide_controller_switches_total", "Changes of the chosen steps", _BATCH, registry=r),
        probes=Counter("tide_controller_probes_total",
                       "Decisions that speculated while off, to keep measuring acceptance", _BASE, registry=r),
        acceptance_ewma=_gauge("tide_controller_acceptance_ewma",
                               "Per-token acceptance a, EWMA over verify steps, per draft version", _BASE, r),
        acceptance_window=_gauge("tide_controller_acceptance_window",
                                 "Per-token acceptance of the last complete window", _BASE, r),
        changepoint=Counter("tide_controller_changepoint_total",
                            "Abrupt acceptance drops detected (CUSUM alarms)", _BASE, registry=r),
        changepoint_statistic=_gauge("tide_controller_changepoint_statistic",
                                     "CUSUM statistic in standard deviations; alarms above the threshold",
                                     _BASE, r),
        changepoint_threshold=_gauge("tide_controller_changepoint_threshold",
                                     "CUSUM alarm threshold (from the false-alarm rate)", _BASE, r),
        trigger_active=_gauge("tide_trainer_trigger_active", "1 while training is wanted", _BASE, r),
        trigger_collect=_gauge("tide_trainer_trigger_collect",
                               "1 while hidden states should be captured", _BASE, r),
        short_ewma=_gauge("tide_trainer_acceptance_short_ewma", "Trigger's short acceptance EWMA", _BASE, r),
        long_ewma=_gauge("tide_trainer_acceptance_long_ewma", "Trigger's long acceptance EWMA", _BASE, r),
    )


# One family per registry: prometheus_client refuses to register a name twice in one registry.
_FAMILIES: dict[int, tuple[CollectorRegistry | None, _Family]] = {}
_LOCK = threading.Lock()


def _family(registry: CollectorRegistry | None) -> _Family:
    with _LOCK:
        entry = _FAMILIES.get(id(registry))
        if entry is None or entry[0] is not registry:
            entry = (registry, _create(registry))
            _FAMILIES[id(registry)] = entry
        return entry[1]


class ControlMetrics:
    """Writes controller and trigger values; nothing is created until the first write."""

    def __init__(self, deployment: str, registry: CollectorRegistry | None = REGISTRY):
        self.deployment = deployment
        self.registry = registry
        self._f: _Family | None = None

    @property
    def family(self) -> _Family:
        if self._f is None:
            self._f = _family(self.registry)
        return self._f

    def decision(self, version: int, batch: int, steps: int, best: int, predicted: float,
                 switched: bool) -> None:
        f, labels = self.family, (self.deployment, str(version), str(batch))
        f.spec_steps.labels(*labels).set(steps)
        f.best_steps.labels(*labels).set(best)
        f.predicted_speedup.labels(*labels).set(predicted)
        # Counters exist at 0 from the first decision, so a panel plots "none yet" rather than "No data".
        switches = f.switches.labels(*labels)
        f.probes.labels(self.deployment, str(version))
        if switched:
            switches.inc()

    def probe(self, version: int) -> None:
        self.family.probes.labels(self.deployment, str(version)).inc()

    def acceptance(self, version: int, ewma: float) -> None:
        self.family.acceptance_ewma.labels(self.deployment, str(version)).set(ewma)

    def window(self, version: int, acceptance: float, statistic: float, threshold: float,
               changepoint: bool) -> None:
        f, labels = self.family, (self.deployment, str(version))
        f.acceptance_window.labels(*labels).set(acceptance)
        f.changepoint_statistic.labels(*labels).set(statistic)
        f.changepoint_threshold.labels(*labels).set(threshold)
        alarms = f.changepoint.labels(*labels)
        if changepoint:
            alarms.inc()

    def trigger(self, version: int, train: bool, collect: bool, short: float, long: float) -> None:
        f, labels = self.family, (self.deployment, str(version))
        f.trigger_active.labels(*labels).set(int(train))
        f.trigger_collect.labels(*labels).set(int(collect))
        f.short_ewma.labels(*labels).set(short)
        f.long_ewma.labels(*labels).set(long)
