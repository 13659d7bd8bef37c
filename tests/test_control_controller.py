"""SpeculationController end to end on a simulated engine, and the Prometheus metrics it writes."""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from tide_sglang.control import ControlMetrics, Profile, SpeculationController, speedup
from tide_sglang.control.acceptance import per_token
from tide_sglang.settings import TideSettings

PROFILE = Profile.roofline(floor_s=0.010, per_token_s=1e-4, draft_s=0.001, max_tokens=1024)


def controller(registry: CollectorRegistry, **overrides) -> SpeculationController:
    s = TideSettings(deployment="chat", **overrides)
    return SpeculationController(PROFILE, s, registry=registry)


class Engine:
    """Chain drafting with per-token acceptance a: each request accepts min(Geometric - 1, g) draft tokens."""

    def __init__(self, ctl: SpeculationController, seed: int = 0):
        self.ctl = ctl
        self.rng = np.random.default_rng(seed)
        self.tokens = 0.0
        self.seconds = 0.0

    def step(self, batch: int, a: float, version: int = 0) -> int:
        g = self.ctl.steps_for_batch(batch)
        if g == 0:
            self.tokens += batch
        else:
            accepted = int(np.minimum(self.rng.geometric(1 - a, size=batch) - 1, g).sum()) if a < 1 else g * batch
            self.ctl.observe(version, accepted, batch, g)
            self.tokens += accepted + batch
        cost = 1.0 if g == 0 else (PROFILE.draft_seconds(batch) * g + PROFILE.target_seconds(batch * (g + 1)))
        self.seconds += cost if g == 0 else cost / PROFILE.target_seconds(batch)
        return g


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, {"deployment": "chat", **labels})


def test_converges_to_the_models_choice_and_learns_acceptance():
    reg = CollectorRegistry()
    ctl = controller(reg)
    eng = Engine(ctl)
    for _ in range(400):
        eng.step(1, 0.85)
    assert ctl.acceptance() == pytest.approx(0.85, abs=0.05)
    assert ctl.steps_for_batch(1) == 5
    for _ in range(50):
        eng.step(64, 0.85)
    assert ctl.steps_for_batch(64) == 1
    # the model's speedup is what the simulated engine measured (same cost model, sampled acceptance)
    assert eng.tokens / eng.seconds > 1.5
    assert sample(reg, "tide_controller_spec_steps", draft_version="0", batch="64") == 1
    assert sample(reg, "tide_controller_acceptance_ewma", draft_version="0") == pytest.approx(0.85, abs=0.05)


def test_off_when_acceptance_is_too_low_then_back_on_through_probes():
    reg = CollectorRegistry()
    ctl = controller(reg, control_probe_interval=64)
    eng = Engine(ctl)
    for _ in range(300):
        eng.step(64, 0.05)
    assert ctl.steps_for_batch(64) == 0
    assert speedup(PROFILE, ctl.acceptance(), 1, 64) < 1
    # acceptance recovers (traffic changed back); only probes can see it
    steps = [eng.step(64, 0.9) for _ in range(4000)]
    back_on = next(i for i, g in enumerate(steps) if g > 0 and all(s > 0 for s in steps[i:i + 20]))
    assert back_on < 2000
    assert sample(reg, "tide_controller_probes_total", draft_version="0") >= 1
    assert sample(reg, "tide_controller_switches_total", draft_version="0", batch="64") >= 2


def test_new_version_starts_from_the_old_estimate():
    ctl = controller(CollectorRegistry())
    eng = Engine(ctl)
    for _ in range(200):
        eng.step(8, 0.5)
    old = ctl.acceptance(0)
    ctl.observe(1, 0, 0, 3)  # first report from the new version: nothing measured yet
    assert ctl.version == 1 and ctl.acceptance() == pytest.approx(old)
    for _ in range(300):
        eng.step(8, 0.9, version=1)
    assert ctl.acceptance(1) == pytest.approx(0.9, abs=0.05) and ctl.acceptance(0) == pytest.approx(old)


def test_a_version_is_credited_with_its_held_out_gain_per_token():
    """The manifest's held-out accept lengths (at train_ttt_steps draft tokens) become the trigger's per-token
    rise for that version; without them (the imported version) the served rise stands."""
    ctl = controller(CollectorRegistry(), train_ttt_steps=3)
    ctl.credit(2, 1 + 0.6 + 0.6**2 + 0.6**3, 1 + 0.5 + 0.5**2 + 0.5**3)
    ctl.credit(3, None, None)
    assert ctl.trigger._credits == {2: pytest.approx(0.1)}
    assert per_token(4.0, 3) == 1.0 and per_token(1.0, 3) == 0.0


def test_abrupt_drop_starts_training_at_once():
    reg = CollectorRegistry()
    ctl = controller(reg, control_window_steps=64, trigger_n_init=5, changepoint_warmup=20)
    # (seed 0 draws 41, 44, 42, 44 accepted of 64 in a row around window 95: a real dip, rightly flagged)
    eng = Engine(ctl, seed=1)
    for _ in range(200):  # 200 windows: past warm-up, plateau reached, trigger idle
        eng.step(64, 0.8)
    assert not ctl.trigger.train and ctl.detector.ready
    windows = 0
    while not ctl.trigger.train:
        eng.step(64, 0.5)
        windows += 1
    assert windows <= 3 and ctl.trigger.reason == "changepoint"
    assert sample(reg, "tide_controller_changepoint_total", draft_version="0") == 1
    assert sample(reg, "tide_trainer_trigger_active", draft_version="0") == 1
    assert sample(reg, "tide_controller_acceptance_window", draft_version="0") < 0.6


def test_metrics_adapter_is_lazy_and_exposes_values():
    reg = CollectorRegistry()
    m = ControlMetrics("chat", reg)
    assert generate_latest(reg) == b""  # nothing registered before the first write
    m.decision(3, batch=8, steps=2, best=3, predicted=1.42, switched=True)
    m.acceptance(3, 0.71)
    m.window(3, 0.69, statistic=1.5, threshold=4.2, changepoint=True)
    m.trigger(3, train=True, collect=True, short=0.69, long=0.74)
    ControlMetrics("chat", reg).probe(3)  # a second adapter on the same registry shares the metrics
    text = generate_latest(reg).decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert all(name.startswith("tide_") for name in families)
    v = {"draft_version": "3"}
    assert sample(reg, "tide_controller_spec_steps", batch="8", **v) == 2
    assert sample(reg, "tide_controller_best_steps", batch="8", **v) == 3
    assert sample(reg, "tide_controller_predicted_speedup", batch="8", **v) == 1.42
    assert sample(reg, "tide_controller_switches_total", batch="8", **v) == 1
    assert sample(reg, "tide_controller_acceptance_ewma", **v) == 0.71
    assert sample(reg, "tide_controller_changepoint_total", **v) == 1
    assert sample(reg, "tide_controller_changepoint_threshold", **v) == 4.2
    assert sample(reg, "tide_controller_probes_total", **v) == 1
    assert sample(reg, "tide_trainer_trigger_active", **v) == 1
    assert sample(reg, "tide_trainer_acceptance_long_ewma", **v) == 0.74
    assert 'tide_controller_spec_steps{batch="8",deployment="chat",draft_version="3"} 2.0' in text


def test_metrics_without_registry_for_multiprocess_mode():
    m = ControlMetrics("chat", registry=None)
    m.decision(0, batch=1, steps=1, best=1, predicted=1.2, switched=False)  # created, registered nowhere


def test_binary_switch_controller_is_tide_baseline():
    ctl = SpeculationController(PROFILE, TideSettings(deployment="chat"), binary_steps=3, registry=CollectorRegistry())
    eng = Engine(ctl)
    assert {eng.step(1, 0.8) for _ in range(50)} == {3}  # S(0.8, 3, 1) > 1: on, always at g = 3
    assert ctl.steps_for_batch(64) == 3  # S = 1.03 at b = 64: TIDE still speculates where g = 1 would do better
    assert ctl.policy.candidates == [0, 3]


def test_metrics_in_prometheus_multiprocess_mode(tmp_path):
    """As inside SGLang's scheduler: created with registry=None, read back by a MultiProcessCollector."""
    script = textwrap.dedent("""
        from prometheus_client import CollectorRegistry, generate_latest, multiprocess
        from tide_sglang.control import ControlMetrics
        m = ControlMetrics("chat", registry=None)
        m.decision(2, batch=4, steps=3, best=3, predicted=1.7, switched=True)
        m.trigger(2, train=True, collect=True, short=0.6, long=0.7)
        reg = CollectorRegistry()
        multiprocess.MultiProcessCollector(reg)
        print(generate_latest(reg).decode())
    """)
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True).stdout
    assert 'tide_controller_spec_steps{batch="4",deployment="chat",draft_version="2"} 3.0' in out
    assert 'tide_controller_switches_total{batch="4",deployment="chat",draft_version="2"} 1.0' in out
    assert 'tide_trainer_trigger_active{deployment="chat",draft_version="2"} 1.0' in out


def test_settings_from_environment_and_engine_candidates(monkeypatch):
    monkeypatch.setenv("TIDE_CONTROL_MAX_STEPS", "7")
    monkeypatch.setenv("TIDE_CHANGEPOINT_FALSE_ALARM_RATE", "1e-5")
    s = TideSettings()
    assert s.control_max_steps == 7 and s.changepoint_false_alarm_rate == 1e-5
    reg = CollectorRegistry()
    assert SpeculationController(PROFILE, s, registry=reg).policy.candidates == list(range(8))
    # SGLang: only the candidate steps with captured CUDA graphs
    assert SpeculationController(PROFILE, s, candidates=[1, 3], registry=reg).policy.candidates == [0, 1, 3]


def test_no_probes_when_disabled_or_hopeless():
    ctl = controller(CollectorRegistry(), control_probe_interval=0)
    eng = Engine(ctl)
    for _ in range(200):
        eng.step(64, 0.05)
    assert all(eng.step(64, 0.9) == 0 for _ in range(2000))  # never measured again: stays off
    hopeless = controller(CollectorRegistry(), control_probe_interval=4)
    assert all(hopeless.steps_for_batch(1000) == 0 for _ in range(100))  # S < 1 even at a = 1: no probes
