"""Online correction of the cost model from measured decode-step times.

A profile is measured once, on an idle engine; serving differs (other contexts, cache pressure, a neighbour on
the host, a profile from another pod of the same GPU). Every decode step the engine runs is a measurement of
t(b, g), so the controller keeps, per batch-size bucket and step count, an EWMA of r(b, g) = measured / predicted
step time (model.step_seconds), and the policy divides S(a, g, b) by

    f(b, g) = r(b, g) / r(b, 0)

which turns the model's step cost into the measured one (the controller times a plain step now and then in a
bucket that speculates, so r(b, 0) is known there too). A ratio not measured yet takes the mean of the bucket's
measured ones: a profile off by one factor everywhere (a slower host) then changes nothing, and a step count never
run is neither favoured nor penalised against the ones that were.
"""

from tide_sglang.control.ewma import Ewma
from tide_sglang.control.model import step_seconds
from tide_sglang.control.policy import bucket
from tide_sglang.control.profile import Profile

# One interval can hold a pause that has nothing to do with the step (a GC, a preemption); a ratio is clipped to
# this band so one such sample moves the EWMA by at most alpha·(CLIP - r).
CLIP = 4.0


class StepTimeCorrection:
    def __init__(self, profile: Profile, alpha: float) -> None:
        """`alpha`: weight of one new step time against a long history of its (bucket, g)."""
        self.profile = profile
        self.alpha = alpha
        self._ratios: dict[int, dict[int, Ewma]] = {}  # bucket -> g -> EWMA of measured / predicted

    def add(self, batch_size: int, g: int, seconds: float) -> float:
        """A decode step of `batch_size` requests at g draft steps took `seconds`; returns the new ratio r(b, g)."""
        r = seconds / step_seconds(self.profile, g, batch_size)
        ewma = self._ratios.setdefault(bucket(batch_size), {}).setdefault(g, Ewma(self.alpha))
        return ewma.update(min(CLIP, max(1 / CLIP, r)))

    def measured(self, batch_size: int, g: int) -> bool:
        return g in self._ratios.get(bucket(batch_size), {})

    def ratio(self, batch_size: int, g: int) -> float:
        """r(b, g); the mean of the bucket's measured ratios when g was not measured there; 1 when none was."""
        measured = {k: e.value for k, e in self._ratios.get(bucket(batch_size), {}).items() if e.value is not None}
        if g in measured:
            return measured[g]
        return sum(measured.values()) / len(measured) if measured else 1.0

    def factor(self, batch_size: int, g: int) -> float:
        """f(b, g): what the predicted step cost at g is multiplied by (1 at g = 0)."""
        return self.ratio(batch_size, g) / self.ratio(batch_size, 0)
