"""The training gate, table by table (pure functions: no cluster, no Redis).

A timeline is one operator pass per minute; each character is what the live pods say on that pass:
`T` one votes to train, `c` one votes only to collect (its trigger warms up), `.` they report a trigger that votes
for nothing, `n` they report no trigger at all, `-` no live pod. The gate's answer per pass: `T` Training, `I` Idle,
`S` ScaledDown, `D` Disabled.
"""

import datetime

import pytest
from tide_operator import gate
from tide_operator.gate import Votes
from tide_operator.models import TrainerState, TrainingSpec, TrainingStatus
from tide_operator.rollout import Routing, stamp

from tide_sglang.rollout import Heartbeat

T0 = datetime.datetime(2026, 11, 25, 18, 0, tzinfo=datetime.UTC)
TRIGGER = TrainingSpec(gate="trigger", hold_for="2m", idle_after="10m", min_up="15m")
SAID = {"T": Votes(live=2, reporting=2, train=("a",), collect=("a", "b")),
        "c": Votes(live=2, reporting=2, collect=("b",)),
        ".": Votes(live=2, reporting=2),
        "n": Votes(live=2),
        "-": Votes()}
LETTER = {TrainerState.TRAINING: "T", TrainerState.IDLE: "I", TrainerState.SCALED_DOWN: "S",
          TrainerState.DISABLED: "D"}


def walk(spec: TrainingSpec, said: str, old: TrainingStatus | None = None) -> tuple[str, list[TrainingStatus]]:
    out = []
    for minute, what in enumerate(said):
        old = gate.decide(spec, old, SAID[what], T0 + datetime.timedelta(minutes=minute))
        out.append(old)
    return "".join(LETTER[s.state] for s in out), out


@pytest.mark.parametrize(("spec", "said", "expected"), [
    # a vote trains; holdFor (2m) after the last vote the trainer idles; scaled down once idleAfter (10m) has
    # passed since the last vote and minUp (15m) since it came up
    (TRIGGER, "T" + "." * 20, "TT" + "I" * 13 + "S" * 6),
    # hysteresis: votes that come and go within holdFor never switch training off
    (TRIGGER, "T.T.T.T.T.T.T.T.T.T.", "T" * 20),
    (TRIGGER, "T..T..T..T..", "TTITTITTITTI"),  # gaps of holdFor: Idle in between, never scaled down
    # idleAfter counts from the last vote: a late vote postpones the scale-down
    (TRIGGER, "T" * 12 + "." * 12, "T" * 13 + "I" * 8 + "SSS"),
    # minUp: with idleAfter 1m the trainer still stays up 15m after it came up
    (TRIGGER.model_copy(update={"idle_after": "1m"}), "T" + "." * 16, "TT" + "I" * 13 + "SS"),
    # idleAfter binds when it is the longer one
    (TRIGGER.model_copy(update={"min_up": "1m"}), "T" + "." * 12, "TT" + "I" * 8 + "SSS"),
    # scaled down, a vote brings it back at once; minUp counts again from then
    (TRIGGER.model_copy(update={"idle_after": "1m", "min_up": "3m"}), "T....T....", "TTISSTTISS"),
    # a new deployment waits for a vote; warming-up pods (collect only) or no pod at all do not scale it up
    (TRIGGER, "c" * 16, "I" * 15 + "S"),
    (TRIGGER, "-" * 14 + "T", "I" * 14 + "T"),
    (TRIGGER, "----------------c", "I" * 15 + "SS"),
    # live pods reporting no trigger at all (engines run none): training stays on, as without a gate
    (TRIGGER, "n" * 30, "T" * 30),
    (TRIGGER, "T" + "." * 16 + "n", "TT" + "I" * 13 + "SST"),
    # gate always never scales down; enabled false never trains
    (TRIGGER.model_copy(update={"gate": "always"}), "." * 30 + "-" * 30, "T" * 60),
    (TRIGGER.model_copy(update={"enabled": False}), "T.n-", "DDDD"),
])
def test_gate_timeline(spec: TrainingSpec, said: str, expected: str) -> None:
    assert walk(spec, said)[0] == expected


def test_status_says_why_and_keeps_its_timers() -> None:
    _, passes = walk(TRIGGER, "T.T" + "." * 16)
    fired, held, idle, down = passes[0], passes[1], passes[4], passes[-1]
    assert (fired.reason, fired.message) == ("TriggerFired", "a of 2 live pod(s) vote to train")
    assert held.reason == "TriggerHeld" and held.since == fired.since == stamp(T0)  # no flap: since is kept
    assert passes[2].last_trigger == stamp(T0 + datetime.timedelta(minutes=2))
    assert idle.reason == "NoTrigger" and idle.up_since == stamp(T0)
    assert idle.message == (f"no live pod votes to train (since {stamp(T0 + datetime.timedelta(minutes=2))}); "
                            f"the trainer is scaled to zero at {stamp(T0 + datetime.timedelta(minutes=15))} "
                            "unless one does")
    assert down.state is TrainerState.SCALED_DOWN and down.reason == "IdleAfter" and down.up_since is None
    assert down.since == stamp(T0 + datetime.timedelta(minutes=15)) and gate.replicas(down) == 0
    assert [gate.replicas(p) for p in passes[:15]] == [1] * 15 and gate.replicas(None) == 1


@pytest.mark.parametrize(("spec", "said", "reason"), [
    (TRIGGER, "-", "AwaitingTrigger"),
    (TRIGGER, "n", "NoTriggerReported"),
    (TRIGGER.model_copy(update={"gate": "always"}), ".", "GateAlways"),
    (TRIGGER.model_copy(update={"enabled": False}), "T", "TrainingDisabled"),
])
def test_reasons(spec: TrainingSpec, said: str, reason: str) -> None:
    assert walk(spec, said)[1][0].reason == reason


def test_switching_the_gate_to_always_scales_a_scaled_down_trainer_back() -> None:
    _, passes = walk(TRIGGER.model_copy(update={"idle_after": "1m", "min_up": "1m"}), "T....")
    assert passes[-1].state is TrainerState.SCALED_DOWN
    back = gate.decide(TRIGGER.model_copy(update={"gate": "always"}), passes[-1], SAID["."], T0)
    assert (back.state, back.reason, back.up_since, gate.replicas(back)) == (
        TrainerState.TRAINING, "GateAlways", stamp(T0), 1)


@pytest.mark.parametrize(("state", "said", "train", "collect"), [
    (TrainerState.TRAINING, ".", True, True),
    (TrainerState.IDLE, "c", False, True),  # pods warming up collect for the trainer that is up
    (TrainerState.IDLE, ".", False, False),
    (TrainerState.SCALED_DOWN, "c", False, False),  # no trainer: nothing captured
    (TrainerState.DISABLED, "T", False, False),
])
def test_control_state(state: TrainerState, said: str, train: bool, collect: bool) -> None:
    status = TrainingStatus(state=state, reason="X", since=stamp(T0))
    ctl = gate.control_state(Routing(3, 4, ("a",)), status, SAID[said])
    assert (ctl.train, ctl.collect) == (train, collect)
    assert (ctl.stable, ctl.canary, ctl.canary_pods, ctl.version_for("a")) == (3, 4, ("a",), 4)


def test_votes_from_heartbeats() -> None:
    def beat(pod: str, **trigger: object) -> Heartbeat:
        return Heartbeat(pod=pod, role="stable", version=0, trigger=trigger, time=0.0)

    beats = {"a": beat("a", state="active", train=True, collect=True, short=0.5),
             "b": beat("b", state="warmup", train=False, collect=True), "c": beat("c")}
    assert gate.votes(beats) == Votes(live=3, reporting=2, train=("a",), collect=("a", "b"))
