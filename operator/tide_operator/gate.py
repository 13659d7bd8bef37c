"""The training gate (pure): the engines' trigger votes in, the trainer's state and the control state out.

Each engine runs TIDE's training trigger and reports its vote (`train`, `collect`) in its heartbeat. With
`training.gate: trigger` the operator aggregates the live pods' votes with hysteresis:

    Idle ──(a live pod votes train)──► Training ──(no vote for holdFor)──► Idle
    Idle ──(no vote for idleAfter, and up for minUp)──► ScaledDown ──(a live pod votes train)──► Training

Training: the control state's `train` and `collect` are on. Idle: the trainer is up but takes no steps; the
engines capture only while a pod still votes `collect` (its trigger warms up). ScaledDown: the trainer Deployment
has zero replicas and nothing is captured; the next vote scales it back and it resumes from its checkpoint.
A fleet whose live pods report no trigger at all (engines run none) keeps training on, as before the gate
existed; `gate: always` trains all the time; `enabled: false` neither trains nor captures.

The decision and its reason live in `status.training`, so a restarted operator continues the same timers.
"""

import datetime
from collections.abc import Mapping
from dataclasses import dataclass

from tide_operator.models import TrainerState, TrainingSpec, TrainingStatus, seconds
from tide_operator.rollout import Routing, parse_time, stamp
from tide_sglang.rollout import ControlState, Heartbeat

UP = (TrainerState.TRAINING, TrainerState.IDLE)
_LISTED = 5  # pods named in a message; the rest are counted


@dataclass(frozen=True)
class Votes:
    """What the live heartbeats say: how many there are, how many carry a trigger, and who votes for what."""

    live: int = 0
    reporting: int = 0
    train: tuple[str, ...] = ()
    collect: tuple[str, ...] = ()


def votes(beats: Mapping[str, Heartbeat]) -> Votes:
    return Votes(live=len(beats), reporting=sum(b.wants("train") is not None for b in beats.values()),
                 train=tuple(sorted(p for p, b in beats.items() if b.wants("train"))),
                 collect=tuple(sorted(p for p, b in beats.items() if b.wants("collect"))))


def decide(training: TrainingSpec, old: TrainingStatus | None, seen: Votes, now: datetime.datetime) -> TrainingStatus:
    """The gate's state now, from its state on the last pass and the live pods' votes."""
    t = stamp(now)
    last = t if seen.train else old.last_trigger if old else None
    if not training.enabled:
        return _to(old, TrainerState.DISABLED, "TrainingDisabled",
                   "training.enabled is false: no trainer runs and nothing is captured", t, last)
    if training.gate == "always":
        return _to(old, TrainerState.TRAINING, "GateAlways", "training.gate is always: the trainer trains and the "
                   "engines capture whatever their triggers say", t, last)
    if seen.train:
        return _to(old, TrainerState.TRAINING, "TriggerFired",
                   f"{_pods(seen.train)} of {seen.live} live pod(s) vote to train", t, last)
    if seen.live and not seen.reporting:
        return _to(old, TrainerState.TRAINING, "NoTriggerReported",
                   f"none of the {seen.live} live pod(s) reports a training trigger (an engine runs one with "
                   "TIDE_CONTROL_PROFILE): training stays on", t, last)
    if old is None or old.state is TrainerState.DISABLED:
        return _to(old, TrainerState.IDLE, "AwaitingTrigger", "no live pod has voted to train yet", t, last)
    if old.state is TrainerState.SCALED_DOWN:
        return _to(old, TrainerState.SCALED_DOWN, old.reason, old.message, t, last)
    if old.state is TrainerState.TRAINING and last is not None \
            and (now - parse_time(last)).total_seconds() < seconds(training.hold_for):
        return _to(old, TrainerState.TRAINING, "TriggerHeld", f"no live pod votes to train now; training stays on "
                   f"for holdFor ({training.hold_for}) after the last vote", t, last)
    up = parse_time(old.up_since or old.since)
    quiet = max(up, parse_time(last)) if last is not None else up
    down = max(quiet + datetime.timedelta(seconds=seconds(training.idle_after)),
               up + datetime.timedelta(seconds=seconds(training.min_up)))
    never = f"since {last}" if last is not None else "since the trainer came up"
    if now >= down:
        return _to(old, TrainerState.SCALED_DOWN, "IdleAfter",
                   f"no live pod voted to train {never} (idleAfter {training.idle_after}, minUp {training.min_up}): "
                   "the trainer is scaled to zero until one does", t, last)
    return _to(old, TrainerState.IDLE, "NoTrigger", f"no live pod votes to train ({never}); the trainer is scaled "
               f"to zero at {stamp(down)} unless one does", t, last)


def _to(old: TrainingStatus | None, state: TrainerState, reason: str, message: str, now: str,
        last: str | None) -> TrainingStatus:
    kept = old.up_since if old is not None and old.state in UP else None
    return TrainingStatus(state=state, reason=reason, message=message, last_trigger=last,
                          since=old.since if old is not None and old.state is state else now,
                          up_since=(kept or now) if state in UP else None)


def _pods(pods: tuple[str, ...]) -> str:
    more = len(pods) - _LISTED
    return ", ".join(pods[:_LISTED]) + (f" and {more} more" if more > 0 else "")


def replicas(status: TrainingStatus | None) -> int:
    """Trainer pods the gate wants (before its first decision: one)."""
    return 0 if status is not None and status.state is TrainerState.SCALED_DOWN else 1


def control_state(route: Routing, status: TrainingStatus, seen: Votes) -> ControlState:
    """The control state for the engines and the trainer: the routing, and `train` / `collect` from the gate."""
    train = status.state is TrainerState.TRAINING
    collect = train or (status.state is TrainerState.IDLE and bool(seen.collect))
    return ControlState(stable=route.stable, canary=route.canary, canary_pods=route.canary_pods,
                        train=train, collect=collect)
