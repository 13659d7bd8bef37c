"""Speculation control: a TIDE decision (batch size -> draft steps) overrides SGLang's adaptive choice.

SGLang's adaptive mode routes a batch size to a slot (a batch-size bucket) whose candidate steps have CUDA graphs.
At each sync point every rank asks the decider for each slot, rounds down to a candidate, and the ranks take the
element-wise MIN, so all of them run the same steps for the same batch. Between sync points the table is fixed.
"""

from collections.abc import Callable

StepDecider = Callable[[int], int]  # batch size -> draft steps (0: no speculation), e.g. SpeculationController


def choose_steps(decision: int, candidates: list[int]) -> int:
    """The largest candidate not above the decision (only candidates have runtime states), else the smallest."""
    below = [c for c in candidates if c <= decision]
    return max(below) if below else min(candidates)


class StepTable:
    def __init__(self, decider: StepDecider) -> None:
        self.decider = decider
        self.table: dict[int, int] | None = None  # slot batch size -> agreed steps

    def proposals(self, slots: dict[int, list[int]]) -> list[int]:
        """This rank's choice per slot (slot batch size -> its candidate steps), in sorted slot order."""
        return [choose_steps(self.decider(bs), slots[bs]) for bs in sorted(slots)]

    def agree(self, slots: dict[int, list[int]], agreed: list[int]) -> dict[int, int]:
        self.table = dict(zip(sorted(slots), agreed, strict=True))
        return self.table

    def steps(self, slot_bs: int) -> int | None:
        return None if self.table is None else self.table.get(slot_bs)
