"""Exponentially weighted moving average that forgets with elapsed time, measured or not.

Kept as a decayed sum of weights (`mass`) and of weighted values, so that
- an update of weight w counts as w unit updates (memory counted in samples, not in calls);
- time can pass without a sample (`elapse`), after which a new sample outweighs the stale history;
- the first sample is taken as is (no start-up bias towards 0 or towards the prior).
Used for the training trigger's short and long averages; acceptance itself is pooled (acceptance.py).
"""


class Ewma:
    def __init__(self, alpha: float, initial: float | None = None, mass: float = 0.0):
        """`alpha`: weight of one unit of new data against a long history; `initial`/`mass`: a prior worth
        `mass` units, where 1 is a long history (mass 0: the value stands only until the first sample)."""
        if not 0 < alpha <= 1:
            raise ValueError("alpha must be in (0, 1]")
        self.alpha = alpha
        self.prior = initial
        self.mass = mass
        self._sum = (initial or 0.0) * mass

    @classmethod
    def from_half_life(cls, half_life: float, initial: float | None = None, mass: float = 0.0) -> "Ewma":
        return cls(1 - 0.5 ** (1 / half_life), initial, mass)

    @property
    def value(self) -> float | None:
        if self.mass > 0:
            return self._sum / self.mass
        return self.prior

    def elapse(self, weight: float) -> None:
        """Let `weight` units of time pass: the past keeps (1 - alpha)^weight of its mass."""
        keep = (1 - self.alpha) ** weight
        self.mass *= keep
        self._sum *= keep

    def shift(self, delta: float) -> None:
        """Move the average by `delta`, keeping its weight: a change of level known to have happened."""
        self._sum += delta * self.mass

    def add(self, x: float, weight: float = 1.0) -> float:
        # Mass in units where a long steady history weighs 1; a sample of weight w adds alpha·w, so
        # `update` reproduces v <- keep·v + (1 - keep)·x once the history is long.
        self.mass += self.alpha * weight
        self._sum += self.alpha * weight * x
        return self._sum / self.mass

    def update(self, x: float, weight: float = 1.0) -> float:
        """Time passes by `weight` and a sample x of that weight arrives (the usual EWMA step)."""
        self.elapse(weight)
        return self.add(x, weight)
