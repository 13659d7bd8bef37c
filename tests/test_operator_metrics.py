"""The operator's rollout-state gauges (tide_operator.metrics): what a pass recorded, as the Rollout dashboard reads
it. That a real Prometheus scrapes them from the running operator is tests/test_dashboards_e2e.py."""

import time

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from tide_operator import metrics
from tide_operator.models import (
    Condition,
    DraftVersionStatus,
    Phase,
    TideDeploymentStatus,
    TrainerState,
    TrainingStatus,
)

T = "2026-12-02T12:00:00Z"


def mid_canary() -> tuple[TideDeploymentStatus, dict[int, DraftVersionStatus]]:
    status = TideDeploymentStatus(
        stable=3, canary=4, acceptance=0.66,
        training=TrainingStatus(state=TrainerState.IDLE, reason="AwaitingTrigger", since=T),
        conditions=[Condition(type="Progressing", status="True", reason="Canary", last_transition_time=T),
                    Condition(type="Ready", status="False", reason="PodsNotReady", last_transition_time=T)])
    versions = {3: DraftVersionStatus(phase=Phase.PROMOTED, promotion=1),
                4: DraftVersionStatus(phase=Phase.CANARY, acceptance=0.71, stable_acceptance=0.66)}
    return status, versions


def samples(snapshots: metrics.Snapshots) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = generate_latest(metrics.registry(snapshots)).decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(text) for s in f.samples}


def test_a_pass_becomes_the_rollout_series() -> None:
    snapshots = metrics.Snapshots(interval_s=10)
    snapshots.record("serving", "chat", *mid_canary())
    got = samples(snapshots)
    td = (("deployment", "chat"), ("namespace", "serving"))
    assert got[("tide_tidedeployment_stable_version", td)] == 3
    assert got[("tide_tidedeployment_canary_version", td)] == 4
    assert got[("tide_tidedeployment_acceptance", td)] == 0.66
    assert {dict(k)["state"]: v for (n, k), v in got.items() if n == "tide_tidedeployment_trainer_state"} == {
        "Training": 0, "Idle": 1, "ScaledDown": 0, "Disabled": 0}
    assert {dict(k)["type"]: (dict(k)["reason"], v) for (n, k), v in got.items()
            if n == "tide_tidedeployment_condition"} == {"Progressing": ("Canary", 1), "Ready": ("PodsNotReady", 0)}
    phases = {(dict(k)["draft_version"], dict(k)["phase"]) for (n, k), v in got.items()
              if n == "tide_draftversion_phase" and v == 1}
    assert phases == {("3", "Promoted"), ("4", "Canary")}
    assert len([k for k in got if k[0] == "tide_draftversion_phase"]) == 2 * len(Phase)
    v4 = (("deployment", "chat"), ("draft_version", "4"), ("namespace", "serving"))
    assert got[("tide_draftversion_canary_acceptance", v4)] == 0.71
    assert got[("tide_draftversion_stable_acceptance", v4)] == 0.66
    assert not [k for k in got if k[0].startswith("tide_draftversion_") and "acceptance" in k[0]
                and ("draft_version", "3") in k[1]]  # never canaried: no acceptance series


def test_no_canary_no_canary_version_and_no_training_status_no_trainer_state() -> None:
    snapshots = metrics.Snapshots(interval_s=10)
    snapshots.record("serving", "chat", TideDeploymentStatus(stable=0), {0: DraftVersionStatus(phase=Phase.PROMOTED)})
    names = {n for n, _ in samples(snapshots)}
    assert "tide_tidedeployment_stable_version" in names
    assert not names & {"tide_tidedeployment_canary_version", "tide_tidedeployment_trainer_state",
                        "tide_tidedeployment_acceptance"}


def test_stale_and_forgotten_deployments_export_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    snapshots = metrics.Snapshots(interval_s=10)
    snapshots.record("serving", "chat", *mid_canary())
    snapshots.record("serving", "code", *mid_canary())
    snapshots.forget("serving", "code")
    assert [s.name for s in snapshots.fresh()] == ["chat"]
    now = time.monotonic()
    monkeypatch.setattr(metrics.time, "monotonic", lambda: now + metrics.STALE_PASSES * 10 + 1)
    assert snapshots.fresh() == []
    assert not [k for k in samples(snapshots)]
