"""When to collect hidden states and train: TIDE's Algorithm 1, plus an immediate start on a change point.

One sample per window of acceptance (the controller forms windows of `control_window_steps` verify steps, each
from one draft version). Our reading of Algorithm 1, as a three-state machine over a short and a long EWMA of
acceptance, with the movement of acceptance split by its cause:

    warmup --(n_init windows)--> active            collect only, then adapt the draft to this traffic
    active --(traffic not falling, versions not moving it, drift answered; n_threshold windows)--> idle  "plateau"
    idle   --(traffic falling: short < long - eps for n_threshold windows)--> active              "drift"
    any    --(force(): change point)--> active                                                    abrupt drop

- Traffic: `gap = short - long` over windows with each new version's rise taken out (at a version's first window
  both averages move by its rise), so the gap moves only with what is served. A fall is drift; a rise (a domain the
  served draft already knows) is no reason to train, in any state. A version's rise is the trainer's own held-out
  gain recorded in its manifest (`credit`), which the traffic cannot confound; without one (the imported version,
  an engine that does not pass manifests), its first window's rise over the old level, which a shift arriving with
  the version does confound. A version explains a rise only: the trainer publishes only a version that beats the
  served one.
- Training: `gain` is the latest version's rise, forgotten at the long EWMA's rate (as Algorithm 1's own gap
  forgets a version's jump). The trainer publishes the first candidate that beats the served draft by its margin,
  so while it learns fast each version's rise is large; as it converges the rises shrink towards the margin, and
  once its candidates stop winning none come and `gain` decays: a small latest rise, or none lately, is
  convergence, read from the versions served alone. Its known limit (docs/controller.md): a trainer that improves
  in many steps just past its margin is stopped at the first small one, since `eps` is sized for the windows'
  noise, not for the held-out measurement's.
- A drift is answered by a version: after "drift" or "changepoint" there is no plateau until a version has been
  served, or until the traffic has stayed settled for as many windows as it spent falling (`gap < -eps`) since
  the trigger fired. A trainer slower than the long EWMA's memory still gets its first version out; one that
  cannot beat the served draft on the new traffic does not train for ever.
- `eps` is sized from the windows' own spread: the larger of the configured floor and `Z` standard deviations of
  `gap` under noise alone, from the variance of one window (half the mean squared difference of consecutive
  windows of one version, where a change of level enters as one difference) and the two EWMAs' weights.

`collect` is true in warmup and active (the capture hook may stop streaming when idle); `train` only in
active (the trainer idles and frees its GPU otherwise).
"""

import math
from enum import StrEnum

from tide_sglang.control.ewma import Ewma
from tide_sglang.settings import TideSettings

Z = 2.0  # standard deviations of the gap's noise that count as movement (one-sided: a 2.3% chance per window)


class TriggerState(StrEnum):
    WARMUP = "warmup"
    ACTIVE = "active"
    IDLE = "idle"


def gap_noise(short_alpha: float, long_alpha: float) -> float:
    """Standard deviation of short - long over independent windows of unit variance (two EWMAs of the same
    samples: Var S = a/(2-a), Var L = b/(2-b), Cov = ab/(a+b-ab))."""
    a, b = short_alpha, long_alpha
    return math.sqrt(max(a / (2 - a) + b / (2 - b) - 2 * a * b / (a + b - a * b), 0.0))


class TrainingTrigger:
    def __init__(self, short_alpha: float, long_alpha: float, epsilon: float, n_init: int, n_threshold: int):
        """`epsilon`: the smallest acceptance change that counts, whatever the windows' spread."""
        self.short = Ewma(short_alpha)
        self.long = Ewma(long_alpha)
        self.spread = Ewma(long_alpha)  # variance of one window
        self.floor = epsilon
        self.n_init = n_init
        self.n_threshold = n_threshold
        self.noise = gap_noise(short_alpha, long_alpha)
        self.state = TriggerState.WARMUP
        self.reason = "warmup"
        self.windows = 0
        self.gain = 0.0  # the latest version's rise in acceptance, decaying at the long EWMA's rate
        self.version: int | None = None
        self._credits: dict[int, float] = {}  # version -> its held-out gain, until its first window
        # Since the last drift or change point with no version served yet: windows seen, and those with the traffic
        # still falling (None: no drift waits for an answer).
        self._unanswered: tuple[int, int] | None = None
        self._last: float | None = None  # the previous window of the same version
        self._count = 0  # consecutive windows meeting the current state's exit condition

    @classmethod
    def from_settings(cls, s: TideSettings) -> "TrainingTrigger":
        return cls(s.trigger_short_alpha, s.trigger_long_alpha, s.trigger_epsilon, s.trigger_n_init,
                   s.trigger_n_threshold)

    @property
    def train(self) -> bool:
        return self.state is TriggerState.ACTIVE

    @property
    def collect(self) -> bool:
        return self.state is not TriggerState.IDLE

    @property
    def epsilon(self) -> float:
        """The gap that counts: the floor, or Z standard deviations of the gap's noise when larger."""
        variance = self.spread.value
        return self.floor if variance is None else max(self.floor, Z * self.noise * math.sqrt(variance))

    def report(self) -> dict[str, float | bool | str]:
        """What an engine's heartbeat carries (tide_sglang.rollout.Heartbeat.trigger): the operator turns the
        trainer and capture on while any pod's `train` / `collect` is true."""
        return {"state": self.state.value, "reason": self.reason, "train": self.train, "collect": self.collect,
                "short": self.short.value or 0.0, "long": self.long.value or 0.0, "epsilon": self.epsilon,
                "gain": self.gain}

    @property
    def gap(self) -> float:
        """short - long with version jumps taken out: negative when the traffic's acceptance is falling."""
        return (self.short.value or 0.0) - (self.long.value or 0.0)

    def update(self, acceptance: float, version: int) -> TriggerState:
        """One window's acceptance, measured on draft `version`."""
        self.windows += 1
        eps = self.epsilon  # the noise known before this window: a drop does not widen its own threshold
        self._observe(acceptance, version)
        if self.state is TriggerState.WARMUP:
            if self.windows >= self.n_init:
                self._enter(TriggerState.ACTIVE, "initial adaptation")
        elif self.state is TriggerState.ACTIVE:
            self._wait(eps)
            self._count_until(self.gap >= -eps and abs(self.gain) <= eps and self._unanswered is None,
                              TriggerState.IDLE, "plateau")
        else:
            self._count_until(self.gap < -eps, TriggerState.ACTIVE, "drift")
        return self.state

    def credit(self, version: int, gain: float) -> None:
        """`version`'s held-out gain: per-token acceptance over the version served when the trainer evaluated it,
        on the same held-out rows (its manifest's metrics). Taken as the version's rise at its first window."""
        self._credits[version] = gain

    def _observe(self, acceptance: float, version: int) -> None:
        self.gain *= 1 - self.long.alpha
        if self.version is not None and version != self.version and self.short.value is not None:
            # The new version's first window: its rise is the version's, not the traffic's, so both averages move
            # by it and the gap keeps measuring traffic alone. Measured on held-out rows when the manifest says;
            # else the first window's rise over the old level (a fall is never the version's: the trainer publishes
            # only a version that beats the served one, so a fall at a swap is the traffic's).
            held_out = self._credits.get(version)
            rise = max(acceptance - self.short.value if held_out is None else held_out, 0.0)
            self.short.shift(rise)
            self.long.shift(rise)
            self.gain = rise  # the latest step's size: convergence shows as steps that shrink (see above)
            self._unanswered = None
        elif self._last is not None:
            self.spread.update((acceptance - self._last) ** 2 / 2)
        self._credits = {v: g for v, g in self._credits.items() if v > version}  # older ones will not be served
        self.version, self._last = version, acceptance
        self.short.update(acceptance)
        self.long.update(acceptance)

    def _wait(self, eps: float) -> None:
        """Count a window of an unanswered drift; give up waiting once the traffic has been settled for as long as
        it took to settle (the bound scales with the drop and the EWMAs' weights: no extra knob)."""
        if self._unanswered is None:
            return
        seen, falling = self._unanswered[0] + 1, self._unanswered[1] + (self.gap < -eps)
        # at least n_threshold windows: a change point fires before the EWMAs have seen the drop
        self._unanswered = None if seen >= max(2 * falling, self.n_threshold) else (seen, falling)

    def force(self, reason: str = "changepoint") -> None:
        """Start collection and training now, whatever the state (an abrupt drop was detected)."""
        self._enter(TriggerState.ACTIVE, reason)

    def _count_until(self, condition: bool, state: TriggerState, reason: str) -> None:
        self._count = self._count + 1 if condition else 0
        if self._count >= self.n_threshold:
            self._enter(state, reason)

    def _enter(self, state: TriggerState, reason: str) -> None:
        self.state, self.reason, self._count = state, reason, 0
        if reason in ("drift", "changepoint"):
            self._unanswered = (0, 0)
