"""The operator's own Prometheus metrics: the rollout state it writes into TideDeployment and DraftVersion statuses,
as the tide_tidedeployment_* and tide_draftversion_* series of the Rollout dashboard (docs/metrics.md).

Each reconcile pass records the statuses it wrote (`Snapshots.record`); a scrape turns the latest ones into
gauges (`families`, pure). A deployment not reconciled for `STALE_PASSES` intervals is left out: a standby replica
of a peering, or one whose TideDeployment is gone, exports nothing rather than a frozen state.
"""

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from tide_operator.models import DraftVersionStatus, Phase, TideDeploymentStatus, TrainerState

STALE_PASSES = 3
_TD, _DV = ("namespace", "deployment"), ("namespace", "deployment", "draft_version")


@dataclass(frozen=True)
class Snapshot:
    """What one pass wrote for one TideDeployment, and when (time.monotonic())."""

    namespace: str
    name: str
    status: TideDeploymentStatus
    versions: dict[int, DraftVersionStatus]
    at: float


def families(snapshots: list[Snapshot]) -> list[GaugeMetricFamily]:
    """The rollout state as gauges; phases and trainer states as state sets (1 for the current one)."""
    g = {name: GaugeMetricFamily(f"tide_{name}", doc, labels=labels) for name, doc, labels in (
        ("draftversion_phase", "Rollout phase of a draft version (1 for the current phase)", (*_DV, "phase")),
        ("draftversion_canary_acceptance", "Canary acceptance rate of the version over its canary window", _DV),
        ("draftversion_stable_acceptance", "Stable acceptance rate over the same window", _DV),
        ("tidedeployment_stable_version", "Draft version every stable pod loads (status.stable)", _TD),
        ("tidedeployment_canary_version", "Draft version the canary pods load (absent when no canary runs)", _TD),
        ("tidedeployment_acceptance", "Stable version's draft acceptance rate (status.acceptance)", _TD),
        ("tidedeployment_trainer_state", "Training gate's trainer state (1 for the current state)", (*_TD, "state")),
        ("tidedeployment_condition", "Status conditions (1 when True)", (*_TD, "type", "reason")))}
    for s in snapshots:
        td, st = [s.namespace, s.name], s.status
        g["tidedeployment_stable_version"].add_metric(td, st.stable)
        if st.canary is not None:
            g["tidedeployment_canary_version"].add_metric(td, st.canary)
        if st.acceptance is not None:
            g["tidedeployment_acceptance"].add_metric(td, st.acceptance)
        if st.training is not None:
            for state in TrainerState:
                g["tidedeployment_trainer_state"].add_metric([*td, state.value], float(st.training.state == state))
        for c in st.conditions:
            g["tidedeployment_condition"].add_metric([*td, c.type, c.reason], float(c.status == "True"))
        for version, dv in sorted(s.versions.items()):
            labels = [*td, str(version)]
            for phase in Phase:
                g["draftversion_phase"].add_metric([*labels, phase.value], float(dv.phase == phase))
            if dv.acceptance is not None:
                g["draftversion_canary_acceptance"].add_metric(labels, dv.acceptance)
            if dv.stable_acceptance is not None:
                g["draftversion_stable_acceptance"].add_metric(labels, dv.stable_acceptance)
    return list(g.values())


class Snapshots(Collector):
    """The latest pass of every TideDeployment; a prometheus_client collector over them."""

    def __init__(self, interval_s: float) -> None:
        self.max_age = STALE_PASSES * interval_s
        self._latest: dict[tuple[str, str], Snapshot] = {}
        self._lock = threading.Lock()

    def record(self, namespace: str, name: str, status: TideDeploymentStatus,
               versions: dict[int, DraftVersionStatus]) -> None:
        with self._lock:
            self._latest[namespace, name] = Snapshot(namespace, name, status, dict(versions), time.monotonic())

    def forget(self, namespace: str, name: str) -> None:
        with self._lock:
            self._latest.pop((namespace, name), None)

    def fresh(self) -> list[Snapshot]:
        now = time.monotonic()
        with self._lock:
            return [s for s in self._latest.values() if now - s.at <= self.max_age]

    def collect(self) -> Iterator[GaugeMetricFamily]:
        yield from families(self.fresh())


def registry(snapshots: Snapshots) -> CollectorRegistry:
    reg = CollectorRegistry()
    reg.register(snapshots)
    return reg
