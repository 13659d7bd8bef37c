"""Training trigger (TIDE Algorithm 1) and the CUSUM change-point detector."""

import itertools
import math
import random

import numpy as np
import pytest

from tide_sglang.control import (
    DropDetector,
    Ewma,
    TrainingTrigger,
    TriggerState,
    average_run_length,
    cusum_threshold,
)
from tide_sglang.control.trigger import Z, gap_noise
from tide_sglang.settings import TideSettings

W, A, IDLE = TriggerState.WARMUP, TriggerState.ACTIVE, TriggerState.IDLE


def trigger(n_threshold: int = 2) -> TrainingTrigger:
    return TrainingTrigger(short_alpha=0.5, long_alpha=0.05, epsilon=0.02, n_init=3, n_threshold=n_threshold)


# (name, windows of acceptance (or (acceptance, version)), state after each window, reason at the end); version 1
# where none is given
TABLE = [
    ("warmup collects first", [0.7, 0.7], [W, W], "warmup"),
    ("then adapts to the traffic", [0.7] * 3, [W, W, A], "initial adaptation"),
    ("flat acceptance: training stops", [0.7] * 5, [W, W, A, A, IDLE], "plateau"),
    ("new versions improving it: keeps training", [0.5, 0.5, 0.5, (0.6, 2), (0.7, 3), (0.8, 4), (0.9, 5)],
     [W, W, A, A, A, A, A], "initial adaptation"),
    ("a rise with no new version (a domain the draft knows): training stops",
     [0.5, 0.5, 0.5, 0.6, 0.7, 0.8, 0.9], [W, W, A, A, IDLE, IDLE, IDLE], "plateau"),
    ("drop while idle: retrains after n_threshold windows", [0.7] * 5 + [0.5, 0.5],
     [W, W, A, A, IDLE, IDLE, A], "drift"),
    ("one bad window is not drift", [0.7] * 5 + [0.6, 0.7, 0.7, 0.7], [W, W, A, A] + [IDLE] * 5, "plateau"),
    ("rise while idle: nothing to fix", [0.7] * 5 + [0.9] * 4, [W, W, A, A] + [IDLE] * 5, "plateau"),
    ("a rise at a new version is the version's: not traffic, and not drift", [0.7] * 5 + [(0.9, 2)] * 4,
     [W, W, A, A] + [IDLE] * 5, "plateau"),
    ("a fall at a new version is the traffic's (versions are published only when better): drift",
     [0.7] * 5 + [(0.5, 2)] * 2, [W, W, A, A, IDLE, IDLE, A], "drift"),
    ("a drop right after a new version is still drift", [0.7] * 5 + [(0.8, 2), (0.6, 2), (0.6, 2)],
     [W, W, A, A, IDLE, IDLE, IDLE, A], "drift"),
]


def _feed(t: TrainingTrigger, windows) -> list[TriggerState]:
    return [t.update(*(w if isinstance(w, tuple) else (w, 1))) for w in windows]


@pytest.mark.parametrize(("windows", "states", "reason"), [row[1:] for row in TABLE], ids=[r[0] for r in TABLE])
def test_trigger_table(windows, states, reason):
    t = trigger(n_threshold=2)
    assert _feed(t, windows) == states
    assert t.reason == reason
    assert t.train == (states[-1] is A) and t.collect == (states[-1] is not IDLE)
    report = t.report()  # what the pod's heartbeat carries to the operator
    assert (report["state"], report["reason"], report["train"], report["collect"]) == (
        states[-1].value, reason, t.train, t.collect)


def test_slow_drift_needs_consecutive_windows():
    t = trigger(n_threshold=3)
    _feed(t, [0.7] * 6)
    assert t.state is IDLE
    # alternate a drop and a recovery: the gap does not stay below -epsilon for 3 windows in a row
    assert all(s is IDLE for s in _feed(t, [0.6, 0.7, 0.7, 0.7] * 3))


def test_training_stops_once_new_versions_stop_coming():
    """The trainer publishes only a version that beats the served one: versions that keep raising acceptance keep
    training on; once none comes (its candidates stop winning), the last one's rise decays and training stops."""
    t = trigger(n_threshold=2)
    _feed(t, [0.3] * 3)
    improving = [(0.3 + 0.1 * v, v) for v in range(2, 6)]
    assert all(s is A for s in _feed(t, improving))
    assert abs(t.gain - 0.1) < 1e-9  # the latest version's rise
    converged = _feed(t, [(0.7, 5)] * 100)
    stop = converged.index(IDLE)
    # the last rise (0.1) decays at the long EWMA's rate (0.05) below epsilon (0.02): ~31 windows, then 2 more
    assert 25 <= stop <= 40 and t.reason == "plateau" and abs(t.gain) <= t.epsilon


def test_a_version_that_moved_acceptance_less_than_epsilon_is_convergence():
    """Versions' rises shrink as the trainer converges (it publishes the first candidate past its margin): once the
    latest moved acceptance by less than epsilon, training stops within n_threshold windows, whatever the earlier,
    larger rises were."""
    t = trigger(n_threshold=2)
    _feed(t, [0.3] * 3 + [(0.6, 2), (0.6, 2)])
    assert t.state is A
    t.credit(3, 0.01)
    assert _feed(t, [(0.61, 3)] * 2) == [A, IDLE] and t.reason == "plateau"


def test_held_out_gain_keeps_a_shift_that_arrives_with_a_version_apart_from_the_version():
    """A version served together with a shift to a domain the draft knows better: its first window rises by the
    version's gain and the traffic's. Credited with the served rise, the windows after it read as a fall (drift,
    a retraining for nothing); credited with the trainer's held-out gain, the traffic's rise is seen as one."""
    windows = [0.3] * 6 + [(0.7, 2)] + [(0.6, 2)] * 6
    served = trigger(n_threshold=2)
    assert _feed(served, windows)[-1] is A and served.reason == "drift"
    held_out = trigger(n_threshold=2)
    held_out.credit(2, 0.05)
    assert _feed(held_out, windows[:6]) == [W, W, A, A, IDLE, IDLE]
    assert all(s is IDLE for s in _feed(held_out, windows[6:])) and held_out.gap > 0
    assert abs(held_out.gain - 0.05 * (1 - 0.05) ** 6) < 1e-9  # the held-out gain, not the served rise (0.4)


def _gaps(t: TrainingTrigger, windows) -> list[tuple[TriggerState, bool]]:
    """Each window's state, and whether the traffic was still falling there (gap below -epsilon)."""
    out = []
    for w in windows:
        eps = t.epsilon  # as update() judges the window: the spread known before it
        out.append((t.update(w, 1), t.gap < -eps))
    return out


def test_a_drift_waits_for_its_version_as_long_again_as_the_traffic_fell():
    """After a drift the trainer's first version may come after the traffic has settled: no plateau before it, for
    as many windows again as the traffic spent falling (a trainer that cannot beat the served draft on the new
    traffic publishes nothing, and must not train for ever); then the plateau comes as usual."""
    t = trigger(n_threshold=2)
    seen = _gaps(t, [0.7] * 6 + [0.3] * 200)
    fired = [s for s, _ in seen].index(A, 6)
    falling = sum(f for _, f in seen[fired + 1:])
    settled = next(i for i in range(fired + 1, len(seen)) if not seen[i][1])
    stop = [s for s, _ in seen].index(IDLE, fired)
    assert t.reason == "plateau" and falling > 5
    assert stop >= fired + 2 * falling > settled + 5  # waited well past the settling of the gap
    assert stop <= fired + 2 * falling + 2  # then n_threshold windows


def test_a_drift_answered_by_a_small_step_stops_training():
    t = trigger(n_threshold=2)
    _feed(t, [0.7] * 6 + [0.3] * 30)
    assert t.state is A and t.reason == "drift" and t.gap >= -t.epsilon  # settled, still waiting for a version
    t.credit(2, 0.01)  # the trainer's version moved held-out acceptance by less than epsilon: it has converged
    assert _feed(t, [(0.31, 2)] * 2) == [A, IDLE] and t.reason == "plateau"


def test_a_drift_keeps_training_across_new_versions_until_the_traffic_settles():
    """After a drop, the gap stays below -epsilon until the long average has come down: new versions (which add
    their jump to both averages) do not end it, so the trainer keeps its time to adapt to the new traffic."""
    t = trigger(n_threshold=2)
    _feed(t, [0.7] * 40 + [0.2] * 2)
    assert t.state is A and t.reason == "drift"
    assert all(s is A for s in _feed(t, [(0.2, 2)] * 3 + [(0.2, 3)] * 3))
    assert t.gap < -t.epsilon


def _noisy(t: TrainingTrigger, level: float, sd: float, n: int, rng: random.Random) -> list[TriggerState]:
    return _feed(t, [level + rng.gauss(0, sd) for _ in range(n)])


def test_epsilon_follows_the_windows_spread():
    """The gap's noise for the bench's weights (short 0.3, long 0.1), by simulation, against gap_noise; and epsilon
    settles at Z of those standard deviations once the spread is learned."""
    rng = np.random.default_rng(0)
    x = rng.normal(0, 1, 20000)
    short = long = 0.0
    gaps = []
    for v in x:
        short, long = short + 0.3 * (v - short), long + 0.1 * (v - long)
        gaps.append(short - long)
    assert np.std(gaps[100:]) == pytest.approx(gap_noise(0.3, 0.1), rel=0.05)
    t = TrainingTrigger(short_alpha=0.3, long_alpha=0.1, epsilon=0.02, n_init=3, n_threshold=3)
    _noisy(t, 0.6, 0.1, 400, random.Random(1))
    assert t.epsilon == pytest.approx(Z * gap_noise(0.3, 0.1) * 0.1, rel=0.25)
    quiet = TrainingTrigger(short_alpha=0.3, long_alpha=0.1, epsilon=0.02, n_init=3, n_threshold=3)
    _feed(quiet, [0.6] * 50)
    assert quiet.epsilon == 0.02  # the floor: a constant signal is not hair-triggered


def test_noise_alone_neither_keeps_training_nor_fires_drift():
    """Windows whose acceptance swings by 0.1 around a steady level (as 16-step windows on the CPU bench): the
    trainer stops after warm-up and rarely restarts; a fixed epsilon of 0.02 would restart it over and over."""
    drifts = []
    for seed in range(10):
        t = TrainingTrigger(short_alpha=0.3, long_alpha=0.1, epsilon=0.02, n_init=3, n_threshold=3)
        states = _noisy(t, 0.6, 0.1, 300, random.Random(seed))
        assert IDLE in states[:30], seed
        assert states[30:].count(IDLE) >= 0.9 * len(states[30:]), seed
        drifts.append(sum(a is IDLE and b is A for a, b in itertools.pairwise(states)))
    assert sum(drifts) / len(drifts) <= 2  # per 300 windows


def test_a_real_drop_fires_within_a_few_windows_despite_the_noise():
    for seed in range(10):
        rng = random.Random(seed)
        t = TrainingTrigger(short_alpha=0.3, long_alpha=0.1, epsilon=0.02, n_init=3, n_threshold=3)
        _noisy(t, 0.6, 0.1, 100, rng)
        t.state, t.reason = IDLE, "plateau"  # wherever noise left it
        t._count = 0
        after = _noisy(t, 0.3, 0.1, 20, rng)
        assert A in after[:8], seed


def test_force_starts_training_in_any_state():
    for prefix in ([0.7], [0.7] * 3, [0.7] * 5):
        t = trigger()
        _feed(t, prefix)
        t.force()
        assert t.state is A and t.reason == "changepoint" and t.train and t.collect


def test_trigger_from_settings():
    t = TrainingTrigger.from_settings(TideSettings(trigger_n_init=7, trigger_epsilon=0.05))
    assert t.n_init == 7 and t.floor == t.epsilon == 0.05 and t.state is W


def test_ewma_weighting_and_forgetting():
    e = Ewma(alpha=0.5)
    assert e.value is None and e.update(1.0) == 1.0  # first sample taken as is
    assert e.update(0.0) == pytest.approx(1 / 3)  # mass 0.25 of 1.0 against 0.5 of 0.0
    # one update of weight 2 decays the past like two updates of weight 1
    a, b = Ewma(0.1, 0.5, mass=1.0), Ewma(0.1, 0.5, mass=1.0)
    a.update(1.0, weight=2)
    b.update(1.0)
    b.update(1.0)
    assert a.value == pytest.approx(b.value, rel=0.01)
    # elapsed time without samples lets a new sample outweigh stale history
    c = Ewma(0.01, 0.2, mass=1.0)
    c.elapse(1000)
    assert c.update(0.9, weight=10) > 0.8


def test_threshold_meets_the_average_run_length():
    for k in (0.25, 0.5, 1.0, 4.0):
        for rate in (1e-2, 1e-4, 1e-6):
            h = cusum_threshold(k, rate)
            assert average_run_length(k, h) >= 1 / rate * 0.999
            if h > 1e-6:  # h = 0 already suffices for a large k and a loose rate
                assert average_run_length(k, h * 0.99) < 1 / rate
    assert math.isinf(average_run_length(50, 100))


def _stationary_then_drop(seed: int, before: int, drop: float, sigma: float = 0.03):
    rng = random.Random(seed)
    return [0.7 + rng.gauss(0, sigma) for _ in range(before)], lambda: 0.7 - drop + rng.gauss(0, sigma)


@pytest.mark.parametrize("drop", [0.1, 0.15, 0.3])
def test_detector_fires_within_a_bounded_delay_after_a_step_down(drop):
    s = TideSettings()  # min drop 0.1, false-alarm rate 1e-4 per window, warm-up 50 windows
    bound = {0.1: 12, 0.15: 5, 0.3: 2}[drop]
    for seed in range(20):
        d = DropDetector(s.changepoint_min_drop, s.changepoint_false_alarm_rate, s.changepoint_warmup)
        before, after = _stationary_then_drop(seed, 150, drop)
        assert not any(d.update(x) for x in before), seed
        delay = next(i for i in range(1, 200) if d.update(after()))
        assert delay <= bound, (seed, delay)


def _alarm_rate(windows: np.ndarray, rate: float, warmup: int = 50) -> float:
    """False alarms per monitored window over independent runs (rows), each starting from a fresh detector:
    a long single run would judge one baseline estimate only, while the rate averages over all of them."""
    alarms = monitored = 0
    for run in windows:
        d = DropDetector(min_drop=0.1, false_alarm_rate=rate, warmup=warmup)
        for x in run.tolist():
            monitored += d.ready  # windows spent learning a baseline cannot alarm
            d.update(x)
        alarms += d.alarms
    return alarms / monitored


@pytest.mark.parametrize("sigma", [0.02, 0.05])
def test_detector_false_alarm_rate_on_a_gaussian_stationary_signal(sigma):
    rate = 1e-3
    windows = 0.7 + np.random.default_rng(1).normal(0, sigma, size=(150, 1000))
    assert _alarm_rate(windows, rate) <= rate


def _simulated_windows(a: float, g: int, runs: int, length: int, steps: int, seed: int) -> np.ndarray:
    """Window acceptance as the controller forms it: `steps` request verifies at g draft steps, each accepting
    min(Geometric(1 - a) - 1, g) tokens, turned into a by the moment equation (numpy bisection)."""
    rng = np.random.default_rng(seed)
    accepted = np.minimum(rng.geometric(1 - a, size=(runs * length, steps)) - 1, g).sum(axis=1) / steps
    lo, hi = np.zeros(len(accepted)), np.ones(len(accepted))
    for _ in range(40):
        mid = (lo + hi) / 2
        low = sum(mid**i for i in range(1, g + 1)) < accepted
        lo, hi = np.where(low, mid, lo), np.where(low, hi, mid)
    return ((lo + hi) / 2).reshape(runs, length)


@pytest.mark.parametrize("a", [0.6, 0.9])
def test_detector_false_alarm_rate_on_simulated_acceptance(a):
    windows = _simulated_windows(a, g=3, runs=100, length=600, steps=128, seed=7)
    assert abs(windows.mean() - a) < 0.01  # the moment estimate is unbiased enough to be the baseline
    assert _alarm_rate(windows, rate=1e-2) <= 1e-2


def test_detector_alarm_resets_to_the_new_level():
    d = DropDetector(min_drop=0.1, false_alarm_rate=1e-4, warmup=20)
    rng = np.random.default_rng(3)
    for x in 0.8 + rng.normal(0, 0.02, 100):
        d.update(float(x))
    assert d.baseline == pytest.approx(0.8, abs=0.01)
    assert any(d.update(float(x)) for x in 0.5 + rng.normal(0, 0.02, 10))
    assert not d.ready and d.alarms == 1
    assert not any(d.update(float(x)) for x in 0.5 + rng.normal(0, 0.02, 300))
    assert d.baseline == pytest.approx(0.5, abs=0.01)


def test_detector_over_windows_that_accept_nothing_watches_nothing_and_learns_on():
    """A draft that accepts nothing (a far domain) gives windows of exactly 0: no drop is possible, and the
    detector neither alarms nor divides by a zero spread; its baseline still follows a recovery."""
    d = DropDetector(min_drop=0.05, false_alarm_rate=1e-4, warmup=5)
    assert not any(d.update(0.0) for _ in range(20))
    assert d.ready and d.baseline == 0.0 and d.alarms == 0
    assert not any(d.update(0.3) for _ in range(20))
    assert 0 < d.baseline < 0.3
