"""The demo's report: the three arms side by side per phase, from one record per (wave, arm), as JSON, markdown
and a PNG plot (pure, no I/O beyond writing the files it is asked to).

A measurement window is one wave of the schedule, served by every arm in turn: the same prompts, the same moment
of the run's load. Per window, TIDE's tokens/s over an arm's is a ratio; a phase's figure is the median of those
ratios over its last third of windows (after TIDE has had the first two thirds to adapt), with their spread.
"""

import json
import math
import statistics
from pathlib import Path

from pydantic import BaseModel

from tide_sglang.bench import Goal, goal
from tide_sglang.engine.serve import StepRecord

ARMS = ("no-spec", "static", "tide")
NOSPEC_GOAL = 0.97  # TIDE's tokens/s over no speculation, last third of every phase (issue 16)


class ArmWave(BaseModel):
    """One arm serving one wave."""

    arm: str
    phase: str
    domain: str
    index: int  # the wave's index in its phase: the measurement window
    t: float  # seconds since serving started, when this arm began the wave
    seconds: float  # wall time of the wave, prefill and hot swaps included
    tokens: int  # completion tokens
    request_steps: int  # verify steps summed over the requests of the batch
    step_tokens: int  # tokens the verify steps emitted (the prefill's first token excluded)
    drafted_request_steps: int  # ... of verify steps that drafted
    drafted_tokens: int
    draft_version: int  # at the end of the wave

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / max(self.seconds, 1e-9)


def arm_wave(arm: str, phase: str, domain: str, index: int, t: float, seconds: float, tokens: int,
             steps: list[StepRecord]) -> ArmWave:
    drafted = [s for s in steps if s.draft_steps]
    return ArmWave(arm=arm, phase=phase, domain=domain, index=index, t=round(t, 3), seconds=round(seconds, 4),
                   tokens=tokens, request_steps=sum(s.batch_size for s in steps),
                   step_tokens=sum(s.emitted for s in steps),
                   drafted_request_steps=sum(s.batch_size for s in drafted),
                   drafted_tokens=sum(s.emitted for s in drafted),
                   draft_version=steps[-1].draft_version if steps else 0)


class Spread(BaseModel):
    median: float
    low: float
    high: float
    windows: int


class ArmPhase(BaseModel):
    tokens_per_s: float  # tokens over the arm's own wall time in the phase
    accept_length: float  # tokens per request verify step, over all steps (1.0 with speculation off)
    drafted_accept_length: float | None  # ... over the steps that drafted; None when none did
    speculative_share: float  # request verify steps that drafted
    versions: list[int]  # draft versions that drafted in this phase


class DemoPhase(BaseModel):
    phase: str
    domain: str
    start: float  # seconds since serving started
    end: float
    windows: int
    arms: dict[str, ArmPhase]
    tide_over_nospec: Spread  # per-window tokens/s ratios over the last third of the windows
    tide_over_static: Spread
    tide_accept_first_third: float | None  # TIDE's drafted acceptance length early and late in the phase
    tide_accept_last_third: float | None


class DemoGoal(Goal):
    spread: tuple[float, float]  # (lowest, highest) of the per-window ratios `value` is the median of


class Swap(BaseModel):
    t: float
    version: int


class DemoSummary(BaseModel):
    phases: list[DemoPhase]
    swaps: list[Swap]
    goals: list[DemoGoal]
    total_seconds: float
    published: list[int]
    interrupted: bool


def _ratio(numer: float, denom: float) -> float:
    return numer / denom if denom else math.nan


def _accept(waves: list[ArmWave], drafted: bool) -> float | None:
    steps = sum(w.drafted_request_steps if drafted else w.request_steps for w in waves)
    tokens = sum(w.drafted_tokens if drafted else w.step_tokens for w in waves)
    return round(tokens / steps, 3) if steps else None


def _arm_phase(waves: list[ArmWave], versions: list[int]) -> ArmPhase:
    requests = sum(w.request_steps for w in waves)
    return ArmPhase(tokens_per_s=round(_ratio(sum(w.tokens for w in waves), sum(w.seconds for w in waves)), 2),
                    accept_length=_accept(waves, drafted=False) or 1.0,
                    drafted_accept_length=_accept(waves, drafted=True),
                    speculative_share=round(_ratio(sum(w.drafted_request_steps for w in waves), requests), 3),
                    versions=versions)


def last_third(n: int) -> range:
    """The windows a phase is judged on: its last third, at least one."""
    return range(n - max(1, round(n / 3)), n)


def spread(values: list[float]) -> Spread:
    return Spread(median=round(statistics.median(values), 4), low=round(min(values), 4),
                  high=round(max(values), 4), windows=len(values))


def _window_ratios(by_arm: dict[str, dict[int, ArmWave]], arm: str, windows: range) -> list[float]:
    return [_ratio(by_arm["tide"][i].tokens_per_s, by_arm[arm][i].tokens_per_s) for i in windows
            if all(i in by_arm[a] for a in ("tide", arm))]


def _phase(phase: str, waves: list[ArmWave], versions: dict[str, list[int]]) -> DemoPhase:
    by_arm = {a: {w.index: w for w in waves if w.arm == a} for a in ARMS}
    n = max(len(v) for v in by_arm.values())
    late = last_third(n)
    early = range(0, max(1, round(n / 3)))
    tide = by_arm["tide"]
    return DemoPhase(
        phase=phase, domain=waves[0].domain, start=min(w.t for w in waves),
        end=round(max(w.t + w.seconds for w in waves), 3), windows=n,
        arms={a: _arm_phase(list(by_arm[a].values()), versions.get(a, [])) for a in ARMS if by_arm[a]},
        tide_over_nospec=spread(_window_ratios(by_arm, "no-spec", late) or [math.nan]),
        tide_over_static=spread(_window_ratios(by_arm, "static", late) or [math.nan]),
        tide_accept_first_third=_accept([tide[i] for i in early if i in tide], drafted=True),
        tide_accept_last_third=_accept([tide[i] for i in late if i in tide], drafted=True),
    )


def _versions(steps: list[StepRecord], phase: str) -> list[int]:
    return sorted({s.draft_version for s in steps if s.phase == phase and s.draft_steps})


def summarize(waves: list[ArmWave], steps: dict[str, list[StepRecord]], published: list[int],
              interrupted: bool) -> DemoSummary:
    order = list(dict.fromkeys(w.phase for w in waves))
    phases = [_phase(p, [w for w in waves if w.phase == p], {a: _versions(s, p) for a, s in steps.items()})
              for p in order]
    swaps, version = [], 0
    for r in steps.get("tide", []):
        if r.draft_version != version:
            swaps.append(Swap(t=round(r.t, 3), version=r.draft_version))
            version = r.draft_version
    goals = [DemoGoal(**goal(f"tide_over_nospec_last_third_{p.phase}", p.tide_over_nospec.median, "x", ">=",
                             NOSPEC_GOAL).model_dump(), spread=(p.tide_over_nospec.low, p.tide_over_nospec.high))
             for p in phases]
    return DemoSummary(phases=phases, swaps=swaps, goals=goals, published=published, interrupted=interrupted,
                       total_seconds=max((p.end for p in phases), default=0.0))


COLORS = {"no-spec": "tab:grey", "static": "tab:orange", "tide": "tab:blue"}


def _series(waves: list[ArmWave], arm: str) -> tuple[list[float], list[float], list[float]]:
    """(t, tokens/s, acceptance length) per window of one arm, at the middle of its wave."""
    mine = [w for w in waves if w.arm == arm]
    return ([w.t + w.seconds / 2 for w in mine], [w.tokens_per_s for w in mine],
            [w.step_tokens / max(w.request_steps, 1) for w in mine])


def plot(waves: list[ArmWave], summary: DemoSummary, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display: render straight to PNG
    import matplotlib.pyplot as plt

    fig, (ax1, ax2, ax3) = plt.subplots(3, 1, figsize=(11, 9.5), gridspec_kw={"height_ratios": [1, 1, 1.1]})
    for arm in ARMS:
        t, tps, acc = _series(waves, arm)
        ax1.plot(t, acc, color=COLORS[arm], marker=".", lw=1.2, label=arm)
        ax2.plot(t, tps, color=COLORS[arm], marker=".", lw=1.2, label=arm)
    ax1.set_ylabel("acceptance length\n(tokens / verify)")
    ax2.set_ylabel("tokens / s")
    ax2.set_xlabel("seconds (each arm serves every wave in turn)")
    ax1.legend(loc="upper right", fontsize=8, ncol=3)
    ax2.sharex(ax1)
    for ax in (ax1, ax2):
        for p in summary.phases[1:]:
            ax.axvline(p.start, color="grey", ls="--", lw=1)
        for s in summary.swaps:
            ax.axvline(s.t, color="tab:red", ls=":", lw=1.2)
        ax.grid(alpha=0.3)
    for p in summary.phases:
        ax1.annotate(p.phase, (p.start, 1.0), xycoords=("data", "axes fraction"), xytext=(4, -14),
                     textcoords="offset points", fontsize=9, color="grey")
    for s in summary.swaps:
        ax2.annotate(f"v{s.version}", (s.t, 1.0), xycoords=("data", "axes fraction"), xytext=(2, -12),
                     textcoords="offset points", fontsize=8, color="tab:red")
    _bars(ax3, summary)
    ax1.set_title("TIDE demo: three arms on the same waves; phases (grey dashes), TIDE's hot swaps (red dots)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _bars(ax: object, summary: DemoSummary) -> None:
    """Per phase: each arm's tokens/s side by side, TIDE's last-third median ratio over no-spec above."""
    width = 0.27
    for j, arm in enumerate(ARMS):
        xs = [i + (j - 1) * width for i in range(len(summary.phases))]
        ys = [p.arms[arm].tokens_per_s if arm in p.arms else 0.0 for p in summary.phases]
        ax.bar(xs, ys, width, color=COLORS[arm], label=arm)  # type: ignore[attr-defined]
    for i, p in enumerate(summary.phases):
        r = p.tide_over_nospec
        top = max(a.tokens_per_s for a in p.arms.values())
        ax.annotate(f"tide/no-spec {r.median:.2f} [{r.low:.2f}-{r.high:.2f}]", (i, top),  # type: ignore[attr-defined]
                    xytext=(0, 4), textcoords="offset points", ha="center", fontsize=8)
    ax.set_xticks(range(len(summary.phases)), [p.phase for p in summary.phases])  # type: ignore[attr-defined]
    ax.set_ylabel("tokens / s per phase")  # type: ignore[attr-defined]
    ax.legend(loc="lower right", fontsize=8, ncol=3)  # type: ignore[attr-defined]
    ax.grid(alpha=0.3, axis="y")  # type: ignore[attr-defined]


def _cell(a: ArmPhase | None) -> str:
    return "-" if a is None else f"{a.tokens_per_s:.1f} ({a.accept_length:.2f})"


def _num(x: float | None) -> str:
    return "-" if x is None or math.isnan(x) else f"{x:.2f}"


def markdown(summary: DemoSummary, settings: dict[str, object]) -> str:
    lines = ["# TIDE demo report", "",
             f"{summary.total_seconds:.0f} s of serving; published versions: {summary.published or 'none'}; "
             "swaps: " + (", ".join(f"v{s.version} at {s.t:.0f} s" for s in summary.swaps) or "none")
             + (" (interrupted)" if summary.interrupted else ""), "",
             "Every wave is served by the three arms in turn (rotating order): tokens/s (acceptance length). "
             "tide/no-spec and tide/static: median of the per-window ratios over the last third of the phase "
             "[lowest-highest]. TIDE's acceptance length of its drafted steps, first third -> last third.", "",
             "| phase | windows | no-spec | static | tide | tide/no-spec | tide/static | tide drafted acceptance "
             "| tide speculative steps | versions |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for p in summary.phases:
        n, s, tide = p.tide_over_nospec, p.tide_over_static, p.arms.get("tide")
        lines.append(
            f"| {p.phase} | {p.windows} | {_cell(p.arms.get('no-spec'))} | {_cell(p.arms.get('static'))} | "
            f"{_cell(tide)} | {_num(n.median)} [{_num(n.low)}-{_num(n.high)}] | "
            f"{_num(s.median)} [{_num(s.low)}-{_num(s.high)}] | "
            f"{_num(p.tide_accept_first_third)} -> {_num(p.tide_accept_last_third)} | "
            f"{tide.speculative_share:.0%} | {tide.versions or '-'} |" if tide else f"| {p.phase} | - |")
    lines += ["", "Goals:", ""]
    lines += [f"- {g.name}: {g.value:g} {g.unit} (target {g.target}, spread {g.spread}) "
              f"{'met' if g.met else 'MISSED'}" for g in summary.goals]
    lines += ["", "![three arms per phase](plot.png)", "", "Settings:", "",
              "```json", json.dumps(settings, indent=2, default=str), "```", ""]
    return "\n".join(lines)


def write_report(out: Path, waves: list[ArmWave], steps: dict[str, list[StepRecord]], published: list[int],
                 interrupted: bool, settings: dict[str, object]) -> DemoSummary:
    out.mkdir(parents=True, exist_ok=True)
    summary = summarize(waves, steps, published, interrupted)
    (out / "report.json").write_text(json.dumps({
        "summary": summary.model_dump(exclude={"goals"}), "goals": [g.model_dump() for g in summary.goals],
        "settings": settings,
        "waves": [w.model_dump() for w in waves],
        "steps": {a: [r.model_dump() for r in records] for a, records in steps.items()}}, default=str) + "\n")
    plot(waves, summary, out / "plot.png")
    (out / "report.md").write_text(markdown(summary, settings))
    return summary
