"""Per-token acceptance from what an engine reports: draft tokens accepted over verify steps, at g steps.

Averaging per-report estimates would be biased (inverting 1 + a + ... + a^g is nonlinear, and a single request
at g = 5 yields estimates of 0 or 1 only). Instead the reports are pooled: for every g the estimator keeps
decayed sums of accepted tokens A_g and of verify steps n_g, and solves the moment equation

    sum_g n_g · m(a, g) = sum_g A_g,    m(a, g) = a + a^2 + ... + a^g  (expected accepted draft tokens)

for a (Newton's method; m increases with a, so the root is unique). Forgetting is by elapsed request steps,
measured or not: while speculation is off nothing is reported, but `elapse` still shrinks the old sums, so the
next probe is not drowned by stale history. Scaling all sums does not move the root, so elapse alone never
changes the value.
"""

import math


def accepted_per_step(a: float, g: int) -> float:
    """m(a, g) = a + a^2 + ... + a^g."""
    return sum(a**i for i in range(1, g + 1))


def _m_and_slope(a: float, g: int) -> tuple[float, float]:
    """m(a, g) and dm/da = 1 + 2a + ... + g a^(g-1), in one pass."""
    m, dm, power = 0.0, 0.0, 1.0  # power = a^(i-1)
    for i in range(1, g + 1):
        dm += i * power
        power *= a
        m += power
    return m, dm


def per_token(accept_length: float, g: int) -> float:
    """The per-token acceptance `a` of a chain of g draft tokens with 1 + m(a, g) = `accept_length` (the trainer's
    held-out figure, in the trigger's unit)."""
    est = AcceptanceEstimator()
    est.add(accept_length - 1.0, 1, g)
    value = est.value
    assert value is not None  # one step added
    return value


class AcceptanceEstimator:
    def __init__(self, half_life_steps: float = math.inf, prior: float | None = None):
        """`half_life_steps`: request verify steps after which a report weighs half (inf: a plain pooled
        mean, used for windows). `prior`: the value reported until something is measured."""
        self.keep_per_step = 0.5 ** (1 / half_life_steps)
        self.prior = prior
        self._accepted: dict[int, float] = {}
        self._steps: dict[int, float] = {}
        self._value: float | None = None  # cache, cleared by add
        self._last: float | None = None  # the previous solution: Newton's start

    @property
    def steps(self) -> float:
        """Decayed request verify steps behind the estimate (0: nothing measured, `value` is the prior)."""
        return sum(self._steps.values())

    def elapse(self, steps: float) -> None:
        keep = self.keep_per_step**steps
        for g in self._steps:
            self._accepted[g] *= keep
            self._steps[g] *= keep

    def add(self, accepted: float, steps: float, g: int) -> None:
        """`accepted` draft tokens (bonus token excluded) over `steps` request verify steps at g draft steps."""
        if g <= 0 or steps <= 0:
            return  # no draft tokens: nothing learnt about acceptance
        self._accepted[g] = self._accepted.get(g, 0.0) + min(accepted, g * steps)
        self._steps[g] = self._steps.get(g, 0.0) + steps
        self._value = None

    def update(self, accepted: float, steps: float, g: int) -> float | None:
        """Time passes by `steps` and this report arrives; returns the new estimate."""
        self.elapse(steps)
        self.add(accepted, steps, g)
        return self.value

    @property
    def value(self) -> float | None:
        if self.steps <= 0:
            return self.prior
        if self._value is None:
            self._value = self._solve()
        return self._value

    def _solve(self) -> float:
        target = sum(self._accepted.values())
        if target <= 0:
            return 0.0
        if target >= sum(g * n for g, n in self._steps.items()):
            return 1.0
        # f(a) = sum n_g m(a, g) - target is increasing and convex on [0, 1]: Newton from the right of the
        # root descends to it monotonically, and from the left overshoots once at most (clamped to 1).
        a = 1.0 if self._last is None else self._last
        for _ in range(50):
            f, df = -target, 0.0
            for g, n in self._steps.items():
                m, dm = _m_and_slope(a, g)
                f, df = f + n * m, df + n * dm
            step = f / df
            a = min(1.0, max(0.0, a - step))
            if abs(step) < 1e-12:
                break
        self._last = a
        return a

    def scaled(self, factor: float) -> "AcceptanceEstimator":
        """A copy whose evidence weighs `factor` times as much (same value): a new draft version's start."""
        out = AcceptanceEstimator(prior=self.prior)
        out.keep_per_step = self.keep_per_step
        out._accepted = {g: v * factor for g, v in self._accepted.items()}
        out._steps = {g: v * factor for g, v in self._steps.items()}
        return out
