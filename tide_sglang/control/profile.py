"""Start-up profile of the live engine: T(n), the target forward time for n tokens, and D0(b), one draft step.

The speedup model (model.py) needs T at b and at b·(g+1) tokens and D0 at batch b; both are measured on a
small grid and interpolated linearly between points (forward time is close to piecewise linear in tokens:
flat while memory-bound, then linear once compute-bound).

A profile measured from outside (`tide profile`, tide_sglang/profiler.py) times whole decode steps instead:
t(b, g), the time between consecutive decode batches of b requests at g draft steps, with the engine's own
overheads and step shapes. `fit_profile` keeps those times (`steps`), which the model then uses directly, and
derives T and D0 from them for the step counts it did not time.
"""

import itertools
import statistics
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator


class Point(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    n: int = Field(gt=0, description="tokens (target) or batch size (draft)")
    seconds: float = Field(gt=0)


def _interpolate(points: list[Point], x: float) -> float:
    if x <= points[0].n:
        # Below the grid: a forward never gets cheaper with fewer tokens than the smallest one measured.
        return points[0].seconds
    if len(points) == 1:
        return points[0].seconds * x / points[0].n  # one point only: assume compute-bound (pessimistic)
    for lo, hi in itertools.pairwise(points):
        if x <= hi.n:
            return lo.seconds + (hi.seconds - lo.seconds) * (x - lo.n) / (hi.n - lo.n)
    # Above the grid: extend the last segment (compute-bound, so linear), never below the last point.
    lo, hi = points[-2], points[-1]
    return max(hi.seconds, hi.seconds + (hi.seconds - lo.seconds) * (x - hi.n) / (hi.n - lo.n))


class StepTime(BaseModel):
    """One whole decode step as the engine runs it: b requests, g draft steps (0: plain decode)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    batch: int = Field(gt=0)
    steps: int = Field(ge=0)
    seconds: float = Field(gt=0)


class Profile(BaseModel):
    """Measured target and draft step times; saved as JSON next to the engine's logs."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    device: str = Field("", description="where it was measured, e.g. 'NVIDIA H100 80GB HBM3' or 'cpu'")
    target: list[Point] = Field(min_length=1, description="T(n): one target forward over n tokens")
    draft: list[Point] = Field(min_length=1, description="D0(b): one draft step for a batch of b")
    steps: list[StepTime] = Field(default_factory=list, description="t(b, g): whole decode steps timed in the "
                                  "engine (`tide profile`); the model prefers them to T and D0 where they exist")

    @field_validator("target", "draft")
    @classmethod
    def _increasing(cls, points: list[Point]) -> list[Point]:
        if any(b.n <= a.n for a, b in itertools.pairwise(points)):
            raise ValueError("profile points must have strictly increasing n")
        return points

    def target_seconds(self, tokens: float) -> float:
        return _interpolate(self.target, tokens)

    def draft_seconds(self, batch: float) -> float:
        if len(self.draft) == 1:
            return self.draft[0].seconds  # D0 measured at one batch size: treat it as batch-independent
        return _interpolate(self.draft, batch)

    def step_seconds(self, steps: int, batch: float) -> float | None:
        """t(b, g) interpolated over b between timed batch sizes (extended as T is), or None when g was not timed."""
        points = [Point(n=t.batch, seconds=t.seconds) for t in sorted(self.steps, key=lambda t: t.batch)
                  if t.steps == steps]
        return _interpolate(points, batch) if points else None

    def save(self, path: Path) -> Path:
        """Written aside and renamed: an engine waiting for the file (TIDE_CONTROL_PROFILE_PENDING) reads it whole."""
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(self.model_dump_json(indent=2) + "\n")
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: Path) -> "Profile":
        return cls.model_validate_json(path.read_text())

    @classmethod
    def roofline(cls, floor_s: float, per_token_s: float, draft_s: float, max_tokens: int = 1024) -> "Profile":
        """A synthetic profile, T(n) = max(floor_s, n·per_token_s) and constant D0 = draft_s: memory-bound up
        to n = floor_s / per_token_s tokens, compute-bound after. For tests, docs and what-if questions."""
        grid = sorted({1 << i for i in range(max_tokens.bit_length())} | {max_tokens})
        target = [Point(n=n, seconds=max(floor_s, n * per_token_s)) for n in grid]
        return cls(device="roofline", target=target, draft=[Point(n=1, seconds=draft_s)])


def token_grid(max_batch: int, max_steps: int) -> list[int]:
    """Token counts the model reads for batches 1, 2, 4, ... max_batch and g in 0..max_steps: b and b·(g+1)."""
    batches = batch_grid(max_batch)
    return sorted({b * (g + 1) for b in batches for g in range(max_steps + 1)})


def batch_grid(max_batch: int) -> list[int]:
    out, b = [], 1
    while b < max_batch:
        out.append(b)
        b *= 2
    return [*out, max_batch]


def time_call(
    fn: Callable[[], object],
    warmup: int = 2,
    repeats: int = 5,
    clock: Callable[[], float] = time.perf_counter,
) -> float:
    """Median seconds of `fn()`; the median ignores the odd slow run (GC, a neighbour's kernel).

    `fn` must block until the work is done (call torch.cuda.synchronize() inside on a GPU).
    """
    for _ in range(warmup):  # first calls pay for allocation, autotuning, CUDA-graph capture
        fn()
    samples = []
    for _ in range(repeats):
        start = clock()
        fn()
        samples.append(clock() - start)
    return statistics.median(samples)


def measure_profile(
    target_forward: Callable[[int], object],
    draft_step: Callable[[int], object],
    tokens: Iterable[int],
    batches: Iterable[int] = (1,),
    *,
    warmup: int = 2,
    repeats: int = 5,
    device: str = "",
    clock: Callable[[], float] = time.perf_counter,
) -> Profile:
    """Measure T(n) for n in `tokens` (target_forward(n)) and D0(b) for b in `batches` (draft_step(b))."""
    target = [
        Point(n=n, seconds=time_call(lambda n=n: target_forward(n), warmup, repeats, clock))
        for n in sorted(set(tokens))
    ]
    draft = [
        Point(n=b, seconds=time_call(lambda b=b: draft_step(b), warmup, repeats, clock))
        for b in sorted(set(batches))
    ]
    return Profile(device=device, target=target, draft=draft)


def fit_profile(times: dict[tuple[int, int], float], device: str = "") -> Profile:
    """A Profile from whole decode-step times {(batch, steps): seconds}, which must include steps = 0 at some batch.

    A plain decode step of b requests is one target forward over b tokens, so T(b) = t(b, 0). A speculative step
    is g draft steps and a verify of b·(g+1) tokens, so each timed g gives D0(b) = (t(b, g) - T(b·(g+1))) / g; the
    median over g is kept (g whose b·(g+1) lies beyond the plain batches timed only when no other was; floored at
    1 % of T(b): the engine may verify g+1 tokens of one request more cheaply
    than it decodes g+1 requests, which would make the difference negative). The times themselves go to `steps`.
    """
    plain = sorted((b, s) for (b, g), s in times.items() if g == 0)
    if not plain:
        raise ValueError("a profile needs plain decode steps (0 draft steps) at one batch size at least")
    target = [Point(n=b, seconds=s) for b, s in plain]
    probe = Profile(device=device, target=target, draft=[Point(n=1, seconds=target[0].seconds)])
    draft, largest = [], target[-1].n
    for b in sorted({b for b, _ in times}):
        floor = 0.01 * probe.target_seconds(b)
        timed = [(g, s) for (bb, g), s in times.items() if bb == b and g]
        # T(b·(g+1)) is measured up to the largest plain batch; beyond it, an extrapolation: used only when no
        # timed g stays within the measured range.
        timed = [(g, s) for g, s in timed if b * (g + 1) <= largest] or timed
        per_step = [(s - probe.target_seconds(b * (g + 1))) / g for g, s in timed]
        if per_step:
            draft.append(Point(n=b, seconds=max(floor, statistics.median(per_step))))
    if not draft:
        raise ValueError("a profile needs speculative steps (draft steps > 0) at one batch size at least")
    steps = [StepTime(batch=b, steps=g, seconds=s) for (b, g), s in sorted(times.items())]
    return Profile(device=device, target=target, draft=draft, steps=steps)
