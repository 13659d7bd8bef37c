"""The plugin's state in one scheduler process, and the sync point where TP ranks agree between batches."""

import logging
from collections.abc import Callable

import torch

from tide_sglang.plugin.capture import Capturer
from tide_sglang.plugin.metrics import PluginMetrics
from tide_sglang.plugin.speculation import StepTable
from tide_sglang.plugin.swap import agreed_version
from tide_sglang.plugin.swapper import Swapper
from tide_sglang.settings import TideSettings

log = logging.getLogger("tide.plugin")

AllReduceMin = Callable[[torch.Tensor], None]


class Runtime:
    """`capturer` only on the publishing rank (attention-TP rank 0 of the last pipeline stage); `swapper` on every
    rank hosting the draft when a registry is configured; `steps` when a decider was installed."""

    def __init__(self, settings: TideSettings, metrics: PluginMetrics, capturer: Capturer | None,
                 swapper: Swapper | None, steps: StepTable | None, all_reduce_min: AllReduceMin) -> None:
        self.settings, self.metrics = settings, metrics
        self.capturer, self.swapper, self.steps = capturer, swapper, steps
        self.all_reduce_min = all_reduce_min
        self.batches = 0

    def sync(self, slots: dict[int, list[int]] | None) -> None:
        """Called before every batch on every rank of the group; every `sync_interval_batches` batches the ranks
        exchange [version, -version, step proposals...] in one all-reduce MIN and act on the result."""
        self.batches += 1
        if self.batches % self.settings.sync_interval_batches or (self.swapper is None and self.steps is None):
            return
        local = self.swapper.local_version() if self.swapper is not None else 0
        proposals = self.steps.proposals(slots) if self.steps is not None and slots else []
        vector = torch.tensor([local, -local, *proposals], dtype=torch.int64)
        self.all_reduce_min(vector)
        if self.swapper is not None:
            agreed = agreed_version(vector[:2])
            if self.swapper.apply_agreed(agreed) and self.capturer is not None:
                self.capturer.version = agreed  # rows captured from now on come from the new draft
        if proposals:
            table = self.steps.agree(slots, vector[2:].tolist())
            version = self.swapper.current if self.swapper is not None else 0
            for bs, steps in table.items():
                self.metrics.steps.labels(**self.metrics.labels(version), batch_size=str(bs)).set(steps)

    def close(self) -> None:
        if self.swapper is not None:
            self.swapper.stop()
        if self.capturer is not None:
            self.capturer.close()
            self.capturer.writer.close()

