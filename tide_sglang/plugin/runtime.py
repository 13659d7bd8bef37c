"""The plugin's state in one scheduler process, and the sync point where TP ranks agree between batches."""

import logging
import time
from collections.abc import Callable, Sequence

import torch

from tide_sglang.control import SpeculationController
from tide_sglang.plugin.capture import Capturer
from tide_sglang.plugin.metrics import PluginMetrics
from tide_sglang.plugin.speculation import StepClock, StepTable, acceptance_sample, candidate_steps
from tide_sglang.plugin.swap import agreed_version
from tide_sglang.plugin.swapper import Swapper
from tide_sglang.settings import TideSettings

log = logging.getLogger("tide.plugin")

AllReduceMin = Callable[[torch.Tensor], None]
# candidate steps -> controller; None while its profile is being measured (tried again at the next sync point)
ControllerFactory = Callable[[list[int]], SpeculationController | None]


class Runtime:
    """`capturer` only on the publishing rank (attention-TP rank 0 of the last pipeline stage); `swapper` on every
    rank hosting the draft when a registry is configured; `steps` holds a decider when one was installed, or from the
    first sync on when `controller` (a factory: the candidate steps are known only once SGLang's adaptive slots
    exist) builds TIDE's SpeculationController; without a decider it still runs the steps the control state forces
    (read by the swapper's poll, so forcing needs a registry)."""

    def __init__(self, settings: TideSettings, metrics: PluginMetrics, capturer: Capturer | None,
                 swapper: Swapper | None, steps: StepTable | None, all_reduce_min: AllReduceMin,
                 controller: ControllerFactory | None = None) -> None:
        self.settings, self.metrics = settings, metrics
        self.capturer, self.swapper = capturer, swapper
        self.steps = steps if steps is not None else StepTable(None)
        self.clock = StepClock()
        self.all_reduce_min = all_reduce_min
        self.make_controller = controller
        self.controller: SpeculationController | None = None
        self.batches = 0

    def version(self) -> int:
        return self.swapper.current if self.swapper is not None else 0

    def sync(self, slots: dict[int, list[int]] | None) -> None:
        """Called before every batch on every rank of the group; every `sync_interval_batches` batches the ranks
        exchange [version, -version, step proposals...] in one all-reduce MIN and act on the result."""
        self.batches += 1
        at_sync = not self.batches % self.settings.sync_interval_batches
        if self.make_controller is not None and (self.batches == 1 or at_sync):
            self._start_controller(slots)
        if not at_sync or (self.swapper is None and self.steps.decider is None):
            return
        if self.capturer is not None and self.swapper is not None:
            self.capturer.collect = self.capturer.sampling and self.swapper.collect
        local = self.swapper.local_version() if self.swapper is not None else 0
        forced = self.swapper.forced if self.swapper is not None else None
        proposals = self.steps.proposals(slots, forced) if slots else []
        vector = torch.tensor([local, -local, *proposals], dtype=torch.int64)
        self.all_reduce_min(vector)
        if self.swapper is not None:
            agreed = agreed_version(vector[:2])
            if self.swapper.apply_agreed(agreed):
                if self.capturer is not None:
                    self.capturer.version = agreed  # rows captured from now on come from the new draft
                if self.controller is not None:  # the trainer's held-out gain, not the served rise
                    self.controller.credit(agreed, *self.swapper.held_out)
        if proposals:
            table = self.steps.agree(slots, vector[2:].tolist())
            version = self.version()
            for bs, steps in table.items():
                self.metrics.steps.labels(**self.metrics.labels(version), batch_size=str(bs)).set(steps)

    def _start_controller(self, slots: dict[int, list[int]] | None) -> None:
        make = self.make_controller
        assert make is not None
        if not slots:
            self.make_controller = None
            log.warning("TIDE_CONTROL_PROFILE is set, but SGLang runs without adaptive speculation "
                        "(--speculative-adaptive): TIDE's controller is off, the draft steps stay fixed")
            return
        controller = make(candidate_steps(slots))
        if controller is None:
            return  # its profile is still being measured (TIDE_CONTROL_PROFILE_PENDING): again at the next sync
        self.make_controller, self.controller = None, controller
        self.steps = StepTable(self.controller.steps_for_batch)
        log.info("TIDE's speculation controller chooses among %s draft steps", self.controller.policy.candidates)

    def observe(self, correct_drafts: Sequence[int], committed: bytes, draft_steps: int,
                now: float | None = None) -> None:
        """A decode verify whose result SGLang processed, on every rank (each sees the same accept lengths, so
        every rank's controller proposes the same steps): the committed requests' acceptance at `draft_steps`, and
        the batch's time (StepClock) for the controller's online correction and, on the publishing rank, the
        tide_decode_step_seconds histogram."""
        seconds = self.clock.tick(time.monotonic() if now is None else now, self.batches)
        if seconds is not None:
            if self.capturer is not None:
                self.metrics.decode_step(self.version(), len(correct_drafts), draft_steps, seconds)
            if self.controller is not None:
                self.controller.observe_step_time(len(correct_drafts), draft_steps, seconds)
        if self.controller is None:
            return
        accepted, steps = acceptance_sample(correct_drafts, committed)
        self.controller.observe(self.version(), accepted_tokens=accepted, steps=steps, draft_steps=draft_steps)

    def idle(self) -> None:
        """The scheduler has nothing to run: the next decode result does not time one batch."""
        self.clock.reset()

    def close(self) -> None:
        if self.swapper is not None:
            self.swapper.stop()
        if self.capturer is not None:
            self.capturer.close()

