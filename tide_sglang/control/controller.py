"""The one object an engine holds: feed it verify results, ask it for draft steps and whether to train.

    ctl = SpeculationController(profile, settings)
    g = ctl.steps_for_batch(batch_size)                 # before drafting: 0 means plain decode
    ctl.observe(version, accepted_tokens, steps, g)     # after verify: draft tokens accepted (no bonus)
    ctl.observe_step_time(batch_size, g, seconds)       # a decode step's measured time: corrects the cost model
    ctl.trigger.train, ctl.trigger.collect              # for the trainer and the capture hook

Not thread-safe: call it from the scheduler loop that runs the batches (one per engine process).
"""

import math
from collections.abc import Sequence

from prometheus_client import REGISTRY, CollectorRegistry

from tide_sglang.control.acceptance import AcceptanceEstimator, per_token
from tide_sglang.control.changepoint import DropDetector
from tide_sglang.control.correction import StepTimeCorrection
from tide_sglang.control.metrics import ControlMetrics
from tide_sglang.control.model import best_steps
from tide_sglang.control.policy import BinarySwitch, Decision, StepPolicy
from tide_sglang.control.profile import Profile
from tide_sglang.control.trigger import TrainingTrigger
from tide_sglang.settings import TideSettings


class SpeculationController:
    def __init__(
        self,
        profile: Profile,
        settings: TideSettings,
        *,
        candidates: Sequence[int] | None = None,
        binary_steps: int | None = None,
        version: int = 0,
        registry: CollectorRegistry | None = REGISTRY,
    ):
        """`candidates`: step counts the engine can run (SGLang: the adaptive candidate steps, whose CUDA
        graphs exist); default 0..control_max_steps. `binary_steps`: run TIDE's binary switch at that fixed g
        instead of StepPolicy (the benchmark's baseline). `registry=None` for prometheus multiprocess mode."""
        self.settings = settings
        self.profile = profile
        alpha = settings.control_step_time_alpha
        self.correction = StepTimeCorrection(profile, alpha) if alpha > 0 else None
        steps = candidates if candidates is not None else range(settings.control_max_steps + 1)
        self.policy: StepPolicy | BinarySwitch = (
            BinarySwitch(profile, binary_steps) if binary_steps is not None
            else StepPolicy(profile, list(steps), settings.control_switch_margin, settings.control_switch_patience,
                            None if self.correction is None else self.correction.factor)
        )
        self.trigger = TrainingTrigger.from_settings(settings)
        self.detector = DropDetector(settings.changepoint_min_drop, settings.changepoint_false_alarm_rate,
                                     settings.changepoint_warmup)
        self.metrics = ControlMetrics(settings.deployment, registry)
        self.version = version
        self._acceptance: dict[int, AcceptanceEstimator] = {}
        self._last_steps = 0
        self._off_decisions = 0  # consecutive decisions at 0 steps, for probing
        self._on_decisions = 0  # consecutive decisions above 0 steps, for timing a plain step
        self._window = AcceptanceEstimator()  # pooled over one window, for the trigger and the detector
        self.last_decision: Decision | None = None

    def acceptance(self, version: int | None = None) -> float:
        """Per-token acceptance EWMA of a version; the prior until that version has been measured."""
        est = self._acceptance.get(self.version if version is None else version)
        value = None if est is None else est.value
        return self.settings.control_prior_acceptance if value is None else value

    def steps_for_batch(self, batch_size: int) -> int:
        """Draft steps for the next verify of `batch_size` requests (0: no speculation)."""
        d = self.policy.decide(self.acceptance(), batch_size)
        self.last_decision = d
        self.metrics.decision(self.version, d.bucket, d.steps, d.best, d.predicted_speedup, d.switched)
        steps = d.steps
        self._off_decisions = self._off_decisions + 1 if steps == 0 else 0
        self._on_decisions = self._on_decisions + 1 if steps > 0 else 0
        if steps == 0 and self._should_probe(batch_size):
            steps = max(self.policy.candidates)
            self.metrics.probe(self.version)
        elif steps > 0 and self._should_time_plain(batch_size):
            steps = 0
        if steps == 0:
            # Unmeasured time still ages the estimate, so the next probe is not drowned by stale history.
            self._estimator(self.version).elapse(batch_size)
        self._last_steps = steps
        return steps

    def _should_probe(self, batch_size: int) -> bool:
        """Off with no measurement there is no way back on: when speculation could pay at this batch size
        if acceptance were perfect, run one speculative step now and then to measure acceptance again."""
        interval = self.settings.control_probe_interval
        if interval == 0 or self._off_decisions % interval != 0:
            return False
        k = max(self.policy.candidates)
        return best_steps(self.profile, 1.0, batch_size, k) > 0

    def _should_time_plain(self, batch_size: int) -> bool:
        """The online correction compares speculative steps with plain ones: while a bucket that speculates has
        no plain step timed, run one now and then (every probe interval), else its cost stays the profile's."""
        interval = self.settings.control_probe_interval
        if self.correction is None or interval == 0 or self._on_decisions % interval != 0:
            return False
        return not self.correction.measured(batch_size, 0)

    def observe(self, version: int, accepted_tokens: float, steps: float, draft_steps: int | None = None) -> None:
        """Record a verify: `accepted_tokens` draft tokens accepted over `steps` request verify steps (one per
        request in the batch), at `draft_steps` steps (default: the last value steps_for_batch returned).

        SGLang: accepted_tokens = sum(accept_lens) - batch_size (accept_lens include the bonus token).
        Verifies at 0 draft steps carry no acceptance information and are ignored.
        """
        g = self._last_steps if draft_steps is None else draft_steps
        if version != self.version:
            self._switch_version(version)
        if g <= 0 or steps <= 0:
            return
        a = self._estimator(version).update(accepted_tokens, steps, g)
        self.metrics.acceptance(version, a if a is not None else math.nan)
        self._window.add(accepted_tokens, steps, g)
        if self._window.steps >= self.settings.control_window_steps:
            self._close_window()

    def credit(self, version: int, accept_length: float | None, parent_accept_length: float | None) -> None:
        """A version about to be served, with its manifest's held-out accept lengths (its own and the served
        parent's, on the same rows, at `train_ttt_steps` draft tokens): the trigger takes their difference, per
        token, as the version's rise instead of the served one (which a shift arriving with it confounds)."""
        if accept_length is None or parent_accept_length is None:
            return  # the imported version, or an older manifest: the trigger falls back to the served rise
        g = self.settings.train_ttt_steps
        self.trigger.credit(version, per_token(accept_length, g) - per_token(parent_accept_length, g))

    def observe_step_time(self, batch_size: int, draft_steps: int, seconds: float) -> None:
        """A decode step of `batch_size` requests at `draft_steps` took `seconds` (for SGLang: the interval between
        consecutive decode batches); the policy's cost model follows what steps really take."""
        if self.correction is not None and batch_size > 0 and seconds > 0:
            self.correction.add(batch_size, draft_steps, seconds)

    def _estimator(self, version: int) -> AcceptanceEstimator:
        est = self._acceptance.get(version)
        if est is None:
            est = self._acceptance[version] = AcceptanceEstimator(
                self.settings.control_half_life_steps, self.settings.control_prior_acceptance)
        return est

    def _switch_version(self, version: int) -> None:
        # A new draft changes acceptance on purpose: start its EWMA from the old one's value (best guess until
        # measured; worth half the old evidence), and re-learn the detector's baseline so the change is not
        # taken for drift.
        previous = self._acceptance.get(self.version)
        if version not in self._acceptance and previous is not None:
            self._acceptance[version] = previous.scaled(0.5)
        self.version = version
        self.detector.reset()
        self._window = AcceptanceEstimator()

    def _close_window(self) -> None:
        a = self._window.value
        assert a is not None  # closed only once it holds control_window_steps steps
        self._window = AcceptanceEstimator()
        fired = self.detector.update(a)
        self.trigger.update(a, self.version)
        if fired:
            self.trigger.force("changepoint")
        t = self.trigger
        self.metrics.window(self.version, a, self.detector.statistic, self.detector.threshold, fired)
        self.metrics.trigger(self.version, t.train, t.collect, t.short.value or 0.0, t.long.value or 0.0)
