"""Gate and publish: score the candidate and the served draft on the same held-out rows; a candidate that wins
by the margin becomes the next registry version and a `Published` event for the operator."""

import logging

import torch
from pydantic import BaseModel

from tide_sglang import rollout
from tide_sglang.draft import DraftMetrics, DraftRegistry, Eagle3Draft
from tide_sglang.settings import TideSettings
from tide_sglang.stream.connection import Client
from tide_sglang.trainer.gate import GateDecision, publish_decision
from tide_sglang.trainer.objective import Acceptance, acceptance
from tide_sglang.trainer.replay import Chunk

log = logging.getLogger("tide.trainer")


class EvalReport(BaseModel):
    candidate: Acceptance
    deployed: Acceptance
    deployed_version: int | None
    decision: GateDecision
    published: int | None = None


class Publisher:
    def __init__(self, settings: TideSettings, registry: DraftRegistry, client: Client, embed: torch.Tensor,
                 device: torch.device) -> None:
        self.s, self.registry, self.client, self.embed, self.device = settings, registry, client, embed, device
        self._deployed: tuple[int, Eagle3Draft] | None = None
        self.unannounced: list[rollout.Published] = []  # stored versions whose event Redis has not taken yet

    def deployed(self, version: int) -> Eagle3Draft:
        """The served draft of `version`, loaded once."""
        if self._deployed is None or self._deployed[0] != version:
            draft = self.registry.load(version, self.embed, str(self.device)).float().eval()
            self._deployed = (version, draft)
        return self._deployed[1]

    def forget_deployed(self) -> None:
        self._deployed = None

    def evaluate(self, candidate: Eagle3Draft, deployed: Eagle3Draft, version: int | None,
                 heldout: list[Chunk]) -> EvalReport:
        steps = self.s.train_ttt_steps
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            cand = acceptance(candidate.eval(), heldout, steps, device=self.device)
            base = acceptance(deployed, heldout, steps, device=self.device)
        candidate.train()
        decision = publish_decision(cand, base, self.s.train_publish_margin, self.s.train_min_heldout_rows)
        return EvalReport(candidate=cand, deployed=base, deployed_version=version, decision=decision)

    def publish(self, draft: Eagle3Draft, parent: int | None, metrics: DraftMetrics) -> int:
        """Store the next version, then tell the operator (the registry first: an event names a stored version)."""
        manifest = self.registry.publish(draft, parent=parent, metrics=metrics)
        numbers = {k: float(v) for k, v in metrics.model_dump(exclude={"domains"}).items() if v is not None}
        self.unannounced.append(rollout.Published(version=manifest.version, parent=manifest.parent, metrics=numbers))
        log.info("published draft v%d (parent %s)", manifest.version, manifest.parent)
        self.announce()
        return manifest.version

    def announce(self) -> None:
        """Append the events not yet in Redis, oldest first; Redis down: keep them for the next call (the trainer
        calls this every loop), so a dropped connection neither stops the trainer nor loses a version."""
        while self.unannounced:
            try:
                rollout.append_event(self.client, self.s.namespace, self.s.deployment, self.unannounced[0])
            except rollout.UNAVAILABLE as e:
                log.warning("cannot announce draft v%d yet: %s", self.unannounced[0].version, e)
                return
            self.unannounced.pop(0)
