"""`tide bench train-gate --quick` on the CPU, through the CLI: the JSON's shape, figures that add up from the
run's own ticks (nothing hard-coded), and the trigger's part of the gate: idle on the stable phase, firing on the
shift. The goals are reported, not asserted: nothing is published that soon, so a gate that never trained would
meet them (docs/benchmarks.md has the full run)."""

import itertools
import json

import pytest
from click.testing import CliRunner

from tide_sglang.bench import train_gate
from tide_sglang.cli import main

pytestmark = pytest.mark.slow


def test_quick_bench_serves_the_schedule_with_both_gates(tmp_path) -> None:
    result = CliRunner().invoke(main, ["bench", "train-gate", "--quick", "--json", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["name"] == "train-gate" and report["quick"] is True
    assert [g["name"] for g in report["goals"]] == ["trainer_active_trigger_over_always",
                                                    "captured_bytes_trigger_over_always",
                                                    "end_accept_length_trigger_over_always_min"]
    assert all(set(g) == {"name", "value", "unit", "target", "met"} for g in report["goals"])
    size = train_gate.SIZES["quick"]
    arms = report["figures"]["arms"]
    assert list(arms) == ["always", "trigger"]
    for name, arm in arms.items():
        assert [p["phase"] for p in arm["phases"]] == ["writing", "code", "code-2", "writing-2"]
        assert [p["role"] for p in arm["phases"]] == ["stable", "shift", "stable", "recurring"]
        for phase, requests in zip(arm["phases"], size.requests, strict=True):
            ticks = [t for t in arm["ticks"] if t["phase"] == phase["phase"]]
            assert phase["waves"] == len(ticks) == -(-requests // size.batch)
            assert phase["captured_bytes"] == sum(t["captured_bytes"] for t in ticks)
            active = sum(t["seconds"] for t in ticks if t["train"] and t["trainer_up"])
            assert abs(phase["trainer_active_s"] - active) < 1e-2
            assert phase["trainer_active_tokens"] == sum(t["tokens"] for t in ticks if t["train"] and t["trainer_up"])
            assert phase["tokens"] == sum(t["tokens"] for t in ticks)
            assert 1.0 <= phase["end_accept_length"] <= train_gate.STEPS + 1
        for t in arm["ticks"]:
            assert t["train"] == (t["gate"] == "Training") and t["trainer_up"] == (t["gate"] != "ScaledDown")
            assert t["seconds"] > 0 and 1.0 <= t["accept_length"] <= train_gate.STEPS + 1
        assert report["figures"]["captured_bytes"][name] == sum(p["captured_bytes"] for p in arm["phases"]) > 0
    always, trigger = arms["always"], arms["trigger"]
    # the trainer-active clock: both arms serve the same tokens wave by wave (greedy decoding of the same prompts)
    assert [t["tokens"] for t in always["ticks"]] == [t["tokens"] for t in trigger["ticks"]]
    assert all(t["gate"] == "Training" and t["collect"] and t["trained_steps"] for t in always["ticks"])
    assert all(t["captured_bytes"] > 0 for t in always["ticks"])
    # `collect` off: the engine captures nothing at all in the next wave (the pass runs between waves)
    assert all(t["captured_bytes"] == 0 for prev, t in itertools.pairwise(trigger["ticks"]) if not prev["collect"])
    assert always["trainer_starts"] == 1 and always["trainer_scale_downs"] == 0
    # the trigger gated: on the stable phase (writing, which the starting draft knows) it found its plateau and the
    # gate stopped training and capturing; the shift to code fired it and training came back in the first code wave
    writing = [t for t in trigger["ticks"] if t["phase"] == "writing"]
    assert any(t["trigger"] == "idle" and t["trigger_reason"] == "plateau" and not t["train"] and not t["collect"]
               for t in writing)
    first_code = next(t for t in trigger["ticks"] if t["phase"] == "code")
    assert first_code["trigger"] == "active" and first_code["trigger_reason"] in ("drift", "changepoint")
    assert first_code["train"] and first_code["trainer_up"]
    assert sum(t["captured_bytes"] for t in writing) < sum(t["captured_bytes"] for t in always["ticks"]
                                                           if t["phase"] == "writing")
    # its trainer pod followed the replicas
    ups = [t["trainer_up"] for t in trigger["ticks"]]
    assert ups[0] and trigger["trainer_starts"] == 1 + sum(not a and b for a, b in itertools.pairwise(ups))
    assert trigger["trainer_scale_downs"] == sum(a and not b for a, b in itertools.pairwise(ups))
    ratio = report["figures"]["trainer_active_tokens"]["trigger"] / report["figures"]["trainer_active_tokens"]["always"]
    assert abs(report["goals"][0]["value"] - ratio) < 1e-3
    ends = [t["end_accept_length"] / a["end_accept_length"] for a, t in zip(always["phases"], trigger["phases"],
                                                                           strict=True)]
    assert abs(report["goals"][2]["value"] - min(ends)) < 1e-3
