"""`tide engine`: the reference engine as one inference pod of a TideDeployment, on the CPU.

It does what an SGLang pod with the TIDE plugin does, through the same protocol (docs/rollout.md): serves a
workload schedule round after round, captures hidden states to the stream while the control state's `collect`
is on, adds per-version stats, loads the version the control state names for its pod (`TIDE_POD_NAME`), and
writes a heartbeat every `TIDE_HEARTBEAT_S`. With `TIDE_CONTROL_PROFILE` TIDE's controller picks the draft steps
and votes in the heartbeat, as in the plugin; with `TIDE_ENGINE_METRICS_PORT` it serves the plugin's tide_* series
and the controller's on /metrics. Tests run several of them as stand-ins for pods.
"""

import logging
import signal
from collections.abc import Callable

from prometheus_client import CollectorRegistry, start_http_server
from pydantic import BaseModel, Field

from tide_sglang import keys, rollout
from tide_sglang.capture import DEFAULT_DOMAIN
from tide_sglang.control import Profile, SpeculationController
from tide_sglang.draft import open_registry
from tide_sglang.draft.target import heads_of, load_target
from tide_sglang.engine.engine import FixedSteps, SpecEngine, StepController
from tide_sglang.engine.http import GenerateServer
from tide_sglang.engine.serve import ServeOptions, Serving, StepRecord, Wave, chat_ids, serve
from tide_sglang.engine.swap import DraftFollower
from tide_sglang.plugin.metrics import WRITER_DROPS, PluginMetrics
from tide_sglang.settings import TideSettings
from tide_sglang.stream import StreamWriter, connect
from tide_sglang.workloads import parse_schedule, plan_schedule

log = logging.getLogger("tide.engine.pod")
DROP_REASONS = ("writer_full", *WRITER_DROPS)  # the drops an engine without a scheduler thread can make


class PodOptions(BaseModel):
    registry: str = Field(description="the draft registry: a directory (the pods' read-only volume) or s3:// URL")
    target: str = Field(description="target checkpoint directory, or smollm2-135m")
    schedule: str = Field(description="workload:requests,... served each round")
    version: int | None = Field(None, ge=0, description="draft the pod starts with (SGLang: the draft model path)")
    steps: int = Field(3, ge=1, description="draft steps per verify (without TIDE_CONTROL_PROFILE)")
    batch_size: int = Field(2, ge=1)
    max_new_tokens: int = Field(32, ge=1)
    rounds: int | None = Field(None, ge=1, description="rounds of the schedule; None: until SIGTERM")
    seed: int = 0
    repeat: bool = Field(False, description="serve the same prompts every round (else each round draws anew)")
    http_port: int | None = Field(None, ge=0, le=65535, description="serve SGLang's /generate on this port instead "
                                  "of the schedule (0: any free port)")

    def round_seed(self, round_: int) -> int:
        return self.seed if self.repeat else self.seed + round_


def _interrupt(*_: object) -> None:
    raise KeyboardInterrupt  # SIGTERM stops between steps, like Ctrl-C


def export_step(metrics: PluginMetrics, writer: StreamWriter, record: StepRecord) -> None:
    """The engine's share of the plugin's tide_* series, after every verify step."""
    v = record.draft_version
    metrics.serving(v, DROP_REASONS)
    metrics.steps.labels(**metrics.labels(v), batch_size=str(record.batch_size)).set(record.draft_steps)
    metrics.decode_step(v, record.batch_size, record.draft_steps, record.seconds)
    if record.draft_steps:
        metrics.verified(v, **record.counts())
    metrics.writer_dropped(v, writer.stats)


def _controller(options: PodOptions, settings: TideSettings, registry: CollectorRegistry) -> StepController:
    if settings.control_profile is None:
        return FixedSteps(options.steps)
    return SpeculationController(Profile.load(settings.control_profile), settings, version=options.version or 0,
                                 registry=registry)


def run_pod(options: PodOptions, settings: TideSettings) -> int:
    """Serve until `rounds` are done or SIGTERM; returns the verify steps served."""
    previous = signal.signal(signal.SIGTERM, _interrupt)
    target = load_target(options.target)
    heads = heads_of(target.model)
    dtype = next(target.model.parameters()).dtype
    registry = open_registry(options.registry)
    client = connect(settings)
    writer = StreamWriter.from_settings(settings, keys.hidden_states(settings.namespace, settings.deployment))
    reporter = rollout.StatsReporter(client, settings.namespace, settings.deployment, interval_s=settings.stats_flush_s)
    prometheus = CollectorRegistry()
    metrics = PluginMetrics(settings.deployment, registry=prometheus)
    controller = _controller(options, settings, prometheus)
    trigger, on_swap = ((controller.trigger.report, controller.credit) if isinstance(controller, SpeculationController)
                        else (None, None))
    follower = DraftFollower(client, registry, settings.namespace, settings.deployment, settings.pod_name, heads.embed,
                             dtype=dtype, reporter=reporter, poll_s=settings.swap_poll_s, version=options.version,
                             trigger=trigger, metrics=metrics, on_swap=on_swap)
    draft = None if options.version is None else registry.load(options.version, heads.embed).to(dtype).eval()
    engine = SpecEngine(target, draft=draft, draft_version=options.version or 0, controller=controller, writer=writer,
                        metrics=metrics)
    if settings.engine_metrics_port:
        start_http_server(settings.engine_metrics_port, registry=prometheus)
    follower.start_heartbeats(settings.heartbeat_s)
    log.info("pod %s serving (draft v%s)", settings.pod_name, options.version)
    steps, round_ = 0, 0
    http = GenerateServer(options.http_port) if options.http_port is not None else None
    try:
        if http is not None:
            log.info("pod %s serving /generate on port %d", settings.pod_name, http.port)
            steps = _serve_http(http, engine, options, follower, reporter, lambda r: export_step(metrics, writer, r))
        while http is None and (options.rounds is None or round_ < options.rounds):
            plans = plan_schedule(parse_schedule(options.schedule), seed=options.round_seed(round_))
            steps += len(serve(engine, plans, ServeOptions(batch_size=options.batch_size,
                                                            max_new_tokens=options.max_new_tokens),
                               follower=follower, reporter=reporter,
                               on_record=lambda r: export_step(metrics, writer, r)))
            round_ += 1
    except KeyboardInterrupt:
        log.info("pod %s stopping after %d steps", settings.pod_name, steps)
    finally:
        signal.signal(signal.SIGTERM, previous)
        if http is not None:
            http.close()
        follower.close()
        reporter.flush()
        writer.close()
    return steps


def _serve_http(http: GenerateServer, engine: SpecEngine, options: PodOptions, follower: DraftFollower,
                reporter: rollout.StatsReporter, on_record: Callable[[StepRecord], None]) -> int:
    """Waves of up to `batch_size` HTTP requests, each at the smallest of its max_new_tokens and the pod's, until
    SIGTERM (a wave in progress finishes first)."""
    serving = Serving(engine, ServeOptions(batch_size=options.batch_size, max_new_tokens=options.max_new_tokens),
                      follower=follower, reporter=reporter, on_record=on_record)
    tokenizer = engine.target.tokenizer
    index = 0
    while True:
        pending = http.next_wave(options.batch_size, timeout_s=0.5)
        if not pending:
            serving.sync()  # idle: still follow the control state
            continue
        max_new = min(options.max_new_tokens, max(p.max_new_tokens for p in pending))
        serving.options = serving.options.model_copy(update={"max_new_tokens": max_new})
        ids = [chat_ids(tokenizer, p.text, serving.options.max_prompt_tokens) for p in pending]
        outs = serving.serve(Wave(phase="http", domain=DEFAULT_DOMAIN, index=index, ids=ids))
        for p, out in zip(pending, outs, strict=True):
            p.completion, p.output = out, tokenizer.decode(out, skip_special_tokens=True)
            p.done.set()
        index += 1
