"""Speedup model, acceptance conversion and the start-up profile."""

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from tide_sglang.control import (
    AcceptanceEstimator,
    Point,
    Profile,
    acceptance_from_accepted,
    acceptance_from_tokens,
    accepted_per_step,
    best_steps,
    binary_switch,
    expected_tokens,
    measure_profile,
    speedup,
    step_cost,
    time_call,
    token_grid,
)

# H100-like shape: 10 ms per decode while memory-bound, compute-bound past 100 tokens; 1 ms draft step.
PROFILE = Profile.roofline(floor_s=0.010, per_token_s=1e-4, draft_s=0.001, max_tokens=1024)

profiles = st.builds(
    Profile.roofline,
    floor_s=st.floats(1e-3, 0.1),
    per_token_s=st.floats(1e-6, 1e-3),
    draft_s=st.floats(1e-5, 0.05),
)
acceptances = st.floats(0.0, 1.0)
steps = st.integers(1, 8)
batches = st.integers(1, 128)


@settings(max_examples=300, deadline=None)
@given(profiles, acceptances, acceptances, steps, batches)
def test_speedup_is_monotone_in_acceptance(profile, a1, a2, g, b):
    lo, hi = sorted((a1, a2))
    assert speedup(profile, lo, g, b) <= speedup(profile, hi, g, b) + 1e-12


@settings(max_examples=200, deadline=None)
@given(profiles, acceptances, batches)
def test_no_speculation_is_the_reference(profile, a, b):
    assert speedup(profile, a, 0, b) == 1.0


@given(acceptances.filter(lambda a: a < 0.999), steps)
def test_expected_tokens_matches_closed_form(a, g):
    assert expected_tokens(a, g) == pytest.approx((1 - a ** (g + 1)) / (1 - a), rel=1e-9)


def test_expected_tokens_limits():
    assert expected_tokens(1.0, 4) == 5  # every draft token accepted, plus the bonus
    assert expected_tokens(0.0, 4) == 1  # only the bonus token


def test_speedup_matches_the_formula_by_hand():
    # b = 1: T(1) = 10 ms, T(4) = 10 ms (memory-bound), c = 0.1; a = 0.8, g = 3.
    expected = (1 - 0.8**4) / ((1 - 0.8) * (0.1 * 3 + 1.0))
    assert speedup(PROFILE, 0.8, 3, 1) == pytest.approx(expected)
    # b = 64, g = 3: beta = T(256) / T(64) = 25.6 ms / 10 ms.
    assert step_cost(PROFILE, 3, 64) == pytest.approx(0.3 + 2.56)


@settings(max_examples=200, deadline=None)
@given(acceptances, steps)
def test_acceptance_round_trip(a, g):
    assert acceptance_from_tokens(expected_tokens(a, g), g) == pytest.approx(a, abs=1e-6)


def test_acceptance_from_accepted_counts_excludes_bonus():
    # 8 requests at g = 3 accepted 12 draft tokens: 1.5 per step, 2.5 tokens per verify with the bonus.
    a = acceptance_from_accepted(12, 8, 3)
    assert expected_tokens(a, 3) == pytest.approx(2.5)
    assert acceptance_from_accepted(0, 8, 3) == pytest.approx(0.0, abs=1e-9)
    assert acceptance_from_accepted(24, 8, 3) == pytest.approx(1.0, abs=1e-9)
    with pytest.raises(ValueError, match="g = 0"):
        acceptance_from_tokens(1.0, 0)


def test_best_steps_shrinks_with_batch_and_grows_with_acceptance():
    assert best_steps(PROFILE, 0.8, 1, 8) >= best_steps(PROFILE, 0.8, 64, 8)
    assert best_steps(PROFILE, 0.9, 8, 8) >= best_steps(PROFILE, 0.5, 8, 8)
    assert best_steps(PROFILE, 0.05, 64, 8) == 0


def test_binary_switch_is_tide_policy():
    assert binary_switch(PROFILE, 0.8, 1, 3) == 3
    assert binary_switch(PROFILE, 0.1, 128, 3) == 0


def test_interpolation_between_and_beyond_points():
    p = Profile(target=[Point(n=1, seconds=1.0), Point(n=3, seconds=2.0)], draft=[Point(n=1, seconds=0.1)])
    assert p.target_seconds(0.5) == 1.0  # below the grid: clamped
    assert p.target_seconds(2) == pytest.approx(1.5)
    assert p.target_seconds(5) == pytest.approx(3.0)  # last segment extended
    assert p.draft_seconds(64) == 0.1  # one draft point: batch-independent


def test_profile_rejects_unsorted_and_unknown_keys():
    with pytest.raises(ValidationError, match="strictly increasing"):
        Profile(target=[Point(n=4, seconds=1.0), Point(n=2, seconds=1.0)], draft=[Point(n=1, seconds=0.1)])
    doc = json.loads(PROFILE.model_dump_json())
    doc["extra"] = 1
    with pytest.raises(ValidationError, match="Extra inputs"):
        Profile.model_validate(doc)


class FakeClock:
    """Virtual time: the profiled callables advance it by their modelled cost."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_measure_profile_json_round_trip(tmp_path):
    clock = FakeClock()
    calls = []

    def target(n: int) -> None:
        calls.append(n)
        clock.now += 0.010 + 1e-4 * n + (0.5 if len(calls) == 1 else 0.0)  # first call: a slow warm-up

    def draft(b: int) -> None:
        clock.now += 0.001 * (1 + b / 64)

    grid = token_grid(max_batch=8, max_steps=3)
    profile = measure_profile(target, draft, grid, [1, 8], warmup=1, repeats=3, device="fake", clock=clock)
    assert [p.n for p in profile.target] == grid == [1, 2, 3, 4, 6, 8, 12, 16, 24, 32]
    assert profile.target_seconds(4) == pytest.approx(0.0104)  # warm-up excluded
    assert profile.draft_seconds(8) == pytest.approx(0.001125)
    assert len(calls) == len(grid) * 4
    loaded = Profile.load(profile.save(tmp_path / "sub" / "profile.json"))
    assert loaded == profile


def test_time_call_takes_the_median():
    clock = FakeClock()
    costs = iter([9.0, 1.0, 2.0, 100.0])  # warm-up, then three repeats with one outlier

    def fn() -> None:
        clock.now += next(costs)

    assert time_call(fn, warmup=1, repeats=3, clock=clock) == 2.0


def test_pooled_estimate_is_unbiased_where_averaging_reports_is_not():
    """Single-request reports at g = 5 give per-report estimates of 0 or 1 only; pooling sums stays on target."""
    rng = np.random.default_rng(0)
    a, g = 0.7, 5
    accepted = np.minimum(rng.geometric(1 - a, size=20_000) - 1, g)
    pooled = AcceptanceEstimator()
    for n in accepted.tolist():
        pooled.add(n, 1, g)
    naive = np.mean([acceptance_from_accepted(n, 1, g) for n in accepted[:2000].tolist()])
    assert pooled.value == pytest.approx(a, abs=0.01)
    assert abs(naive - a) > 0.03


def test_pooled_estimate_mixes_step_counts():
    """Reports at g = 1 and g = 4 of the same acceptance agree, and pool into the same value."""
    a = 0.6
    est = AcceptanceEstimator()
    est.add(100 * accepted_per_step(a, 1), 100, 1)
    est.add(50 * accepted_per_step(a, 4), 50, 4)
    est.add(0, 10, 0)  # plain decode steps carry no acceptance information
    assert est.value == pytest.approx(a, abs=1e-9)
    assert est.steps == 150


def test_estimator_prior_forgetting_and_scaling():
    est = AcceptanceEstimator(half_life_steps=100, prior=0.7)
    assert est.value == 0.7 and est.steps == 0
    est.update(20, 100, 1)  # a = 0.2 over 100 steps
    assert est.value == pytest.approx(0.2)
    est.elapse(1000)  # time passes unmeasured: the value stays, the evidence fades
    assert est.value == pytest.approx(0.2) and est.steps == pytest.approx(100 / 2**10)
    est.update(9, 10, 1)  # a probe at a = 0.9 now outweighs the stale history
    assert est.value > 0.85
    half = est.scaled(0.5)
    assert half.value == pytest.approx(est.value) and half.steps == pytest.approx(est.steps / 2)
