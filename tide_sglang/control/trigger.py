"""When to collect hidden states and train: TIDE's Algorithm 1, plus an immediate start on a change point.

One sample per window of acceptance (the controller forms windows of `control_window_steps` verify steps).
Our reading of Algorithm 1, as a three-state machine over a short and a long EWMA of acceptance:

    warmup --(n_init windows)--> active            collect only, then adapt the draft to this traffic
    active --(|short - long| <= eps for n_threshold windows)--> idle      training no longer moves acceptance
    idle   --(short < long - eps for n_threshold windows)--> active       acceptance drifted down: retrain
    any    --(force(): change point)--> active                            abrupt drop: retrain now

`collect` is true in warmup and active (the capture hook may stop streaming when idle); `train` only in
active (the trainer idles and frees its GPU otherwise).
"""

from enum import StrEnum

from tide_sglang.control.ewma import Ewma
from tide_sglang.settings import TideSettings


class TriggerState(StrEnum):
    WARMUP = "warmup"
    ACTIVE = "active"
    IDLE = "idle"


class TrainingTrigger:
    def __init__(self, short_alpha: float, long_alpha: float, epsilon: float, n_init: int, n_threshold: int):
        self.short = Ewma(short_alpha)
        self.long = Ewma(long_alpha)
        self.epsilon = epsilon
        self.n_init = n_init
        self.n_threshold = n_threshold
        self.state = TriggerState.WARMUP
        self.reason = "warmup"
        self.windows = 0
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

    def report(self) -> dict[str, float | bool | str]:
        """What an engine's heartbeat carries (tide_sglang.rollout.Heartbeat.trigger): the operator turns the
        trainer and capture on while any pod's `train` / `collect` is true."""
        return {"state": self.state.value, "reason": self.reason, "train": self.train, "collect": self.collect,
                "short": self.short.value or 0.0, "long": self.long.value or 0.0}

    @property
    def gap(self) -> float:
        """short - long: negative when acceptance is falling."""
        return (self.short.value or 0.0) - (self.long.value or 0.0)

    def update(self, acceptance: float) -> TriggerState:
        self.windows += 1
        self.short.update(acceptance)
        self.long.update(acceptance)
        if self.state is TriggerState.WARMUP:
            if self.windows >= self.n_init:
                self._enter(TriggerState.ACTIVE, "initial adaptation")
        elif self.state is TriggerState.ACTIVE:
            self._count_until(abs(self.gap) <= self.epsilon, TriggerState.IDLE, "plateau")
        else:
            self._count_until(self.gap < -self.epsilon, TriggerState.ACTIVE, "drift")
        return self.state

    def force(self, reason: str = "changepoint") -> None:
        """Start collection and training now, whatever the state (an abrupt drop was detected)."""
        self._enter(TriggerState.ACTIVE, reason)

    def _count_until(self, condition: bool, state: TriggerState, reason: str) -> None:
        self._count = self._count + 1 if condition else 0
        if self._count >= self.n_threshold:
            self._enter(state, reason)

    def _enter(self, state: TriggerState, reason: str) -> None:
        self.state, self.reason, self._count = state, reason, 0
