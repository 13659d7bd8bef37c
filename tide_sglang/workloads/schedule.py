"""A drift schedule: phases of requests, each drawn from one workload, served in order.

Spec strings (for CLI flags) list `workload:requests` pairs: "writing:16,code:16,math:16,french:16".
A workload may recur ("writing:16,code:16,writing:16") to test forgetting; a recurring phase is named
"writing-2" and draws its prompts with another seed, so it sees fresh prompts of the same domain.
"""

from collections import Counter

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from tide_sglang.workloads.prompt import Prompt, WorkloadUnavailable
from tide_sglang.workloads.registry import WORKLOADS, Split, get_workload, load_workload

RECUR_SEED_STRIDE = 1_000_003  # seed offset per recurrence of a workload: far from any small seed


class ScheduleError(ValueError):
    """A schedule spec that cannot be parsed; the message says which item and why."""


class Phase(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1)  # unique in a schedule: reports and plots mark phases by it
    workload: str  # a key of WORKLOADS
    requests: int = Field(ge=1)

    @field_validator("workload")
    @classmethod
    def _known(cls, workload: str) -> str:
        get_workload(workload)  # raises UnknownWorkload (a ValueError) listing the known names
        return workload


class Schedule(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    phases: tuple[Phase, ...] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique_names(self) -> "Schedule":
        repeated = [name for name, count in Counter(p.name for p in self.phases).items() if count > 1]
        if repeated:
            raise ValueError(f"phase names must be unique, repeated: {repeated}")
        return self

    @property
    def total_requests(self) -> int:
        return sum(phase.requests for phase in self.phases)

    def spec(self) -> str:
        """The spec string that parses back to this schedule (phase names are derived, not written)."""
        return ",".join(f"{phase.workload}:{phase.requests}" for phase in self.phases)


class PhasePlan(BaseModel):
    """A phase with its prompts resolved: exactly `phase.requests` of them, in serving order."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    phase: Phase
    prompts: tuple[Prompt, ...]


DEFAULT_SPEC = "writing:16,code:16,math:16,french:16"  # the demo's drift: prose -> code -> math -> French


def _parse_item(item: str, position: int) -> tuple[str, int]:
    where = f"schedule item {position} ({item!r})"
    workload, sep, count = item.partition(":")
    workload, count = workload.strip(), count.strip()
    if not sep or not workload or not count:
        raise ScheduleError(f"{where}: expected 'workload:requests', e.g. 'code:16'")
    if workload not in WORKLOADS:
        raise ScheduleError(f"{where}: unknown workload {workload!r}; known: {', '.join(WORKLOADS)}")
    if not count.isdecimal() or int(count) < 1:
        raise ScheduleError(f"{where}: requests must be a positive integer, got {count!r}")
    return workload, int(count)


def parse_schedule(spec: str) -> Schedule:
    """Parse "workload:requests,..." into a `Schedule`; `ScheduleError` says which item is wrong."""
    items = [item.strip() for item in spec.split(",")]
    if not spec.strip():
        raise ScheduleError(f"empty schedule spec; expected e.g. {DEFAULT_SPEC!r}")
    seen: Counter[str] = Counter()
    phases = []
    for position, item in enumerate(items, start=1):
        if not item:
            raise ScheduleError(f"schedule item {position} is empty (stray comma in {spec!r}?)")
        workload, requests = _parse_item(item, position)
        seen[workload] += 1
        name = workload if seen[workload] == 1 else f"{workload}-{seen[workload]}"
        phases.append(Phase(name=name, workload=workload, requests=requests))
    return Schedule(phases=tuple(phases))


def default_schedule() -> Schedule:
    return parse_schedule(DEFAULT_SPEC)


def plan_schedule(schedule: Schedule, seed: int = 0, split: Split | None = None) -> list[PhasePlan]:
    """Resolve every phase to its prompts; the same (schedule, seed, split) always gives the same plan.

    A source smaller than the phase (MT-Bench writing has 30 questions) is cycled in its seeded order. `split`:
    only prompts of that side of each workload (`split_of`).
    """
    seen: Counter[str] = Counter()
    plans = []
    for phase in schedule.phases:
        phase_seed = seed + RECUR_SEED_STRIDE * seen[phase.workload]
        seen[phase.workload] += 1
        pool = load_workload(phase.workload, phase.requests, phase_seed, split)
        if not pool:
            raise WorkloadUnavailable(f"workload {phase.workload!r} yielded no prompts for phase {phase.name!r}")
        prompts = tuple(pool[i % len(pool)] for i in range(phase.requests))
        plans.append(PhasePlan(phase=phase, prompts=prompts))
    return plans
