"""Hot swap for the reference engine: follow the control state for this pod, load verified versions between
steps, and report what it serves in a heartbeat.

A version that fails to load for any reason (`DraftRegistry.verify()`: checksum, symlink, config, shapes,
vocabulary; or anything else the load raises) is refused once, counted in its `swap_failures` stat (the operator
rolls a canary back on it) and in the heartbeat, and never retried; the engine keeps serving with the weights it
has. A malformed control state is counted in the heartbeat once per value. Version 0, the imported draft, is a
version like any other.
"""

import logging
import threading
import time
from collections.abc import Callable

import torch
from pydantic import BaseModel, ConfigDict

from tide_sglang import rollout
from tide_sglang.draft import DraftRegistry, Eagle3Draft
from tide_sglang.plugin.metrics import PluginMetrics
from tide_sglang.stream.connection import Client

log = logging.getLogger("tide.engine.swap")


class SwapTo(BaseModel):
    model_config = ConfigDict(arbitrary_types_allowed=True, frozen=True)

    version: int
    draft: Eagle3Draft


class DraftFollower:
    """`version`: the draft the engine starts with (None: none yet, a cold start). `trigger`: the training
    trigger's report for the heartbeat. `metrics`: swaps in the plugin's tide_draft_* series (`tide engine`).
    `on_swap`: told each version loaded, with its manifest's held-out accept lengths, its own and its parent's
    (`SpeculationController.credit`)."""

    def __init__(self, client: Client, registry: DraftRegistry, namespace: str, deployment: str, pod: str,
                 embed: torch.Tensor, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 reporter: rollout.StatsReporter | None = None, poll_s: float = 0.5, version: int | None = None,
                 trigger: Callable[[], dict[str, float | bool | str]] | None = None,
                 metrics: PluginMetrics | None = None,
                 on_swap: Callable[[int, float | None, float | None], None] | None = None) -> None:
        self.client, self.registry, self.pod = client, registry, pod
        self.namespace, self.deployment = namespace, deployment
        self.embed, self.device, self.dtype, self.reporter, self.poll_s = embed, device, dtype, reporter, poll_s
        self.version, self.trigger, self.metrics, self.on_swap = version, trigger, metrics, on_swap
        if metrics is not None and version is not None:
            metrics.version.labels(deployment=deployment).set(version)
        self.role: rollout.Role = "stable"
        self.collect = True  # the control state's `collect`: capture hidden states
        self.forced: int | None = None  # the control state's forced steps for this pod (`tide profile`)
        self.refused: dict[int, str] = {}  # version -> why
        self.bad_control: set[str] = set()  # malformed control states seen (each counted once)
        self.swap_failures = 0
        self._next = 0.0
        self._stop = threading.Event()

    def poll(self) -> SwapTo | None:
        """The newly named draft, when the control state names one we have not loaded or refused; else None."""
        if time.monotonic() < self._next:
            return None
        self._next = time.monotonic() + self.poll_s
        try:
            ctl = rollout.read_control(self.client, self.namespace, self.deployment)
        except rollout.RolloutError as e:  # a malformed hash: counted once per value, keep serving
            if str(e) not in self.bad_control:
                self.bad_control.add(str(e))
                self.swap_failures += 1
            log.warning("malformed control state, keeping draft v%s: %s", self.version, e)
            return None
        except rollout.UNAVAILABLE as e:
            log.warning("cannot read the control state, keeping draft v%s: %s", self.version, e)
            return None
        self.forced = None if ctl is None else ctl.forced_steps(self.pod)
        if ctl is None:
            return None  # no operator yet: keep what we serve
        self.role, self.collect = ctl.role_of(self.pod), ctl.collect
        wanted = ctl.version_for(self.pod)
        if wanted == self.version or wanted in self.refused:
            return None
        return self._load(wanted)

    def _load(self, version: int) -> SwapTo | None:
        t0 = time.perf_counter()
        try:
            draft = self.registry.load(version, self.embed, device=str(self.device)).to(self.dtype).eval()
            manifest = self.registry.get(version)
        except Exception as e:  # an untrusted version: any failure (parse, I/O, format, shape) refuses it
            self.refused[version] = str(e)
            self.swap_failures += 1
            if self.metrics is not None:
                self.metrics.swap_failures.labels(**self.metrics.labels(version)).inc()
            log.error("refusing draft v%d, keeping v%s: %s", version, self.version, e)
            if self.reporter is not None:
                self.reporter.add(version, swap_failures=1)
                self.reporter.flush()
            return None
        seconds = time.perf_counter() - t0  # the serving loop waits for the load: the swap's pause
        log.info("swapped to draft v%d in %.3f s", version, seconds)
        self.version = version
        if self.on_swap is not None:
            self.on_swap(version, manifest.metrics.accept_length, manifest.metrics.parent_accept_length)
        if self.metrics is not None:
            labels = self.metrics.labels(version)
            self.metrics.swaps.labels(**labels).inc()
            self.metrics.swap_seconds.labels(**labels).observe(seconds)
            self.metrics.version.labels(deployment=self.deployment).set(version)
        return SwapTo(version=version, draft=draft)

    # -- heartbeats ---------------------------------------------------------------------------------------

    def heartbeat(self) -> rollout.Heartbeat | None:
        """Write what this pod serves; None (nothing written) before it serves any version or when Redis fails."""
        if self.version is None:
            return None
        beat = rollout.Heartbeat(pod=self.pod, role=self.role, version=self.version, swap_failures=self.swap_failures,
                                 trigger=self.trigger() if self.trigger else {}, time=time.time())
        try:
            rollout.write_heartbeat(self.client, self.namespace, self.deployment, beat)
        except rollout.UNAVAILABLE as e:
            log.warning("cannot write the heartbeat: %s", e)
            return None
        return beat

    def start_heartbeats(self, every_s: float) -> threading.Thread:
        """A heartbeat every `every_s` from a background thread, so an idle engine still reports."""
        def loop() -> None:
            while not self._stop.is_set():
                self.heartbeat()
                self._stop.wait(every_s)

        thread = threading.Thread(target=loop, name="tide-heartbeat", daemon=True)
        thread.start()
        return thread

    def close(self) -> None:
        self._stop.set()
