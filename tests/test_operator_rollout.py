"""The rollout state machine, table by table (pure functions: no cluster, no Redis)."""

import datetime

import pytest
from tide_operator.models import Baseline, Counters, DraftSpec, DraftVersionStatus, Phase, RolloutSpec
from tide_operator.rollout import (
    Fleet,
    Routing,
    canary_count,
    pick_canary_pods,
    retired,
    routing,
    stamp,
    step,
    window,
)

T0 = datetime.datetime(2026, 11, 25, 18, 0, tzinfo=datetime.UTC)
NOW = stamp(T0)
P, C, K, R, X = Phase.PROMOTED, Phase.CANDIDATE, Phase.CANARY, Phase.ROLLED_BACK, Phase.REJECTED
PG, RB = Phase.PROMOTING, Phase.ROLLING_BACK
AUTO = DraftSpec(initial_path="/d")
RULES = RolloutSpec(min_tokens=1000, max_tokens=10_000, min_improvement=0.02, rollback_threshold=0.02)
PODS = ("a", "b", "c")


def st(phase: Phase, promotion: int | None = None, baseline: Baseline | None = None, pods: tuple = (),
       since: str = NOW) -> DraftVersionStatus:
    return DraftVersionStatus(phase=phase, promotion=promotion, baseline=baseline, canary_pods=list(pods),
                              last_transition_time=since)


def c(tokens: int, accepted: int, swap_failures: int = 0) -> Counters:
    return Counters(tokens=tokens, accepted=accepted, swap_failures=swap_failures)


def serving(route: Routing, pods: tuple = PODS) -> Fleet:
    """Every pod serves what the routing gives it."""
    return Fleet({p: route.version_for(p) for p in pods}, ready=len(pods))


def phases(changes: dict[int, DraftVersionStatus]) -> dict[int, tuple[Phase, str]]:
    return {v: (s.phase, s.reason) for v, s in changes.items()}


@pytest.mark.parametrize(("versions", "expected"), [
    ({}, Routing(0)),
    ({0: st(P, 0)}, Routing(0)),
    ({0: st(P, 0), 1: st(K, pods=("b",))}, Routing(0, 1, ("b",))),
    ({0: st(P, 0), 1: st(P, 1), 2: st(R)}, Routing(1)),
    ({0: st(P, 0), 1: st(PG, 1)}, Routing(1)),  # a promotion routes every pod at once
    ({0: st(P, 0), 1: st(RB)}, Routing(0)),  # a rollback withdraws the canary at once
    ({0: st(P, 3), 1: st(R), 2: st(P, 2)}, Routing(0)),  # pinned back to 0 after 2 was promoted
    ({0: st(P, 0), 1: st(X), 2: st(C)}, Routing(0)),
])
def test_routing(versions: dict, expected: Routing) -> None:
    assert routing(versions) == expected


@pytest.mark.parametrize(("count", "percent", "live", "expected"), [
    (1, None, 0, 0),
    (1, None, 1, 1),  # one pod: it is the canary, stable is judged on its counters before
    (1, None, 4, 1),
    (5, None, 2, 1),  # never every pod while more than one is live
    (1, 25, 8, 2),
    (1, 10, 3, 1),  # a percentage rounds up to at least one pod
    (3, 50, 20, 10),  # the percentage overrides the count
])
def test_canary_count(count: int, percent: int | None, live: int, expected: int) -> None:
    assert canary_count(RolloutSpec(canary_replicas=count, canary_percent=percent), live) == expected


@pytest.mark.parametrize(("live", "named", "expected"), [
    (["c", "a", "b"], [], ["a"]),
    (["a", "b", "c"], ["c"], ["c"]),  # the pods named keep their version
    (["a", "b", "d"], ["c"], ["a"]),  # c died or was scaled away: replaced
    (["a", "b", "c", "d", "e", "f"], ["e"], ["a", "e"]),  # scaled up: topped up (25% of 6 rounds up to 2)
    (["a", "e", "f"], ["a", "e"], ["a"]),  # scaled down: cut
])
def test_pick_canary_pods(live: list, named: list, expected: list) -> None:
    assert pick_canary_pods(RolloutSpec(canary_percent=25), live, named) == expected


@pytest.mark.parametrize(("loaded", "ready", "route", "lagging", "serves"), [
    ({"a": 1, "b": 1}, 2, Routing(1), {}, True),
    ({"a": 1, "b": 0}, 2, Routing(1), {"b": 0}, False),
    ({"a": 2, "b": 1}, 2, Routing(1, 2, ("a",)), {}, True),
    ({"a": 1, "b": 1}, 2, Routing(1, 2, ("a",)), {"a": 1}, False),
    ({"a": 1}, 2, Routing(1), {}, False),  # a ready pod has not reported
    ({}, 0, Routing(0), {}, False),  # no pod: nothing serves
])
def test_fleet(loaded: dict, ready: int, route: Routing, lagging: dict, serves: bool) -> None:
    fleet = Fleet(loaded, ready)
    assert (fleet.lagging(route), fleet.serves(route)) == (lagging, serves)


@pytest.mark.parametrize(("versions", "expected"), [
    # nothing published
    ({0: st(P, 0)}, {}),
    # the newest candidate goes canary, older ones are superseded
    ({0: st(P, 0), 1: st(C)}, {1: (K, "Observing")}),
    ({0: st(P, 0), 1: st(C), 2: st(C), 3: st(C)},
     {1: (X, "Superseded"), 2: (X, "Superseded"), 3: (K, "Observing")}),
    # a candidate not newer than stable is stale
    ({0: st(P, 0), 4: st(P, 1), 3: st(C)}, {3: (X, "Stale")}),
    # finished versions stay as they are
    ({0: st(P, 0), 1: st(R), 2: st(X)}, {}),
])
def test_candidates_start_a_canary(versions: dict, expected: dict) -> None:
    out = step(AUTO, RULES, versions, {0: c(500, 300)}, serving(routing(versions)), T0)
    assert phases(out) == expected


def test_canary_start_names_pods_and_records_stable_baseline() -> None:
    versions = {0: st(P, 0), 2: st(P, 1), 3: st(C)}
    out = step(AUTO, RULES, versions, {2: c(5000, 3500)}, serving(routing(versions)), T0)
    assert out[3].baseline == Baseline(version=2, tokens=5000, accepted=3500)
    assert out[3].canary_pods == ["a"] and out[3].last_transition_time == NOW
    assert routing({**versions, **out}) == Routing(2, 3, ("a",))


@pytest.mark.parametrize(("fleet", "why"), [
    (Fleet({"a": 0, "b": 1, "c": 1}, 3), "a pod still serves the old stable"),
    (Fleet({"a": 1, "b": 1}, 3), "a ready pod has not reported"),
    (Fleet({}, 0), "no pod at all"),
])
def test_canary_waits_for_a_fleet_that_serves_stable(fleet: Fleet, why: str) -> None:
    assert step(AUTO, RULES, {0: st(P, 0), 1: st(P, 1), 2: st(C)}, {}, fleet, T0) == {}, why


BASE = Baseline(version=0, tokens=10_000, accepted=6_000)  # stable at 0.60 before the canary
CANARY = {0: st(P, 0), 1: st(K, baseline=BASE, pods=("a",))}


@pytest.mark.parametrize(("stable_now", "canary", "expected"), [
    # too few tokens on either side: keep observing
    (c(10_500, 6_300), c(5_000, 4_000), (K, "Observing")),
    (c(20_000, 12_000), c(999, 900), (K, "Observing")),
    # canary 0.70 vs stable window 0.60: promote (every pod must then confirm)
    (c(12_000, 7_200), c(1_000, 700), (PG, "BetterAcceptance")),
    # improvement exactly at the threshold promotes
    (c(12_000, 7_200), c(1_000, 620), (PG, "BetterAcceptance")),
    # improvement below the threshold and within the band: keep observing
    (c(12_000, 7_200), c(1_000, 610), (K, "Observing")),
    # canary 0.50 vs 0.60: roll back
    (c(12_000, 7_200), c(1_000, 500), (RB, "WorseAcceptance")),
    # stable judged on the window only: all-time stable is 0.60, the window is 0.80, canary 0.70 is worse
    (c(12_000, 7_600), c(1_000, 700), (RB, "WorseAcceptance")),
    # a swap failure rolls back before any token is counted
    (c(10_000, 6_000), c(0, 0, swap_failures=1), (RB, "SwapFailed")),
    # undecided after max_tokens: rejected
    (c(30_000, 18_000), c(10_000, 6_050), (X, "Inconclusive")),
    # Redis lost its data (counter below baseline): the current counters are the window
    (c(2_000, 1_000), c(1_000, 700), (PG, "BetterAcceptance")),
])
def test_canary_verdicts(stable_now: Counters, canary: Counters, expected: tuple) -> None:
    out = step(AUTO, RULES, CANARY, {0: stable_now, 1: canary}, serving(routing(CANARY)), T0)
    assert (out[1].phase, out[1].reason) == expected
    after = routing({**CANARY, **out})
    if expected[0] == PG:
        assert out[1].promotion == 1 and after == Routing(1)
    if expected[0] in (RB, X):
        assert after == Routing(0) and out[1].canary_pods == []


def test_one_pod_canary_is_judged_against_stable_before_it() -> None:
    versions = {0: st(P, 0), 1: st(K, baseline=BASE, pods=("a",))}
    fleet = Fleet({"a": 1}, 1)  # the only pod is the canary: stable gets no traffic in the window
    out = step(AUTO, RULES, versions, {0: c(10_000, 6_000), 1: c(1_000, 700)}, fleet, T0)
    assert (out[1].phase, out[1].stable_acceptance) == (PG, 0.6)


def test_canary_pod_gone_is_replaced() -> None:
    fleet = Fleet({"b": 0, "c": 0}, 2)  # pod a, the canary, was scaled away
    out = step(AUTO, RULES, CANARY, {0: c(10_100, 6_060)}, fleet, T0)
    assert out[1].phase == K and out[1].canary_pods == ["b"]
    assert routing({**CANARY, **out}).canary_pods == ("b",)


@pytest.mark.parametrize(("loaded", "canary", "reason"), [
    ({"a": 0, "b": 0}, c(0, 0), "canary pods never loaded v1: a"),
    ({"a": 1, "b": 0}, c(40, 30), "too little traffic: 40 canary and 100 stable tokens of 1000"),
])
def test_canary_timeout_rejects_with_the_reason(loaded: dict, canary: Counters, reason: str) -> None:
    stats = {0: c(10_100, 6_060), 1: canary}
    fleet = Fleet(loaded, 2)
    assert phases(step(AUTO, RULES, CANARY, stats, fleet, T0 + datetime.timedelta(minutes=59))) == \
        {1: (K, "Observing")}
    out = step(AUTO, RULES, CANARY, stats, fleet, T0 + datetime.timedelta(hours=1))
    assert (out[1].phase, out[1].reason) == (X, "CanaryTimeout") and reason in out[1].message
    assert routing({**CANARY, **out}) == Routing(0)  # the canary no longer blocks later versions


def test_unchanged_canary_writes_nothing() -> None:
    stats = {0: c(10_100, 6_060), 1: c(10, 7)}
    fleet = serving(routing(CANARY))
    first = step(AUTO, RULES, CANARY, stats, fleet, T0)[1]
    assert step(AUTO, RULES, {**CANARY, 1: first}, stats, fleet, T0 + datetime.timedelta(seconds=5)) == {}


def test_canary_blocks_new_candidates_until_decided() -> None:
    versions = {**CANARY, 2: st(C)}
    out = step(AUTO, RULES, versions, {0: c(10_100, 6_060), 1: c(10, 7)}, serving(routing(versions)), T0)
    assert set(out) == {1}


PROMOTING = {0: st(P, 0), 1: st(PG, 1), 2: st(C)}
ROLLING_BACK = {0: st(P, 0), 1: st(RB), 2: st(C)}


@pytest.mark.parametrize(("versions", "loaded", "ready", "expected"), [
    # every live pod serves v1, as many as the Deployment has ready: confirmed
    (PROMOTING, {"a": 1, "b": 1}, 2, {1: (P, "")}),
    (PROMOTING, {"a": 1, "b": 0}, 2, {}),  # b still serves v0
    (PROMOTING, {"a": 1}, 2, {}),  # a ready pod has not reported
    (PROMOTING, {}, 0, {}),  # nothing serves it
    (ROLLING_BACK, {"a": 0, "b": 0}, 2, {1: (R, "")}),
    (ROLLING_BACK, {"a": 1, "b": 0}, 2, {}),  # the canary pod still serves v1
])
def test_promotion_and_rollback_are_confirmed_by_the_pods(versions: dict, loaded: dict, ready: int,
                                                          expected: dict) -> None:
    out = step(AUTO, RULES, versions, {}, Fleet(loaded, ready), T0)
    assert {v: (s.phase, "") for v, s in out.items()} == expected  # the candidate waits meanwhile
    for s in out.values():
        assert f"confirmed: {len(loaded)} pod(s) serve v{routing(versions).stable}" in s.message


MANUAL = DraftSpec(initial_path="/d", policy="manual")


@pytest.mark.parametrize(("draft", "versions", "expected"), [
    # manual policy: candidates wait
    (MANUAL, {0: st(P, 0), 1: st(C), 2: st(C)}, {}),
    # pin a candidate forward: promoted without a canary
    (MANUAL.model_copy(update={"version": 2}), {0: st(P, 0), 1: st(C), 2: st(C)}, {2: (PG, "Pinned")}),
    # pin back (manual rollback): the old one is promoted again, the current stable is rolled back
    (AUTO.model_copy(update={"version": 1}), {0: st(P, 0), 1: st(P, 1), 2: st(P, 2)},
     {1: (PG, "Pinned"), 2: (RB, "ManualRollback")}),
    # a pin ends a running canary
    (AUTO.model_copy(update={"version": 0}), CANARY, {1: (RB, "Pinned")}),
    # pinning the canary itself promotes it
    (AUTO.model_copy(update={"version": 1}), CANARY, {1: (PG, "Pinned")}),
    # already pinned and served: nothing to do, and candidates are not canaried while pinned
    (AUTO.model_copy(update={"version": 1}), {0: st(P, 0), 1: st(P, 1), 2: st(C)}, {}),
    # an unknown version changes nothing (reported as a condition)
    (AUTO.model_copy(update={"version": 9}), {0: st(P, 0), 1: st(C)}, {}),
])
def test_manual_policy_and_pins(draft: DraftSpec, versions: dict, expected: dict) -> None:
    out = step(draft, RULES, versions, {}, Fleet({}, 0), T0)
    assert phases(out) == expected
    if draft.version is not None and draft.version in versions:
        assert routing({**versions, **out}) == Routing(draft.version)


def test_pin_is_confirmed_then_unpin_stays_on_pinned_version() -> None:
    pin = AUTO.model_copy(update={"version": 1})
    versions = {0: st(P, 0), 1: st(P, 1), 2: st(P, 2)}
    after = {**versions, **step(pin, RULES, versions, {}, Fleet({}, 0), T0)}
    confirmed = step(pin, RULES, after, {}, serving(Routing(1)), T0)
    assert phases(confirmed) == {1: (P, "Pinned"), 2: (R, "ManualRollback")}
    after |= confirmed
    assert step(AUTO, RULES, after, {}, serving(Routing(1)), T0) == {}
    assert routing(after).stable == 1


@pytest.mark.parametrize(("now", "base", "expected"), [
    (c(150, 90), c(100, 60), c(50, 30)),
    (c(50, 30), c(100, 60), c(50, 30)),  # reset
])
def test_window(now: Counters, base: Counters, expected: Counters) -> None:
    assert window(now, base) == expected


@pytest.mark.parametrize(("draft", "versions", "expected"), [
    # within keepVersions: nothing goes
    (AUTO, {0: st(P, 0), 1: st(R), 2: st(P, 1)}, []),
    # the newest 2 stay, as do v0, stable and anything still rolling out
    (AUTO.model_copy(update={"keep_versions": 2}),
     {0: st(P, 0), 1: st(R), 2: st(P, 1), 3: st(X), 4: st(RB), 5: st(X), 6: st(C), 7: st(X)}, [1, 3, 5]),
    # a pin keeps its version
    (AUTO.model_copy(update={"keep_versions": 1, "version": 1}),
     {0: st(P, 0), 1: st(R), 2: st(X), 3: st(P, 1)}, [2]),
    # an old stable is kept
    (AUTO.model_copy(update={"keep_versions": 1}), {0: st(P, 0), 1: st(P, 1), 2: st(X), 3: st(X)}, [2]),
])
def test_retired(draft: DraftSpec, versions: dict, expected: list) -> None:
    assert retired(draft, versions) == expected

