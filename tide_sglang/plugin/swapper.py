"""`Swapper`: the stateful side of hot-swap (swap.py holds the checks). One per scheduler process; its background
thread follows the control state and, on the publishing rank, writes the pod's heartbeat."""

import logging
import threading
import time
from collections.abc import Callable

import torch
from pydantic import BaseModel, ConfigDict

from tide_sglang import rollout
from tide_sglang.draft.registry import DraftRegistry
from tide_sglang.plugin.metrics import PluginMetrics
from tide_sglang.plugin.swap import Baseline, SwapPlan, SwapRefused, apply_swap, desired_version, plan_swap, uncovered
from tide_sglang.stream.connection import Client

log = logging.getLogger("tide.plugin.swap")


class DraftHandle(BaseModel):
    """What the swap touches in the engine, taken from SGLang's draft worker by the hooks."""

    model_config = ConfigDict(arbitrary_types_allowed=True, frozen=True)

    load_weights: Callable[[list[tuple[str, torch.Tensor]]], None]
    param_names: list[str]
    shared: set[str]  # parameters that are the target's tensors
    hot_token_ids: list[torch.Tensor]  # every copy of hot_token_id the draft graphs read
    pin: bool  # stage in pinned memory (CUDA): the copy between batches is then a fast H2D


class Swapper:
    def __init__(self, registry: DraftRegistry, baseline: Baseline, handle: DraftHandle, version: int, *,
                 pod: str, namespace: str, deployment: str, client: Callable[[], Client], metrics: PluginMetrics,
                 stats: rollout.StatsReporter | None, allow_vocab_change: bool = False,
                 trigger: Callable[[], dict[str, float | bool | str]] | None = None) -> None:
        self.registry, self.baseline, self.handle = registry, baseline, handle
        self.current = version
        self.trigger = trigger
        self.role: rollout.Role = "stable"
        self.collect = True  # the control state's `collect`: whether this deployment's engines capture now
        self.forced: int | None = None  # the control state's forced steps for this pod (`tide profile`)
        self.swap_failures = 0
        self.pod, self.namespace, self.deployment, self._client = pod, namespace, deployment, client
        self.metrics, self.stats = metrics, stats
        self.allow_vocab_change = allow_vocab_change
        self.staged: SwapPlan | None = None
        # the manifest's held-out accept lengths of the version copied in place last (not its plan: its weights)
        self.held_out: tuple[float | None, float | None] = (None, None)
        self.failed: dict[int, str] = {}  # refused versions, never retried (a new version gets a new number)
        self.bad_control: set[str] = set()  # malformed control states seen (each counted once)
        self._stop = threading.Event()
        metrics.version.labels(deployment=deployment).set(version)

    # -- stager (background thread) ------------------------------------------------------------------------

    def start(self, poll_s: float, heartbeat_s: float | None = None) -> threading.Thread:
        """Read the control state every `poll_s`; write the heartbeat every `heartbeat_s` (None: not this rank)."""
        thread = threading.Thread(target=self._run, args=(poll_s, heartbeat_s), name="tide-swap-stager", daemon=True)
        thread.start()
        return thread

    def stop(self) -> None:
        self._stop.set()

    def _run(self, poll_s: float, heartbeat_s: float | None) -> None:
        next_poll = next_beat = 0.0
        while not self._stop.is_set():
            now = time.monotonic()
            try:
                if now >= next_poll:
                    next_poll = now + poll_s
                    self.follow()
                if heartbeat_s is not None and now >= next_beat:
                    next_beat = now + heartbeat_s
                    self.heartbeat()
            except Exception as e:  # the stager never dies: whatever escaped is a failure the heartbeat shows
                self.swap_failures += 1
                log.exception("swap stager failed, keeping v%d: %s", self.current, e)
            self._stop.wait(min(poll_s, heartbeat_s or poll_s))

    def follow(self) -> None:
        """Stage the version the control state names for this pod."""
        try:
            ctl = rollout.read_control(self._client(), self.namespace, self.deployment)
        except rollout.RolloutError as e:  # a malformed hash: counted once per value, keep serving
            if str(e) not in self.bad_control:
                self.bad_control.add(str(e))
                self.swap_failures += 1
            log.warning("cannot read the control state: %s", e)
            return
        except Exception as e:  # Redis down: keep serving the loaded version, try again next poll
            log.warning("cannot read the control state: %s", e)
            return
        if ctl is not None:
            self.role, self.collect = ctl.role_of(self.pod), ctl.collect
        self.forced = None if ctl is None else ctl.forced_steps(self.pod)
        wanted = desired_version(ctl, self.pod)
        if wanted is not None:
            self.stage(wanted)

    def heartbeat(self) -> rollout.Heartbeat | None:
        """Report the version this pod serves (copied in place, not just staged); None when Redis failed."""
        beat = rollout.Heartbeat(pod=self.pod, role=self.role, version=self.current, swap_failures=self.swap_failures,
                                 trigger=self.trigger() if self.trigger else {}, time=time.time())
        try:
            rollout.write_heartbeat(self._client(), self.namespace, self.deployment, beat)
        except Exception as e:  # never into the engine: the operator sees a missing heartbeat instead
            log.warning("cannot write the heartbeat: %s", e)
            return None
        return beat

    def stage(self, version: int) -> SwapPlan | None:
        """Verify, load and check `version` (idempotent); on any failure keep the old weights and report."""
        if version == self.current or version in self.failed:
            return None
        if self.staged is not None and self.staged.version == version:
            return self.staged
        try:
            verified, tensors = self.registry.load_tensors(version)
            plan = plan_swap(version, tensors, self.baseline, allow_vocab_change=self.allow_vocab_change)
            m = verified.manifest.metrics
            plan = plan.model_copy(update={"held_out": (m.accept_length, m.parent_accept_length)})
            if missing := uncovered(self.handle.param_names, tensors, self.handle.shared):
                raise SwapRefused(f"draft v{version} leaves draft parameters without weights: {missing}")
            if self.handle.pin:
                plan = plan.model_copy(update={"weights": {n: t.pin_memory() for n, t in plan.weights.items()}})
        except Exception as e:  # an untrusted version: any failure (parse, I/O, format, shape) refuses it
            self._refuse(version, e)
            return None
        self.staged = plan
        log.info("draft v%d staged (%s): waiting for every rank at the next sync point", version, verified.path)
        return plan

    def _refuse(self, version: int, error: Exception) -> None:
        self.failed[version] = f"{type(error).__name__}: {error}"
        self.swap_failures += 1
        log.error("draft v%d refused, keeping v%d: %s", version, self.current, error)
        self.metrics.swap_failures.labels(**self.metrics.labels(version)).inc()
        if self.stats is not None:  # only the publishing rank reports, so TP ranks do not multiply counts
            self.stats.add(version, swap_failures=1)

    # -- sync point (scheduler thread, between batches) ----------------------------------------------------

    def local_version(self) -> int:
        staged = self.staged
        return staged.version if staged is not None else self.current

    def apply_agreed(self, agreed: int | None) -> bool:
        """Copy the staged version when every rank agreed on it. A copy that fails after agreement cannot be
        undone on one rank alone (ranks would serve different drafts), so it raises."""
        staged = self.staged
        if agreed is None or staged is None or agreed != staged.version or agreed == self.current:
            return False
        start = time.perf_counter()
        apply_swap(staged, self.handle.load_weights, self.handle.hot_token_ids)
        seconds = time.perf_counter() - start
        log.info("draft v%d -> v%d copied in place in %.1f ms", self.current, agreed, seconds * 1e3)
        self.current, self.staged, self.held_out = agreed, None, staged.held_out
        labels = self.metrics.labels(agreed)
        self.metrics.swaps.labels(**labels).inc()
        self.metrics.swap_seconds.labels(**labels).observe(seconds)
        self.metrics.version.labels(deployment=self.deployment).set(agreed)
        return True
