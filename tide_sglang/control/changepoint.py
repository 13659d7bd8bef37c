"""Abrupt-drop detection on window acceptance: a one-sided CUSUM with a threshold set by the false-alarm rate.

TIDE reacts to a shift through EWMAs, which need many windows to move (its stated weakness). CUSUM is the
fastest detector of a mean shift for a given false-alarm rate (Lorden's optimality), so a drop of at least
`min_drop` is found in a few windows. On standardised samples z = (mu - x) / sigma:

    C_t = max(0, C_{t-1} + z_t - k),  k = min_drop / (2 sigma),   alarm when C_t > h

(computed on arcsine-transformed acceptance; see DropDetector).

h is the smallest threshold whose in-control average run length (windows between false alarms, Siegmund's
approximation for Gaussian samples) is at least 1 / false_alarm_rate. mu and sigma are estimated from all
windows since the last reset, monitoring starting after `warmup` of them; a reset follows each alarm (the new
level becomes the baseline) and each draft-version change (a new draft changes the level on purpose).
"""

import functools
import math

_RHO = 1.166  # Siegmund's overshoot correction for Gaussian CUSUM


def average_run_length(k: float, h: float) -> float:
    """Siegmund: windows between false alarms of a CUSUM with reference k and threshold h (sigma units)."""
    x = 2 * k * (h + _RHO)
    if x > 700:  # exp overflows; the ARL is astronomically long anyway
        return math.inf
    return (math.exp(x) - x - 1) / (2 * k * k)


def cusum_threshold(k: float, false_alarm_rate: float) -> float:
    """Smallest h with average_run_length(k, h) >= 1 / false_alarm_rate (bisection; ARL increases in h)."""
    target = 1 / false_alarm_rate
    lo, hi = 0.0, 1.0
    while average_run_length(k, hi) < target:
        hi *= 2
    for _ in range(60):
        mid = (lo + hi) / 2
        if average_run_length(k, mid) < target:
            lo = mid
        else:
            hi = mid
    return hi


@functools.lru_cache(maxsize=4096)
def _threshold(k: float, false_alarm_rate: float) -> float:
    return cusum_threshold(k, false_alarm_rate)


def t_to_normal(t: float, dof: float) -> float:
    """Map a Student-t value to the standard normal value of equal tail probability (Wallace 1959,
    accurate to ~0.01 for dof >= 5). Standardising by an estimated sigma gives t, not normal, values."""
    return math.copysign(math.sqrt((dof - 0.5) * math.log1p(t * t / dof)), t)


class DropDetector:
    """Self-starting one-sided CUSUM (Hawkins 1987) over window acceptance; `update` is True on an alarm.

    Inputs are proportions in [0, 1], monitored as y = asin(sqrt(x)): a window's acceptance is a proportion
    of accepted draft tokens, whose spread shrinks and whose lower tail grows as it nears 1; the arcsine
    transform makes the spread nearly constant and the shape nearly symmetric, as CUSUM's threshold assumes.
    `min_drop` stays in acceptance units and is converted at the current baseline.

    Each window is standardised by the mean and standard deviation of all windows before it since the last
    reset (not only the warm-up: a warm-up of tens of windows misjudges sigma by 10-20%, which multiplies the
    false-alarm rate), and mapped through the t distribution so the estimation error is accounted for.
    """

    # sigma is floored at min_drop / 8: a nearly constant signal would otherwise make k (and sensitivity to
    # tiny, harmless wobbles) unbounded.
    SIGMA_FLOOR = 1 / 8
    # h is sized for half the configured rate: margin for what is left of the skew of small windows
    # and for Siegmund's approximation (simulated rates stay below the configured one; tests check it).
    DESIGN_MARGIN = 2.0

    def __init__(self, min_drop: float, false_alarm_rate: float, warmup: int):
        self.min_drop = min_drop
        self.false_alarm_rate = false_alarm_rate
        self.warmup = warmup
        self.alarms = 0
        self.reset()

    def reset(self) -> None:
        self._n, self._mean, self._m2 = 0, 0.0, 0.0  # Welford's running mean and sum of squares
        self.sigma = math.nan
        self.k = math.nan
        self.threshold = math.nan
        self.statistic = 0.0

    @property
    def ready(self) -> bool:
        return self._n >= self.warmup

    @property
    def baseline(self) -> float:
        """Mean window acceptance since the last reset (acceptance units)."""
        return math.sin(self._mean) ** 2

    def update(self, x: float) -> bool:
        x = math.asin(math.sqrt(min(1.0, max(0.0, x))))
        if self.ready and self._mean > 0:  # a baseline of no acceptance at all cannot drop (and k would be 0 / 0)
            self._standardise()
            sd = self.sigma * math.sqrt(1 + 1 / self._n)  # x and the estimated mean both vary
            z = t_to_normal((self._mean - x) / sd, self._n - 1)
            self.statistic = max(0.0, self.statistic + z - self.k)
            if self.statistic > self.threshold:
                self.alarms += 1
                self.reset()
                return True
        self._learn(x)
        return False

    def _standardise(self) -> None:
        drop = self._mean - math.asin(math.sqrt(max(0.0, self.baseline - self.min_drop)))  # in y units
        self.sigma = max(math.sqrt(self._m2 / (self._n - 1)), drop * self.SIGMA_FLOOR)
        self.k = drop / (2 * self.sigma)
        # k rounded down to 0.01 (a larger h, conservative) so thresholds are computed once, not per window.
        k = max(0.01, math.floor(self.k * 100) / 100)
        self.threshold = _threshold(k, self.false_alarm_rate / self.DESIGN_MARGIN)

    def _learn(self, x: float) -> None:
        self._n += 1
        delta = x - self._mean
        self._mean += delta / self._n
        self._m2 += delta * (x - self._mean)
