"""The profile method: force every candidate step count in turn, time whole decode steps at each batch size, fit.

    for g in steps:                    force(g)          every slot of the engine runs g draft steps
        for b in batches (or None):    run(b, g)         decode at b concurrent requests; {bucket: (sum s, count)}
    force(None)                                          the engine's own choice again, whatever happened
    fit_profile({(bucket, g): sum / count})              control.profile: T(b) = t(b, 0), D0 from the rest

`force` and `run` are the engine's: the control state and /metrics for a server (server.py), the same attribute
the control state sets and the steps' own clocks for the in-process engines of `tide bench control`.
"""

import time
from collections.abc import Callable, Iterable

from pydantic import BaseModel, Field, field_validator

from tide_sglang.control import Profile, fit_profile

Samples = dict[int, tuple[float, int]]  # batch-size bucket -> (seconds summed, decode steps)
Force = Callable[[int | None], None]
Run = Callable[[int | None, int], Samples]  # (batch size or None: the engine's own traffic, g) -> samples


class Plan(BaseModel):
    steps: list[int] = Field([0, 1, 2, 3, 5], description="step counts to time; 0 is always added")
    batches: list[int] | None = Field(None, description="concurrent requests to drive (None: the engine's traffic)")
    min_samples: int = Field(8, ge=1, description="decode steps timed per batch size and step count")

    @field_validator("steps")
    @classmethod
    def _speculative(cls, steps: list[int]) -> list[int]:
        if min(steps, default=0) < 0 or max(steps, default=0) < 1:
            raise ValueError(f"step counts must be >= 0 and one at least > 0, got {steps}")
        return steps

    def step_counts(self) -> list[int]:
        return sorted({0, *self.steps})


class ProfileRun(BaseModel):
    profile: Profile
    seconds: float = Field(description="wall time the profile took")
    samples: dict[str, int] = Field(description="'b=<bucket>,g=<steps>' -> decode steps timed")


def measure(plan: Plan, force: Force, run: Run, *, device: str = "",
            clock: Callable[[], float] = time.monotonic) -> ProfileRun:
    start = clock()
    times: dict[tuple[int, int], tuple[float, int]] = {}
    try:
        for g in plan.step_counts():
            force(g)
            for b in plan.batches or [None]:
                for bucket, (seconds, count) in run(b, g).items():
                    s, n = times.get((bucket, g), (0.0, 0))
                    times[bucket, g] = (s + seconds, n + count)
    finally:
        force(None)
    kept = {k: s / n for k, (s, n) in times.items() if n > 0}
    return ProfileRun(profile=fit_profile(kept, device=device), seconds=round(clock() - start, 3),
                      samples={f"b={b},g={g}": n for (b, g), (_, n) in sorted(times.items())})


def enough(samples: Samples, min_samples: int, buckets: Iterable[int] | None = None) -> bool:
    """Every bucket asked for (default: every one seen, at least one) has `min_samples` steps."""
    wanted = list(samples) if buckets is None else list(buckets)
    return bool(wanted) and all(samples.get(b, (0.0, 0))[1] >= min_samples for b in wanted)
