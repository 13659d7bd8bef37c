"""`tide demo`: serve a drifting workload from a cold draft while a trainer process learns it online.

Everything runs on this machine (engine/online.py): a private redis-server unless TIDE_REDIS_URL is set, the
trainer as a separate process, the engine in this one, and a promoter thread standing in for the operator.
"""

import os
import signal
import time
from pathlib import Path

import torch
from pydantic import BaseModel
from rich.console import Console

from tide_sglang.demo.report import DemoSummary, write_report
from tide_sglang.demo.view import LiveView
from tide_sglang.draft.target import load_target
from tide_sglang.engine.online import CPU_TRAINER_ENV, Promoter, online_engine, start_trainer, stop_trainer
from tide_sglang.engine.serve import ServeOptions, StepRecord, serve
from tide_sglang.settings import TideSettings
from tide_sglang.stream import connect
from tide_sglang.stream.server import LocalRedis
from tide_sglang.workloads import parse_schedule, plan_schedule

DEPLOYMENT = "demo"


class DemoOptions(BaseModel):
    schedule: str
    batch_size: int
    max_new_tokens: int
    seed: int
    target: str
    out: Path


def _interrupt(*_: object) -> None:
    raise KeyboardInterrupt  # SIGTERM (a CI timeout, `kill`) stops like Ctrl-C: cleanly, with a report


def run_demo(options: DemoOptions, console: Console) -> DemoSummary:
    signal.signal(signal.SIGTERM, _interrupt)
    options.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(options.seed)
    torch.set_num_threads(1)  # the other core is the trainer's
    plans = plan_schedule(parse_schedule(options.schedule), seed=options.seed)
    server = None if "TIDE_REDIS_URL" in os.environ else LocalRedis().start()
    # Probe every 16 decisions while off (unless TIDE_CONTROL_PROBE_INTERVAL says otherwise): a fresh version gets
    # measured within seconds, not minutes.
    probes = {} if "TIDE_CONTROL_PROBE_INTERVAL" in os.environ else {"control_probe_interval": 16}
    settings = TideSettings(redis_url=os.environ.get("TIDE_REDIS_URL") or server.url,  # type: ignore[union-attr]
                            deployment=DEPLOYMENT, **probes)
    client = connect(settings)
    registry = options.out / "registry"
    trainer = start_trainer(registry, options.out, options.target, settings, device="cpu", env=CPU_TRAINER_ENV)
    promoter = Promoter(client, settings.namespace, DEPLOYMENT)
    records: list[StepRecord] = []
    interrupted = False
    try:
        with console.status("loading the target model and profiling it"):
            parts = online_engine(load_target(options.target), settings, registry, max_batch=options.batch_size,
                                  draft_vocab_size=int(CPU_TRAINER_ENV["TIDE_TRAIN_DRAFT_VOCAB_SIZE"]))
        promoter.start()
        view = LiveView(console, plans, parts.writer, client, promoter, trainer)

        def on_record(record: StepRecord) -> None:
            records.append(record)  # kept here too, so Ctrl-C still has every step for the report
            view.update(record)

        with view:
            serve(parts.engine, plans, ServeOptions(batch_size=options.batch_size,
                                                    max_new_tokens=options.max_new_tokens),
                  follower=parts.follower, reporter=parts.reporter, on_record=on_record)
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
    return write_report(options.out, records, promoter.published, interrupted, options.model_dump(mode="json"))


def default_out() -> Path:
    return Path("runs") / time.strftime("%Y%m%d-%H%M%S")
