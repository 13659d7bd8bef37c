"""Choosing the number of draft steps: argmax of the speedup model, held steady by hysteresis.

State is kept per batch-size bucket (powers of two, like CUDA-graph batch sizes and SGLang's per-batch-size
adaptive slots), because a batch mix that alternates between 4 and 60 requests is not noise: each size has
its own optimum. Within a bucket a switch needs evidence; the rules (docs/controller.md, "Hysteresis"):

1. the current choice g predicts a loss (S(g) < 1): switch at once to the best candidate, which is 0 when no
   number of steps covers its cost: never keep speculating at a predicted loss;
2. otherwise switch to the best candidate g* only after S(g*) > S(g)·(1 + margin) held for `patience`
   consecutive decisions with the same g*.

Turning speculation on from 0 therefore needs S(g*) > 1 + margin, and turning it off needs S(g) < 1: the band
[1, 1 + margin] in between absorbs noise that would otherwise flip it every step.
"""

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from tide_sglang.control.model import binary_switch, speedup
from tide_sglang.control.profile import Profile


def bucket(batch_size: int) -> int:
    """Smallest power of two >= batch_size."""
    return 1 << max(0, math.ceil(math.log2(max(1, batch_size))))


@dataclass(frozen=True)
class Decision:
    steps: int  # draft steps to run now (0: speculation off)
    best: int  # the model's argmax, which hysteresis may not have adopted yet
    predicted_speedup: float  # S at `steps`
    switched: bool  # steps differs from this bucket's previous decision
    bucket: int


@dataclass
class _Hold:
    current: int
    candidate: int = -1
    count: int = 0


CostFactor = Callable[[int, int], float]  # (batch size, g) -> measured over predicted step cost (correction.py)


class StepPolicy:
    """argmax_g S(a, g, b) over the candidate step counts, with per-bucket hysteresis. `cost_factor`: divides
    S(a, g, b), the online correction from measured step times (StepTimeCorrection.factor)."""

    def __init__(self, profile: Profile, candidates: Sequence[int], margin: float, patience: int,
                 cost_factor: CostFactor | None = None):
        if 0 not in candidates:
            candidates = [0, *candidates]  # "off" must always be reachable
        self.profile = profile
        self.candidates = sorted(set(candidates))
        self.margin = margin
        self.patience = patience
        self.cost_factor = cost_factor
        self._holds: dict[int, _Hold] = {}

    def decide(self, acceptance: float, batch_size: int) -> Decision:
        s = {g: speedup(self.profile, acceptance, g, batch_size) for g in self.candidates}
        if self.cost_factor is not None:
            s = {g: v / self.cost_factor(batch_size, g) for g, v in s.items()}
        best = max(self.candidates, key=lambda g: (s[g], -g))  # ties: fewer steps
        key = bucket(batch_size)
        hold = self._holds.get(key)
        if hold is None:  # first decision in this bucket: nothing to flap against
            first = best if s[best] > 1 + self.margin else 0
            self._holds[key] = _Hold(current=first)
            return Decision(first, best, s[first], switched=False, bucket=key)
        previous = hold.current
        hold.current = self._next(hold, s, best)
        return Decision(hold.current, best, s[hold.current], hold.current != previous, key)

    def _next(self, hold: _Hold, s: dict[int, float], best: int) -> int:
        cur = hold.current
        if cur not in s:  # candidates changed under us
            hold.count = 0
            return best
        if s[cur] < 1.0:  # predicted loss: no patience
            hold.count = 0
            return best
        if best == cur or s[best] <= s[cur] * (1 + self.margin):
            hold.count = 0
            return cur
        hold.count = hold.count + 1 if hold.candidate == best else 1
        hold.candidate = best
        if hold.count >= self.patience:
            hold.count = 0
            return best
        return cur

    def current(self, batch_size: int) -> int | None:
        hold = self._holds.get(bucket(batch_size))
        return None if hold is None else hold.current


class BinarySwitch:
    """TIDE's policy as a drop-in for StepPolicy: a fixed g whenever S(a, g, b) > 1, else 0; no hysteresis.
    The baseline that `tide bench control` compares StepPolicy against."""

    def __init__(self, profile: Profile, steps: int):
        self.profile = profile
        self.steps = steps
        self.candidates = [0, steps]
        self._last: dict[int, int] = {}

    def decide(self, acceptance: float, batch_size: int) -> Decision:
        g = binary_switch(self.profile, acceptance, batch_size, self.steps)
        key = bucket(batch_size)
        previous = self._last.get(key, g)
        self._last[key] = g
        return Decision(g, g, speedup(self.profile, acceptance, g, batch_size), g != previous, key)
