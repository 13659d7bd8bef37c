"""The demo report's figures from hand-made waves: per-window ratios, the last third, spread, goals, files."""

import json
from pathlib import Path

import pytest

from tide_sglang.demo.report import ARMS, ArmWave, last_third, summarize, write_report
from tide_sglang.engine.serve import StepRecord


def _wave(arm: str, phase: str, index: int, seconds: float, drafted: int = 0, version: int = 0) -> ArmWave:
    """A wave of 10 tokens; `drafted` of its 8 request verify steps drafted and emitted 2 tokens each."""
    return ArmWave(arm=arm, phase=phase, domain=phase, index=index, t=index * 3.0 + ARMS.index(arm), seconds=seconds,
                   tokens=10, request_steps=8, step_tokens=8 + drafted, drafted_request_steps=drafted,
                   drafted_tokens=2 * drafted, draft_version=version)


@pytest.mark.parametrize(("n", "windows"), [(1, [0]), (2, [1]), (3, [2]), (6, [4, 5]), (8, [5, 6, 7])])
def test_last_third_is_at_least_one_window(n: int, windows: list[int]) -> None:
    assert list(last_third(n)) == windows


def test_ratios_are_medians_of_windows_over_the_last_third_with_their_spread() -> None:
    tide_seconds = [4.0, 2.0, 1.0, 1.0, 0.8, 1.25]  # tide/no-spec per window: 0.25, 0.5, 1, 1, 1.25, 0.8
    waves = [w for i, t in enumerate(tide_seconds) for w in (
        _wave("no-spec", "code", i, 1.0), _wave("static", "code", i, 2.0), _wave("tide", "code", i, t, drafted=i))]
    steps = {"tide": [StepRecord(batch_size=2, draft_steps=3, emitted=4, accepted=2, seconds=0.1, draft_version=v,
                                 t=t, phase="code") for v, t in ((1, 5.0), (2, 9.0))]}
    summary = summarize(waves, steps, published=[1, 2], interrupted=False)
    (p,) = summary.phases
    assert p.windows == 6 and p.arms["no-spec"].tokens_per_s == 10.0 and p.arms["static"].tokens_per_s == 5.0
    assert (p.tide_over_nospec.median, p.tide_over_nospec.low, p.tide_over_nospec.high) == (1.025, 0.8, 1.25)
    assert p.tide_over_static.median == 2.05 and p.tide_over_static.windows == 2
    # TIDE's drafted acceptance early (windows 0-1: 1 drafted step) and late (windows 4-5: 9 steps)
    assert p.tide_accept_first_third == 2.0 and p.tide_accept_last_third == 2.0
    assert p.arms["tide"].speculative_share == round(15 / 48, 3) and p.arms["tide"].versions == [1, 2]
    assert [(s.t, s.version) for s in summary.swaps] == [(5.0, 1), (9.0, 2)]
    (goal,) = summary.goals
    assert goal.name == "tide_over_nospec_last_third_code" and goal.met and goal.spread == (0.8, 1.25)


def test_a_phase_is_judged_by_its_own_windows_and_missed_goals_say_so(tmp_path: Path) -> None:
    waves = [w for phase, t in (("writing", 1.0), ("french", 2.0)) for i in range(3)
             for w in (_wave("no-spec", phase, i, 1.0), _wave("static", phase, i, 1.5), _wave("tide", phase, i, t))]
    summary = write_report(tmp_path, waves, {a: [] for a in ARMS}, published=[], interrupted=True, settings={})
    assert [(g.name, g.value, g.met) for g in summary.goals] == [
        ("tide_over_nospec_last_third_writing", 1.0, True), ("tide_over_nospec_last_third_french", 0.5, False)]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["goals"][1]["spread"] == [0.5, 0.5] and "goals" not in report["summary"]
    assert len(report["waves"]) == 18 and report["summary"]["interrupted"]
    md = (tmp_path / "report.md").read_text()
    assert "| french | 3 | 10.0 (1.00) | 6.7 (1.00) | 5.0 (1.00) | 0.50 [0.50-0.50] |" in md and "MISSED" in md
    assert (tmp_path / "plot.png").stat().st_size > 10_000
