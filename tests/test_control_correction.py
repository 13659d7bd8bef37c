"""Profiles fitted from whole decode-step times, and the controller's online correction from measured step times."""

import pytest

from tide_sglang.control import (
    Profile,
    SpeculationController,
    StepPolicy,
    StepTimeCorrection,
    fit_profile,
    speedup,
    step_cost,
    step_seconds,
)
from tide_sglang.settings import TideSettings

# A roofline engine: 10 ms per decode while memory-bound, compute-bound past 100 tokens; 1 ms per draft step.
ROOF = Profile.roofline(floor_s=0.010, per_token_s=1e-4, draft_s=0.001, max_tokens=4096)
BATCHES, STEPS = (1, 2, 4, 8, 16, 32, 64), (0, 1, 2, 3, 5)


def engine_times(profile: Profile, overhead: float = 0.0) -> dict[tuple[int, int], float]:
    """t(b, g) = g·D0(b) + T(b·(g+1)) + overhead: what `tide profile` measures on an engine shaped like `profile`."""
    return {(b, g): g * profile.draft_seconds(b) + profile.target_seconds(b * (g + 1)) + overhead
            for b in BATCHES for g in STEPS}


def test_fit_recovers_target_and_draft_and_keeps_the_times():
    times = engine_times(ROOF)
    fitted = fit_profile(times, device="test")
    for b in BATCHES:
        assert fitted.target_seconds(b) == pytest.approx(ROOF.target_seconds(b))
    for b in BATCHES[:-1]:  # at 64 every verify is wider than the widest plain batch timed: extrapolated
        assert fitted.draft_seconds(b) == pytest.approx(ROOF.draft_seconds(b), rel=1e-6)
    # Timed step counts: the model's step cost is the measured ratio; an untimed one (g = 4) comes from T and D0.
    for b in (1, 8, 64):
        assert step_cost(fitted, 3, b) == pytest.approx(times[b, 3] / times[b, 0])
    for b in (1, 8):  # b·5 within the plain batches timed
        assert step_cost(fitted, 4, b) == pytest.approx(step_cost(ROOF, 4, b), rel=1e-6)
    assert step_seconds(fitted, 2, 8) == pytest.approx(times[8, 2])
    assert Profile.model_validate_json(fitted.model_dump_json()) == fitted  # what TIDE_CONTROL_PROFILE reads


def test_timed_steps_win_over_the_formula():
    """A per-step overhead (scheduling, sampling) that T and D0 cannot express: the timed steps still predict it,
    interpolated between timed batch sizes."""
    times = engine_times(ROOF, overhead=0.004)
    fitted = fit_profile(times)
    for b in BATCHES:
        for g in STEPS:
            assert step_cost(fitted, g, b) == pytest.approx(times[b, g] / times[b, 0])
    between = (times[16, 3] + times[32, 3]) / 2 / ((times[16, 0] + times[32, 0]) / 2)
    assert step_cost(fitted, 3, 24) == pytest.approx(between)


def test_fit_needs_plain_and_speculative_steps():
    with pytest.raises(ValueError, match="plain decode"):
        fit_profile({(1, 3): 0.02})
    with pytest.raises(ValueError, match="speculative"):
        fit_profile({(1, 0): 0.01, (2, 0): 0.011})


def test_a_verify_cheaper_than_the_batch_gives_a_floored_draft_step():
    """g+1 tokens of one request verified faster than g+1 requests decode: D0 would be negative; it is floored."""
    fitted = fit_profile({(1, 0): 0.010, (4, 0): 0.020, (1, 3): 0.012})
    assert fitted.draft_seconds(1) == pytest.approx(0.0001)
    assert step_cost(fitted, 3, 1) == pytest.approx(1.2)  # the timed step is what the model uses


def test_correction_turns_predicted_step_times_into_measured_ones():
    fix = StepTimeCorrection(ROOF, alpha=0.5)
    assert fix.factor(4, 3) == 1.0  # nothing measured: the profile as is
    for _ in range(30):
        fix.add(4, 0, step_seconds(ROOF, 0, 4))  # plain decode as predicted
        fix.add(3, 3, 2 * step_seconds(ROOF, 3, 3))  # batch 3 shares bucket 4: g = 3 twice as slow
    assert fix.factor(4, 3) == pytest.approx(2.0, rel=1e-3)
    assert fix.factor(4, 0) == 1.0
    assert fix.factor(4, 1) == pytest.approx(1.5, rel=1e-3)  # unmeasured: the bucket's mean ratio (1 and 2)
    assert fix.factor(8, 3) == 1.0  # another bucket learnt nothing


def test_a_uniformly_slower_engine_changes_no_decision():
    fix = StepTimeCorrection(ROOF, alpha=0.5)
    for _ in range(30):
        for g in (0, 3):
            fix.add(16, g, 1.7 * step_seconds(ROOF, g, 16))
    assert fix.factor(16, 3) == pytest.approx(1.0)
    assert fix.factor(16, 5) == pytest.approx(1.0)


def test_one_pause_moves_the_ratio_by_a_bounded_step():
    fix = StepTimeCorrection(ROOF, alpha=0.1)
    for _ in range(50):
        fix.add(1, 3, step_seconds(ROOF, 3, 1))
    after = fix.add(1, 3, 100 * step_seconds(ROOF, 3, 1))  # a 100x interval: a GC pause, not the step
    assert after < 1.0 + 0.1 * 4


def test_policy_follows_the_corrected_cost():
    a, b = 0.8, 1
    fix = StepTimeCorrection(ROOF, alpha=0.5)
    policy = StepPolicy(ROOF, [0, 1, 2, 3, 5], margin=0.03, patience=1, cost_factor=fix.factor)
    assert policy.decide(a, b).steps > 0  # the profile says speculation pays
    for g in (1, 2, 3, 5):  # ...but every speculative step really costs 3x its prediction
        fix.add(b, g, 3 * step_seconds(ROOF, g, b))
        fix.add(b, g, 3 * step_seconds(ROOF, g, b))
    fix.add(b, 0, step_seconds(ROOF, 0, b))
    assert all(speedup(ROOF, a, g, b) / 3 < 1 for g in (1, 2, 3, 5))
    assert policy.decide(a, b).steps == 0


def test_controller_measures_step_times_and_switches_off():
    """The controller end to end: its profile says g > 0 pays at batch 1; the engine's measured steps say no."""
    settings = TideSettings(deployment="chat", control_step_time_alpha=0.2, control_switch_patience=1,
                            control_probe_interval=8)
    ctl = SpeculationController(ROOF, settings, candidates=[0, 1, 2, 3, 5], registry=None)
    g = ctl.steps_for_batch(1)
    assert g > 0
    decisions, policy = [g], []
    for _ in range(40):
        ctl.observe(0, accepted_tokens=0.5 * g, steps=1, draft_steps=g)
        ctl.observe_step_time(1, g, 3 * step_seconds(ROOF, g, 1) if g else step_seconds(ROOF, 0, 1))
        g = ctl.steps_for_batch(1)
        decisions.append(g)
        policy.append(ctl.last_decision.steps if ctl.last_decision is not None else -1)
    # The 8th decision (the probe interval) times a plain step; measured against it, speculation loses: off.
    assert decisions.index(0) == 7 and ctl.correction is not None and ctl.correction.measured(1, 0)
    assert policy[-20:] == [0] * 20  # what runs now and then is the acceptance probe
    off = SpeculationController(ROOF, settings.model_copy(update={"control_step_time_alpha": 0.0}), registry=None)
    off.observe_step_time(1, 3, 1.0)  # correction disabled: the profile as measured
    assert off.correction is None and off.steps_for_batch(1) > 0
