"""Speculation control: a TIDE decision (batch size -> draft steps) overrides SGLang's adaptive choice.

SGLang's adaptive mode routes a batch size to a slot (a batch-size bucket) whose candidate steps have CUDA graphs.
At each sync point every rank asks the decider for each slot, rounds down to a candidate, and the ranks take the
element-wise MIN, so all of them run the same steps for the same batch. Between sync points the table is fixed.

The decider is either installed by an embedding (`hooks.set_step_decider`) or TIDE's `SpeculationController`,
built from the cost profile `TIDE_CONTROL_PROFILE` once the slots are known, and fed the acceptance of every
committed decode verify on every rank (the same data on every rank, so the ranks propose the same table). While the
control state forces this pod's steps (`tide profile`), every slot runs them, decider or not.

Step times: the interval between two consecutive decode results, when exactly one batch was launched in between
(under overlap scheduling the next batch is launched before a result is processed, so an interval is one batch's
time; a prefill in between, or an idle scheduler, makes it something else and it is dropped).
"""

import itertools
from collections.abc import Callable, Sequence
from pathlib import Path

from tide_sglang.control.profile import Profile

StepDecider = Callable[[int], int]  # batch size -> draft steps (0: no speculation), e.g. SpeculationController


class ProfileError(ValueError):
    """TIDE_CONTROL_PROFILE names a file that cannot be read or is not a cost profile."""


def load_profile(path: Path) -> Profile:
    """The controller's cost profile; a bad file is an error at start, never a silent fall back to SGLang's steps."""
    try:
        return Profile.load(path)
    except (OSError, ValueError) as e:  # pydantic's ValidationError is a ValueError
        raise ProfileError(f"TIDE_CONTROL_PROFILE={path} is not a usable cost profile: {e}") from e


def choose_steps(decision: int, candidates: list[int]) -> int:
    """The largest candidate not above the decision (only candidates have runtime states), else the smallest."""
    below = [c for c in candidates if c <= decision]
    return max(below) if below else min(candidates)


def candidate_steps(slots: dict[int, list[int]]) -> list[int]:
    """Every step count some slot can run, and 0: the controller's candidates (each slot then rounds down)."""
    return sorted({0, *(g for steps in slots.values() for g in steps)})


class StepClock:
    """The time of each decode batch: the interval since the previous decode result, per batch size and steps."""

    def __init__(self) -> None:
        self._last: tuple[float, int] | None = None  # (time, batches launched) at the previous decode result

    def reset(self) -> None:
        """The scheduler idled: the next interval would hold the idle time."""
        self._last = None

    def tick(self, now: float, launched: int) -> float | None:
        """A decode result processed at `now` after `launched` batches in all; its batch's seconds, or None."""
        last, self._last = self._last, (now, launched)
        if last is None or launched - last[1] != 1:
            return None
        return now - last[0]


def acceptance_sample(correct_drafts: Sequence[int], committed: bytes | Sequence[bool]) -> tuple[int, int]:
    """(accepted draft tokens, request verify steps) of one verify's committed requests (C-level, no Python loop
    over the batch). `correct_drafts` per request is accept_len - 1: the bonus token is not a draft token
    (SGLang's `num_correct_drafts_per_req_cpu`)."""
    if len(correct_drafts) != len(committed):
        raise ValueError(f"{len(correct_drafts)} accept counts for {len(committed)} requests")
    return sum(itertools.compress(correct_drafts, committed)), sum(committed)


NO_DECISION = -1  # a rank's proposal for a slot it leaves to SGLang; the MIN keeps the slot undecided if any rank does


class StepTable:
    """The agreed steps per slot. A rank proposes, per slot: the forced steps while `tide profile` forces this pod
    (the control state's `force:<pod>`), else its decider's choice, else NO_DECISION (SGLang's own choice)."""

    def __init__(self, decider: StepDecider | None) -> None:
        self.decider = decider
        self.table: dict[int, int] | None = None  # slot batch size -> agreed steps

    def proposals(self, slots: dict[int, list[int]], forced: int | None = None) -> list[int]:
        """This rank's choice per slot (slot batch size -> its candidate steps), in sorted slot order."""
        if forced is not None:
            return [choose_steps(forced, slots[bs]) for bs in sorted(slots)]
        if self.decider is None:
            return [NO_DECISION] * len(slots)
        return [choose_steps(self.decider(bs), slots[bs]) for bs in sorted(slots)]

    def agree(self, slots: dict[int, list[int]], agreed: list[int]) -> dict[int, int]:
        self.table = {bs: g for bs, g in zip(sorted(slots), agreed, strict=True) if g != NO_DECISION}
        return self.table

    def steps(self, slot_bs: int) -> int | None:
        return None if self.table is None else self.table.get(slot_bs)
