"""`tide bench train-gate`: one recurring drift served twice, with the training gate `always` and `trigger`.

Fixed schedule: writing (long, stable) -> code (the shift) -> code (long, stable) -> writing again (recurring).
Each arm starts from the same draft (trained offline on "train" writing prompts, as `tide bench adapt`'s static
one) and runs, on its own private redis-server:

    engine   : the reference engine, capturing to the stream while the control state's `collect` is on, running
               TIDE's controller for its training trigger and reporting the trigger in its heartbeat
    operator : the operator's own pure functions (tide_operator.gate: votes -> decide -> control state and the
               trainer's replicas); every published version is promoted, as engine/online.Promoter does
    trainer  : the real DraftTrainer; scaled to zero it checkpoints and stops, scaled up again it resumes from
               that checkpoint, as the trainer pod does

in lockstep, one tick per wave: the engine serves a wave of "train" prompts, beats, the operator decides (the engine
follows that control state from the next wave's prefill on), the trainer (when up) reads the stream and takes
`train_steps` optimizer steps if the control state's `train` allows, and the operator promotes what it published
(its event watcher does within seconds: the version is served from the next wave). The gate's clock is the serving
clock (the engine's step seconds): the trainer's steps run beside serving, as on its own node, and do not advance it.
Trainer-active is the share of the schedule during which the control state told the (scaled-up) trainer to train,
the time it holds a training GPU busy, counted in the tokens served in those ticks: at a steady request rate time
is proportional to tokens served, and both arms serve the same tokens (greedy, same prompts), whereas their seconds
also count the machine's load and how fast each arm's draft made serving (the seconds are reported too). Captured
bytes are what the engine's writer sent. Speculation stays at `STEPS` draft steps so that every verify feeds the
trigger (at these acceptance levels TIDE's policy would switch it off on the CPU; `tide bench control` measures the
policy). At the end of each phase the draft the engine then serves runs "eval" prompts of the phase's domain, at
`STEPS` steps with no capture: prompts never served, captured or trained on.
"""

import datetime
import shutil
import tempfile
import time
from pathlib import Path

import torch
from pydantic import BaseModel
from rich.console import Console
from rich.table import Table
from tide_operator import gate
from tide_operator.models import TrainingSpec, TrainingStatus, TriggerSpec
from tide_operator.rollout import Routing

from tide_sglang import keys
from tide_sglang.bench import BenchReport, goal
from tide_sglang.bench.adapt import Size as StaticSize
from tide_sglang.bench.adapt import static_plans, train_offline_draft
from tide_sglang.control import SpeculationController
from tide_sglang.draft import DirectoryRegistry
from tide_sglang.draft.target import Target, TargetHeads, heads_of, load_target
from tide_sglang.engine import FixedSteps, SpecEngine
from tide_sglang.engine.online import CPU_TRAINER_ENV, cpu_trainer_settings, online_engine
from tide_sglang.engine.serve import ServeOptions, Serving, phase_summaries, serve, waves
from tide_sglang.rollout import ControlState, Published, read_event_page, read_heartbeats, write_control
from tide_sglang.settings import TideSettings
from tide_sglang.stream import StreamReader, connect
from tide_sglang.stream.server import LocalRedis
from tide_sglang.trainer import DraftTrainer
from tide_sglang.workloads import PhasePlan, parse_schedule, plan_schedule

GATES = ("always", "trigger")
WORKLOADS = ("writing", "code", "code", "writing")
ROLES = ("stable", "shift", "stable", "recurring")
STEPS = 3  # draft steps while serving and at each phase-end evaluation
DEPLOYMENT, POD = "bench", "engine-0"
SERVED_SEED, EVAL_SEED = 0, 7
# Entries stay pending until a checkpoint acks them, and a reader claims any entry pending for claim_idle_ms (30 s,
# its own included): checkpoint well within that, or the trainer re-reads its own entries and dead-letters them.
CHECKPOINT_S = 10.0


class Size(BaseModel):
    requests: list[int]  # per phase of WORKLOADS
    batch: int
    max_new_tokens: int
    eval_requests: int  # "eval" prompts of the phase's domain, at each phase end
    train_steps: int  # optimizer steps per tick while the trainer trains
    offline_requests: int  # the starting draft: "train" writing prompts captured and trained on offline
    offline_steps: int
    window_steps: int  # request verify steps per trigger window (TIDE_CONTROL_WINDOW_STEPS)
    hold_for: str
    idle_after: str
    min_up: str

    def schedule(self) -> str:
        return ",".join(f"{w}:{n}" for w, n in zip(WORKLOADS, self.requests, strict=True))

    def static(self) -> StaticSize:
        """The starting draft, sized as `tide bench adapt`'s static one (which reads the first workload)."""
        return StaticSize(workloads=["writing"], requests=self.requests[0], batches=[self.batch],
                          max_new_tokens=self.max_new_tokens, offline_requests=self.offline_requests,
                          offline_steps=self.offline_steps)


SIZES = {
    # quick: a starting draft that knows writing (so that code is a real drop), and phases of enough windows for the
    # trigger to warm up, find its plateau on writing and fire on code; nothing is published that soon
    "quick": Size(requests=[8, 4, 4, 4], batch=2, max_new_tokens=12, eval_requests=2, train_steps=4,
                  offline_requests=16, offline_steps=100, window_steps=4, hold_for="2s", idle_after="4s", min_up="4s"),
    # full: the starting draft trained to convergence on writing (800 offline steps; with 300 a run's `always` trainer
    # still published writing versions 0.4 accept length better, so "stable" writing was not stable for that draft)
    "full": Size(requests=[40, 8, 48, 16], batch=4, max_new_tokens=24, eval_requests=12, train_steps=48,
                 offline_requests=48, offline_steps=800, window_steps=16, hold_for="2s", idle_after="10s",
                 min_up="10s"),
}
# The trigger's thresholds (the CRD's training.trigger) and its window counts (engine settings), sized so that a
# phase of the runs above holds tens of windows; the operator's defaults assume minutes of GPU traffic per phase.
TRIGGER = TriggerSpec(short_alpha=0.3, long_alpha=0.1, epsilon=0.02)
WINDOWS = {"trigger_n_init": 3, "trigger_n_threshold": 3, "changepoint_warmup": 5, "changepoint_min_drop": 0.05}


class SteadySteps(FixedSteps):
    """Speculate at a fixed step count and feed every verify to TIDE's controller, whose trigger the heartbeat
    reports."""

    def __init__(self, steps: int, controller: SpeculationController) -> None:
        super().__init__(steps)
        self.controller = controller

    def observe(self, version: int, accepted_tokens: float, steps: float, draft_steps: int | None = None) -> None:
        self.controller.observe(version, accepted_tokens, steps, self.steps if draft_steps is None else draft_steps)


class GateOperator:
    """The operator's part for one deployment, through its own functions: promote every published version, decide
    the training gate from the live heartbeats at the serving clock, write the control state."""

    def __init__(self, settings: TideSettings, spec: TrainingSpec, stable: int) -> None:
        self.settings, self.spec, self.stable = settings, spec, stable
        self.client = connect(settings)
        self.start = datetime.datetime.now(datetime.UTC)
        self.status: TrainingStatus | None = None
        self.seen = gate.Votes()
        self.control = ControlState(stable=stable)
        self.cursor = "0-0"
        self.published: list[Published] = []

    def reconcile(self, clock_s: float) -> TrainingStatus:
        s = self.settings
        self._read_events()
        beats = read_heartbeats(self.client, s.namespace, s.deployment, now=time.time(), heartbeat_s=s.heartbeat_s)
        self.seen = gate.votes(beats)
        self.status = gate.decide(self.spec, self.status, self.seen, self.start + datetime.timedelta(seconds=clock_s))
        self._write()
        return self.status

    def promote(self) -> None:
        """Promote what the trainer published since the last pass, the gate unchanged: the operator's event watcher
        does within seconds, where waiting for the next tick's pass would serve a version a whole wave late."""
        if self._read_events() and self.status is not None:
            self._write()

    def _read_events(self) -> int:
        s = self.settings
        events, self.cursor = read_event_page(self.client, s.namespace, s.deployment, self.cursor)
        for _, event in events:
            self.published.append(event)
            self.stable = event.version
        return len(events)

    def _write(self) -> None:
        assert self.status is not None
        self.control = gate.control_state(Routing(stable=self.stable), self.status, self.seen)
        write_control(self.client, self.settings.namespace, self.settings.deployment, self.control)


class TrainerPod:
    """The trainer Deployment at the gate's replica count: a DraftTrainer in this process, stepped per tick."""

    def __init__(self, settings: TideSettings, registry: Path, heads: TargetHeads) -> None:
        self.settings, self.registry, self.heads = settings, registry, heads
        self.trainer: DraftTrainer | None = None
        self.starts = self.scale_downs = 0
        self._next_checkpoint = 0.0

    def tick(self, replicas: int, steps: int) -> int:
        """Follow the replica count, read the stream, and train up to `steps` steps if the gate allows; returns
        the steps taken."""
        if replicas == 0:
            if self.trainer is not None:  # SIGTERM: the trainer checkpoints (and acks) before it exits
                self.trainer.checkpoint()
                self.trainer, self.scale_downs = None, self.scale_downs + 1
            return 0
        if self.trainer is None:
            self.trainer, self.starts = self._start(), self.starts + 1
            self._next_checkpoint = time.monotonic() + self.settings.train_checkpoint_interval_s
        trainer = self.trainer
        while trainer.poll():
            pass
        trainer.publisher.announce()
        if trainer.learner is not None:
            trainer.follow_rollbacks()
        taken = 0
        if trainer.ready:
            taken = trainer.train_slice(lambda n: n < steps)
        else:
            trainer.park()
        if time.monotonic() >= self._next_checkpoint:  # as the service loop: a checkpoint acks what it holds
            trainer.checkpoint()
            self._next_checkpoint = time.monotonic() + self.settings.train_checkpoint_interval_s
        return taken

    def _start(self) -> DraftTrainer:
        s = self.settings
        reader = StreamReader(connect(s), keys.hidden_states(s.namespace, s.deployment),
                              keys.dead_letter(s.namespace, s.deployment), s.train_consumer, count=64, block_ms=10)
        return DraftTrainer(s, DirectoryRegistry(self.registry), reader, self.heads)

    @property
    def resumed(self) -> int:
        """Starts that resumed from a checkpoint (every one after the first)."""
        return max(self.starts - 1, 0)


class Tick(BaseModel):
    phase: str
    t: float  # serving clock at the end of the wave, seconds
    seconds: float  # the wave's serving seconds
    tokens: int  # emitted in the wave: the same in both arms (greedy decoding of the same prompts)
    accept_length: float  # of the wave's verify steps
    request_steps: int
    version: int  # draft served at the wave's end
    trigger: str  # the engine's trigger state after the wave
    trigger_reason: str
    trigger_gap: float  # short - long, version jumps taken out
    trigger_epsilon: float  # the gap that counts, from the windows' spread
    trigger_gain: float  # recent versions' jumps, decaying
    gate: str  # TrainerState after the operator's pass
    reason: str
    train: bool
    collect: bool
    trainer_up: bool
    trained_steps: int
    captured_bytes: int  # sent by the writer during this wave


class PhaseResult(BaseModel):
    phase: str
    role: str
    domain: str
    waves: int
    serving_s: float
    trainer_active_s: float
    tokens: int
    trainer_active_tokens: int  # served in the ticks that trained: the trainer-active share on the schedule's clock
    trained_steps: int
    captured_bytes: int
    served_accept_length: float  # over the phase's served waves
    end_accept_length: float  # "eval" prompts at the phase end
    end_version: int
    gate_states: list[str]  # in order, repeats collapsed
    trigger_states: list[str]


class ArmResult(BaseModel):
    gate: str
    phases: list[PhaseResult]
    ticks: list[Tick]
    published: list[Published]  # with each version's held-out metrics (its manifest's), as the trainer announced it
    trainer_starts: int
    trainer_scale_downs: int
    trainer_busy_s: float  # wall seconds the trainer spent reading, training and evaluating

    @property
    def trainer_active_s(self) -> float:
        return sum(p.trainer_active_s for p in self.phases)

    @property
    def trainer_active_tokens(self) -> int:
        return sum(p.trainer_active_tokens for p in self.phases)

    @property
    def tokens(self) -> int:
        return sum(p.tokens for p in self.phases)

    @property
    def captured_bytes(self) -> int:
        return sum(p.captured_bytes for p in self.phases)


def served_plans(size: Size) -> list[PhasePlan]:
    """What the engines serve, capture and train on: "train" prompts only."""
    return plan_schedule(parse_schedule(size.schedule()), seed=SERVED_SEED, split="train")


def eval_plans(size: Size) -> dict[str, PhasePlan]:
    """Per domain, what each phase end is measured on: "eval" prompts, never served."""
    spec = ",".join(f"{d}:{size.eval_requests}" for d in dict.fromkeys(WORKLOADS))
    return {p.phase.workload: p for p in plan_schedule(parse_schedule(spec), seed=EVAL_SEED, split="eval")}


def arm_settings(url: str, spec: TrainingSpec, size: Size, workdir: Path, device: str) -> TideSettings:
    trig = spec.trigger
    return TideSettings(redis_url=url, deployment=DEPLOYMENT, pod_name=POD, heartbeat_s=1.0,
                        train_gate=spec.gate, train_device=device, train_checkpoint_dir=workdir / "checkpoint",
                        train_consumer=f"{DEPLOYMENT}-trainer", train_metrics_port=0,
                        trigger_short_alpha=trig.short_alpha, trigger_long_alpha=trig.long_alpha,
                        trigger_epsilon=trig.epsilon, control_window_steps=size.window_steps, control_max_steps=STEPS,
                        **WINDOWS,
                        **{**cpu_trainer_settings(), "train_checkpoint_interval_s": CHECKPOINT_S})


def end_accept_length(target: Target, engine: SpecEngine, plan: PhasePlan, size: Size) -> float:
    """The served draft on `plan`'s prompts at STEPS steps, nothing captured."""
    evaluator = SpecEngine(target, draft=engine.draft, draft_version=engine.draft_version,
                           controller=FixedSteps(STEPS))
    records = serve(evaluator, [plan], ServeOptions(batch_size=size.batch, max_new_tokens=size.max_new_tokens))
    return phase_summaries(records)[0].accept_length


def run_arm(gate_name: str, target: Target, static: Path, size: Size, workdir: Path, device: str) -> ArmResult:
    spec = TrainingSpec(gate=gate_name, hold_for=size.hold_for, idle_after=size.idle_after, min_up=size.min_up,
                        trigger=TRIGGER)
    registry = workdir / "registry"
    shutil.copytree(static, registry)  # every arm starts from the same v1
    options = ServeOptions(batch_size=size.batch, max_new_tokens=size.max_new_tokens)
    plans, evals = served_plans(size), eval_plans(size)
    roles = {p.phase.name: r for p, r in zip(plans, ROLES, strict=True)}
    with LocalRedis() as server:
        settings = arm_settings(server.url, spec, size, workdir, device)
        operator = GateOperator(settings, spec, stable=1)
        operator.reconcile(0.0)  # before any engine: the first control state
        parts = online_engine(target, settings, registry, max_batch=size.batch,
                              draft_vocab_size=int(CPU_TRAINER_ENV["TIDE_TRAIN_DRAFT_VOCAB_SIZE"]))
        parts.engine.controller = SteadySteps(STEPS, parts.controller)
        parts.follower.poll_s = 0.0  # read the control state at every step: the operator writes it between waves
        pod = TrainerPod(settings, registry, heads_of(target.model))
        serving = Serving(parts.engine, options, follower=parts.follower, reporter=parts.reporter)
        ticks: list[Tick] = []
        ends: dict[str, tuple[float, int]] = {}
        clock = busy = 0.0
        sent = 0
        try:
            for wave in waves(plans, options, target.tokenizer):
                if ticks and wave.phase != ticks[-1].phase:
                    ends[ticks[-1].phase] = _end(target, parts.engine, evals, ticks[-1].phase, plans, size)
                serving.sync()  # the operator's last pass: its `collect` applies from this wave's prefill on
                first = len(serving.records)
                serving.serve(wave)
                records = serving.records[first:]
                seconds = sum(r.seconds for r in records)
                clock += seconds
                parts.writer.flush(60)
                parts.follower.heartbeat()
                status = operator.reconcile(clock)
                t0 = time.perf_counter()
                trained = pod.tick(gate.replicas(status), size.train_steps)
                busy += time.perf_counter() - t0
                operator.promote()
                now_sent = parts.writer.stats.sent_bytes
                trig = parts.controller.trigger
                ticks.append(Tick(
                    phase=wave.phase, t=round(clock, 3), seconds=round(seconds, 3),
                    tokens=sum(r.emitted for r in records),
                    accept_length=round(sum(r.emitted for r in records) / sum(r.batch_size for r in records), 3),
                    request_steps=sum(r.batch_size for r in records),
                    version=parts.engine.draft_version, trigger=trig.state.value, trigger_reason=trig.reason,
                    trigger_gap=round(trig.gap, 4), trigger_epsilon=round(trig.epsilon, 4),
                    trigger_gain=round(trig.gain, 4),
                    gate=status.state.value, reason=status.reason, train=operator.control.train,
                    collect=operator.control.collect,
                    trainer_up=gate.replicas(status) == 1, trained_steps=trained, captured_bytes=now_sent - sent))
                sent = now_sent
            ends[ticks[-1].phase] = _end(target, parts.engine, evals, ticks[-1].phase, plans, size)
            serving.close()
        finally:
            parts.writer.close()
            parts.follower.close()
    phases = [_phase(p, roles[p.phase.name], [t for t in ticks if t.phase == p.phase.name], ends[p.phase.name])
              for p in plans]
    return ArmResult(gate=gate_name, phases=phases, ticks=ticks, published=operator.published,
                     trainer_starts=pod.starts, trainer_scale_downs=pod.scale_downs, trainer_busy_s=round(busy, 3))


def _end(target: Target, engine: SpecEngine, evals: dict[str, PhasePlan], phase: str, plans: list[PhasePlan],
         size: Size) -> tuple[float, int]:
    domain = next(p.phase.workload for p in plans if p.phase.name == phase)
    return end_accept_length(target, engine, evals[domain], size), engine.draft_version


def _collapse(states: list[str]) -> list[str]:
    return [s for i, s in enumerate(states) if i == 0 or states[i - 1] != s]


def _phase(plan: PhasePlan, role: str, ticks: list[Tick], end: tuple[float, int]) -> PhaseResult:
    steps = sum(t.request_steps for t in ticks)
    return PhaseResult(
        phase=plan.phase.name, role=role, domain=plan.phase.workload, waves=len(ticks),
        serving_s=round(sum(t.seconds for t in ticks), 3),
        trainer_active_s=round(sum(t.seconds for t in ticks if t.train and t.trainer_up), 3),
        tokens=sum(t.tokens for t in ticks),
        trainer_active_tokens=sum(t.tokens for t in ticks if t.train and t.trainer_up),
        trained_steps=sum(t.trained_steps for t in ticks), captured_bytes=sum(t.captured_bytes for t in ticks),
        served_accept_length=round(sum(t.accept_length * t.request_steps for t in ticks) / max(steps, 1), 3),
        end_accept_length=end[0], end_version=end[1], gate_states=_collapse([t.gate for t in ticks]),
        trigger_states=_collapse([t.trigger for t in ticks]))


def _table(arms: dict[str, ArmResult], label: str) -> Table:
    table = Table(title=f"tide bench train-gate ({label}): per phase, always | trigger")
    for col in ("phase", "role", "serving s", "trainer-active tokens", "captured MiB", "end accept length",
                "trigger: gate states"):
        table.add_column(col, justify="left" if col in ("phase", "role", "trigger: gate states") else "right")
    for i, phase in enumerate(arms["always"].phases):
        a, t = phase, arms["trigger"].phases[i]
        table.add_row(phase.phase, phase.role, f"{a.serving_s:.1f} | {t.serving_s:.1f}",
                      f"{a.trainer_active_tokens} | {t.trainer_active_tokens} of {a.tokens}",
                      f"{a.captured_bytes / 2**20:.1f} | {t.captured_bytes / 2**20:.1f}",
                      f"{a.end_accept_length:.3f} | {t.end_accept_length:.3f}", " > ".join(t.gate_states))
    return table


def run(quick: bool, console: Console) -> BenchReport:
    gpu = torch.cuda.is_available()
    size = SIZES["quick" if quick else "full"]
    device = "cuda" if gpu else "cpu"
    threads = torch.get_num_threads()
    if not gpu:
        # Engine and trainer take turns on one thread: two threads on a shared machine spin against each other
        # (a wave took 30x longer on the 2-core VM under another job's load).
        torch.set_num_threads(1)
    try:
        arms = _run_arms(size, device, console)
    finally:
        torch.set_num_threads(threads)
    label = "GPU" if gpu else "CPU"
    console.print(_table(arms, label))
    always, trigger = arms["always"], arms["trigger"]
    ratios = [t.end_accept_length / a.end_accept_length for a, t in zip(always.phases, trigger.phases, strict=True)]
    return BenchReport(
        name="train-gate", quick=quick,
        figures={"label": label, "size": size.model_dump(), "schedule": size.schedule(), "steps": STEPS,
                 "trigger": TRIGGER.model_dump(), "windows": WINDOWS,
                 "trainer_env": {k: v for k, v in CPU_TRAINER_ENV.items() if k.startswith("TIDE_")},
                 "trainer_active_tokens": {n: a.trainer_active_tokens for n, a in arms.items()},
                 "tokens": {n: a.tokens for n, a in arms.items()},
                 "trainer_active_s": {n: a.trainer_active_s for n, a in arms.items()},
                 "captured_bytes": {n: a.captured_bytes for n, a in arms.items()},
                 "end_accept_length_ratio": [round(r, 4) for r in ratios],
                 "arms": {n: a.model_dump() for n, a in arms.items()}},
        goals=[
            goal("trainer_active_trigger_over_always", trigger.trainer_active_tokens / always.trainer_active_tokens,
                 "fraction", "<=", 0.5),
            goal("captured_bytes_trigger_over_always", trigger.captured_bytes / always.captured_bytes,
                 "fraction", "<=", 0.5),
            goal("end_accept_length_trigger_over_always_min", min(ratios), "x", ">=", 0.95),
        ],
    )


def _run_arms(size: Size, device: str, console: Console) -> dict[str, ArmResult]:
    target = load_target(device=device, dtype=torch.bfloat16 if device == "cuda" else torch.float32)
    arms: dict[str, ArmResult] = {}
    with tempfile.TemporaryDirectory(prefix="tide-bench-train-gate-", dir=Path.cwd()) as tmp:
        workdir = Path(tmp)
        static = workdir / "static"
        with console.status(f"starting draft: capture {size.offline_requests} writing requests, train "
                            f"{size.offline_steps} steps offline"):
            train_offline_draft(target, static_plans(size.static()), size.static(), static, device)
        for name in GATES:
            t0 = time.monotonic()
            with console.status(f"gate {name}: serving {size.schedule()}"):
                arms[name] = run_arm(name, target, static, size, workdir / name, device)
            arm = arms[name]
            console.print(f"gate {name}: {time.monotonic() - t0:.0f} s, trainer active {arm.trainer_active_tokens} of "
                          f"{arm.tokens} tokens ({arm.trainer_active_s:.1f} s), captured "
                          f"{arm.captured_bytes / 2**20:.1f} MiB, published {[v.version for v in arm.published]}")
    return arms
