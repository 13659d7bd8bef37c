"""Hot swap for the reference engine: follow the control hash, load verified versions between steps.

A version that fails `DraftRegistry.verify()` (checksum, shapes, vocabulary) is refused once, counted in its
`swap_failures` stat (the operator rolls a canary back on it) and never retried; the engine keeps serving with
the weights it has. Version 0 is the draft the engine started with (none on a cold start): the operator's
rollback to the initial draft.
"""

import logging
import time

import redis
import torch
from pydantic import BaseModel, ConfigDict

from tide_sglang.draft import DraftRegistry, DraftVerificationError, Eagle3Draft
from tide_sglang.rollout import RolloutError, StatsReporter, read_control
from tide_sglang.stream.connection import Client

log = logging.getLogger("tide.engine.swap")


class SwapTo(BaseModel):
    model_config = ConfigDict(arbitrary_types_allowed=True, frozen=True)

    version: int
    draft: Eagle3Draft | None  # None: speculate no more (version 0 of a cold start)


class DraftFollower:
    def __init__(self, client: Client, registry: DraftRegistry, namespace: str, deployment: str, pod: str,
                 embed: torch.Tensor,
                 *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 reporter: StatsReporter | None = None, poll_s: float = 0.5,
                 initial: Eagle3Draft | None = None) -> None:
        self.client, self.registry, self.pod = client, registry, pod
        self.namespace, self.deployment = namespace, deployment
        self.embed, self.device, self.dtype, self.reporter, self.poll_s = embed, device, dtype, reporter, poll_s
        self.initial = initial
        self.version = 0
        self.refused: dict[int, str] = {}  # version -> why
        self._next = 0.0

    def poll(self) -> SwapTo | None:
        """The newly named draft, when the control hash names one we have not loaded or refused; else None."""
        if time.monotonic() < self._next:
            return None
        self._next = time.monotonic() + self.poll_s
        try:
            ctl = read_control(self.client, self.namespace, self.deployment)
        except (redis.RedisError, RolloutError) as e:
            log.warning("cannot read the control key, keeping draft v%s: %s", self.version, e)
            return None
        wanted = None if ctl is None else ctl.version_for(self.pod)
        if wanted is None or wanted == self.version or wanted in self.refused:
            return None
        if wanted == 0:
            log.info("back to the initial draft (v0)")
            self.version = 0
            return SwapTo(version=0, draft=self.initial)
        return self._load(wanted)

    def _load(self, version: int) -> SwapTo | None:
        t0 = time.perf_counter()
        try:
            draft = self.registry.load(version, self.embed, device=str(self.device)).to(self.dtype).eval()
        except (DraftVerificationError, OSError, ValueError, KeyError, RuntimeError) as e:
            self.refused[version] = str(e)
            log.error("refusing draft v%d, keeping v%s: %s", version, self.version, e)
            if self.reporter is not None:
                self.reporter.add(version, swap_failures=1)
                self.reporter.flush()
            return None
        log.info("swapped to draft v%d in %.3f s", version, time.perf_counter() - t0)
        self.version = version
        return SwapTo(version=version, draft=draft)
