"""`tide demo`: a drifting workload served three ways side by side, while a trainer process learns it online.

    no-spec : the target alone
    static  : a draft trained offline on the first phase's "train" prompts (tide bench adapt's), fixed steps
    tide    : from a cold start; captures, trains online in a separate process, hot-swaps versions, and lets
              the TIDE policy choose the draft steps (0 = off)

Every wave of the schedule ("eval" prompts only) is served by each arm in turn, the order rotating from wave to
wave, so the arms share the machine's load window by window (docs/engine.md says why). Everything runs on this
machine (engine/online.py): a private redis-server unless TIDE_REDIS_URL is set, the trainer as a separate
process, the engines in this one (one target, one thread), and a promoter thread standing in for the operator.
"""

import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import torch
from pydantic import BaseModel
from rich.console import Console

from tide_sglang.bench.adapt import STATIC_STEPS, Size, static_plans, train_offline_draft
from tide_sglang.demo.report import ARMS, ArmWave, DemoSummary, arm_wave, write_report
from tide_sglang.demo.view import LiveView
from tide_sglang.draft import DirectoryRegistry, Eagle3Draft
from tide_sglang.draft.target import Target, heads_of, load_target
from tide_sglang.engine import FixedSteps, SpecEngine
from tide_sglang.engine.online import CPU_TRAINER_ENV, Promoter, online_engine, start_trainer, stop_trainer
from tide_sglang.engine.serve import ServeOptions, Serving, waves
from tide_sglang.settings import TideSettings
from tide_sglang.stream import connect
from tide_sglang.stream.server import LocalRedis
from tide_sglang.workloads import PhasePlan, parse_schedule, plan_schedule

DEPLOYMENT = "demo"
# While off, TIDE's engine drafts once every N decisions to measure the draft again. A probe costs about two plain
# steps (a draft extend over everything since the last one, k chain steps, a (k+1)-token verify), so probing every
# 16 decisions would cost ~6 % of tokens/s against no speculation and every 64 ~2 % (estimates from step times),
# while a fresh version is still measured within seconds.
PROBE_INTERVAL = 64
# The trainer shares the machine with the three arms: at niceness 10 the engines go first when something else loads
# the cores too (a shared machine, CI), and training takes what is left. Measured at load ~3 on 2 cores: at niceness 0
# the trainer took half a core and every arm served at half speed; at 10 it took a tenth and they served as if it were
# stopped (docs/benchmarks.md). On an otherwise idle 2-core machine it still gets the core the engines leave.
TRAINER_ENV = {**CPU_TRAINER_ENV, "TIDE_TRAIN_NICE": "10"}


class DemoOptions(BaseModel):
    schedule: str
    batch_size: int
    max_new_tokens: int
    seed: int
    target: str
    out: Path
    static_requests: int = 32  # "train" prompts of the first phase's workload the static draft learns from
    static_train_steps: int = 200


def served_plans(options: DemoOptions) -> list[PhasePlan]:
    """What every arm serves: the "eval" side of each workload, never the static draft's training text."""
    return plan_schedule(parse_schedule(options.schedule), seed=options.seed, split="eval")


def static_size(options: DemoOptions) -> Size:
    """The demo's static draft, sized as a `tide bench adapt` one: `static_plans` and `train_offline_draft` read
    the first workload, the request count, the new tokens and the training steps."""
    phases = parse_schedule(options.schedule).phases
    return Size(workloads=[p.workload for p in phases], requests=max(p.requests for p in phases),
                batches=[options.batch_size], max_new_tokens=options.max_new_tokens,
                offline_requests=options.static_requests, offline_steps=options.static_train_steps)


def static_draft(target: Target, options: DemoOptions) -> Eagle3Draft:
    size = static_size(options)
    registry = options.out / "static"
    train_offline_draft(target, static_plans(size), size, registry, "cpu")
    return DirectoryRegistry(registry).load(1, heads_of(target.model).embed, "cpu").eval()


def _interrupt(*_: object) -> None:
    raise KeyboardInterrupt  # SIGTERM (a CI timeout, `kill`) stops like Ctrl-C: cleanly, with a report


def side_by_side(servings: dict[str, Serving], plans: list[PhasePlan], options: ServeOptions,
                 on_wave: Callable[[ArmWave], None]) -> None:
    """Every wave through every arm, the order rotating so that no arm always runs first (or after another)."""
    tokenizer = servings["no-spec"].engine.target.tokenizer
    for n, wave in enumerate(waves(plans, options, tokenizer)):
        for arm in ARMS[n % len(ARMS):] + ARMS[: n % len(ARMS)]:
            serving = servings[arm]
            first = len(serving.records)
            t0 = time.monotonic()
            out = serving.serve(wave)
            seconds = time.monotonic() - t0
            on_wave(arm_wave(arm, wave.phase, wave.domain, wave.index, t0 - serving.start, seconds,
                             sum(len(o) for o in out), serving.records[first:]))


def run_demo(options: DemoOptions, console: Console) -> DemoSummary:
    signal.signal(signal.SIGTERM, _interrupt)
    options.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(options.seed)
    torch.set_num_threads(1)  # the other core is the trainer's (TRAINER_ENV bounds its threads to one)
    plans = served_plans(options)
    server = None if "TIDE_REDIS_URL" in os.environ else LocalRedis().start()
    probes = {} if "TIDE_CONTROL_PROBE_INTERVAL" in os.environ else {"control_probe_interval": PROBE_INTERVAL}
    settings = TideSettings(redis_url=os.environ.get("TIDE_REDIS_URL") or server.url,  # type: ignore[union-attr]
                            deployment=DEPLOYMENT, **probes)
    client = connect(settings)
    trainer = start_trainer(options.out / "registry", options.out, options.target, settings, device="cpu",
                            env=TRAINER_ENV)
    promoter = Promoter(client, settings.namespace, DEPLOYMENT)
    results: list[ArmWave] = []
    servings: dict[str, Serving] = {}
    interrupted = False
    try:
        with console.status("loading the target model"):
            target = load_target(options.target)
        with console.status(f"static draft: capture {options.static_requests} train prompts, train "
                            f"{options.static_train_steps} steps offline"):
            static = static_draft(target, options)
        with console.status("profiling the engine for the speculation policy"):
            parts = online_engine(target, settings, options.out / "registry", max_batch=options.batch_size,
                                  draft_vocab_size=int(CPU_TRAINER_ENV["TIDE_TRAIN_DRAFT_VOCAB_SIZE"]))
        promoter.start()
        view = LiveView(console, plans, parts.writer, client, promoter, trainer)
        serve_options = ServeOptions(batch_size=options.batch_size, max_new_tokens=options.max_new_tokens)
        start = time.monotonic()
        servings = {
            "no-spec": Serving(SpecEngine(target), serve_options, start=start),
            "static": Serving(SpecEngine(target, draft=static, draft_version=1, controller=FixedSteps(STATIC_STEPS)),
                              serve_options, start=start),
            "tide": Serving(parts.engine, serve_options, follower=parts.follower, reporter=parts.reporter,
                            on_record=view.step, start=start),
        }

        def on_wave(result: ArmWave) -> None:
            results.append(result)  # kept here too, so Ctrl-C still has every wave for the report
            view.wave(result)

        with view:
            side_by_side(servings, plans, serve_options, on_wave)
        servings["tide"].close()
        parts.writer.close()
        parts.follower.close()
    except KeyboardInterrupt:
        interrupted = True
        console.print("[yellow]interrupted: stopping and writing the report[/]")
    finally:
        promoter.close()
        stop_trainer(trainer)
        if server is not None:
            server.close()
    report_settings = {**options.model_dump(mode="json"), "static_steps": STATIC_STEPS,
                       "control_probe_interval": settings.control_probe_interval,
                       "trainer_env": TRAINER_ENV}
    return write_report(options.out, results, {a: s.records for a, s in servings.items()}, promoter.published,
                        interrupted, report_settings)


def default_out() -> Path:
    return Path("runs") / time.strftime("%Y%m%d-%H%M%S")
