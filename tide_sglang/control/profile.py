"""Start-up profile of the live engine: T(n), the target forward time for n tokens, and D0(b), one draft step.

The speedup model (model.py) needs T at b and at b·(g+1) tokens and D0 at batch b; both are measured on a
small grid and interpolated linearly between points (forward time is close to piecewise linear in tokens:
flat while memory-bound, then linear once compute-bound).
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


class Profile(BaseModel):
    """Measured target and draft step times; saved as JSON next to the engine's logs."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    device: str = Field("", description="where it was measured, e.g. 'NVIDIA H100 80GB HBM3' or 'cpu'")
    target: list[Point] = Field(min_length=1, description="T(n): one target forward over n tokens")
    draft: list[Point] = Field(min_length=1, description="D0(b): one draft step for a batch of b")

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

    def save(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.model_dump_json(indent=2) + "\n")
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
