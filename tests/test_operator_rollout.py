"""The rollout state machine, table by table (pure functions: no cluster, no Redis)."""

import pytest
from tide_operator.models import Baseline, Counters, DraftSpec, DraftVersionStatus, Phase, RolloutSpec
from tide_operator.rollout import Routing, routing, step, window

NOW = "2026-11-25T18:00:00Z"
P, C, K, R, X = Phase.PROMOTED, Phase.CANDIDATE, Phase.CANARY, Phase.ROLLED_BACK, Phase.REJECTED
AUTO = DraftSpec(initial_path="/d")
RULES = RolloutSpec(min_tokens=1000, max_tokens=10_000, min_improvement=0.02, rollback_threshold=0.02)


def st(phase: Phase, promotion: int | None = None, baseline: Baseline | None = None) -> DraftVersionStatus:
    return DraftVersionStatus(phase=phase, promotion=promotion, baseline=baseline)


def c(tokens: int, accepted: int, swap_failures: int = 0) -> Counters:
    return Counters(tokens=tokens, accepted=accepted, swap_failures=swap_failures)


def phases(changes: dict[int, DraftVersionStatus]) -> dict[int, tuple[Phase, str]]:
    return {v: (s.phase, s.reason) for v, s in changes.items()}


@pytest.mark.parametrize(("versions", "expected"), [
    ({}, Routing(0, None)),
    ({0: st(P, 0)}, Routing(0, None)),
    ({0: st(P, 0), 1: st(K)}, Routing(0, 1)),
    ({0: st(P, 0), 1: st(P, 1), 2: st(R)}, Routing(1, None)),
    ({0: st(P, 3), 1: st(R), 2: st(P, 2)}, Routing(0, None)),  # pinned back to 0 after 2 was promoted
    ({0: st(P, 0), 1: st(X), 2: st(C)}, Routing(0, None)),
])
def test_routing(versions: dict, expected: Routing) -> None:
    assert routing(versions) == expected


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
    assert phases(step(AUTO, RULES, versions, {0: c(500, 300)}, NOW)) == expected


def test_canary_start_records_stable_baseline() -> None:
    out = step(AUTO, RULES, {0: st(P, 0), 2: st(P, 1), 3: st(C)}, {2: c(5000, 3500)}, NOW)
    assert out[3].baseline == Baseline(version=2, tokens=5000, accepted=3500)
    assert out[3].last_transition_time == NOW


BASE = Baseline(version=0, tokens=10_000, accepted=6_000)  # stable at 0.60 before the canary


@pytest.mark.parametrize(("stable_now", "canary", "expected"), [
    # too few tokens on either side: keep observing
    (c(10_500, 6_300), c(5_000, 4_000), (K, "Observing")),
    (c(20_000, 12_000), c(999, 900), (K, "Observing")),
    # canary 0.70 vs stable window 0.60: promote
    (c(12_000, 7_200), c(1_000, 700), (P, "BetterAcceptance")),
    # improvement exactly at the threshold promotes
    (c(12_000, 7_200), c(1_000, 620), (P, "BetterAcceptance")),
    # improvement below the threshold and within the band: keep observing
    (c(12_000, 7_200), c(1_000, 610), (K, "Observing")),
    # canary 0.50 vs 0.60: roll back
    (c(12_000, 7_200), c(1_000, 500), (R, "WorseAcceptance")),
    # stable judged on the window only: all-time stable is 0.60, the window is 0.80, canary 0.70 is worse
    (c(12_000, 7_600), c(1_000, 700), (R, "WorseAcceptance")),
    # a swap failure rolls back before any token is counted
    (c(10_000, 6_000), c(0, 0, swap_failures=1), (R, "SwapFailed")),
    # undecided after max_tokens: rejected
    (c(30_000, 18_000), c(10_000, 6_050), (X, "Inconclusive")),
    # Redis lost its data (counter below baseline): the current counters are the window
    (c(2_000, 1_000), c(1_000, 700), (P, "BetterAcceptance")),
])
def test_canary_verdicts(stable_now: Counters, canary: Counters, expected: tuple) -> None:
    versions = {0: st(P, 0), 1: st(K, baseline=BASE)}
    out = step(AUTO, RULES, versions, {0: stable_now, 1: canary}, NOW)
    assert (out[1].phase, out[1].reason) == expected
    if expected[0] == P:
        assert out[1].promotion == 1 and routing({**versions, **out}) == Routing(1, None)
    if expected[0] in (R, X):
        assert routing({**versions, **out}) == Routing(0, None)


def test_unchanged_canary_writes_nothing() -> None:
    versions = {0: st(P, 0), 1: st(K, baseline=BASE)}
    stats = {0: c(10_100, 6_060), 1: c(10, 7)}
    first = step(AUTO, RULES, versions, stats, NOW)[1]
    assert step(AUTO, RULES, {**versions, 1: first}, stats, "later") == {}


def test_canary_blocks_new_candidates_until_decided() -> None:
    versions = {0: st(P, 0), 1: st(K, baseline=BASE), 2: st(C)}
    out = step(AUTO, RULES, versions, {0: c(10_100, 6_060), 1: c(10, 7)}, NOW)
    assert set(out) == {1}


MANUAL = DraftSpec(initial_path="/d", policy="manual")


@pytest.mark.parametrize(("draft", "versions", "expected"), [
    # manual policy: candidates wait
    (MANUAL, {0: st(P, 0), 1: st(C), 2: st(C)}, {}),
    # pin a candidate forward: promoted without a canary
    (MANUAL.model_copy(update={"version": 2}), {0: st(P, 0), 1: st(C), 2: st(C)}, {2: (P, "Pinned")}),
    # pin back (manual rollback): the old one is promoted again, the current stable is rolled back
    (AUTO.model_copy(update={"version": 1}), {0: st(P, 0), 1: st(P, 1), 2: st(P, 2)},
     {1: (P, "Pinned"), 2: (R, "ManualRollback")}),
    # a pin ends a running canary
    (AUTO.model_copy(update={"version": 0}), {0: st(P, 0), 1: st(K, baseline=BASE)}, {1: (R, "Pinned")}),
    # pinning the canary itself promotes it
    (AUTO.model_copy(update={"version": 1}), {0: st(P, 0), 1: st(K, baseline=BASE)}, {1: (P, "Pinned")}),
    # already pinned and served: nothing to do, and candidates are not canaried while pinned
    (AUTO.model_copy(update={"version": 1}), {0: st(P, 0), 1: st(P, 1), 2: st(C)}, {}),
    # an unknown version changes nothing (reported as a condition)
    (AUTO.model_copy(update={"version": 9}), {0: st(P, 0), 1: st(C)}, {}),
])
def test_manual_policy_and_pins(draft: DraftSpec, versions: dict, expected: dict) -> None:
    out = step(draft, RULES, versions, {}, NOW)
    assert phases(out) == expected
    if draft.version is not None and draft.version in versions:
        assert routing({**versions, **out}) == Routing(draft.version, None)


def test_unpin_after_rollback_stays_on_pinned_version() -> None:
    versions = {0: st(P, 0), 1: st(P, 1), 2: st(P, 2)}
    pinned = step(AUTO.model_copy(update={"version": 1}), RULES, versions, {}, NOW)
    after = {**versions, **pinned}
    assert step(AUTO, RULES, after, {}, NOW) == {}
    assert routing(after).stable == 1


@pytest.mark.parametrize(("now", "base", "expected"), [
    (c(150, 90), c(100, 60), c(50, 30)),
    (c(50, 30), c(100, 60), c(50, 30)),  # reset
])
def test_window(now: Counters, base: Counters, expected: Counters) -> None:
    assert window(now, base) == expected
