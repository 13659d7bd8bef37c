"""`tide demo`: serve a drifting workload from a cold draft while a trainer process learns it online.

    redis-server (private unless TIDE_REDIS_URL is set)
    trainer process : tide train --registry runs/<ts>/registry   (stream -> draft versions -> events)
    this process    : engine serving the schedule, capture -> stream, follows the control key (hot swap)
    promoter thread : the operator's job in a cluster: every published version becomes `stable`
"""

import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import redis
import torch
from pydantic import BaseModel
from rich.console import Console

from tide_sglang import keys
from tide_sglang.control import SpeculationController
from tide_sglang.demo.report import DemoSummary, write_report
from tide_sglang.demo.view import LiveView
from tide_sglang.draft import DraftConfig, DraftRegistry, init_draft, select_vocab
from tide_sglang.draft.target import heads_of, load_target
from tide_sglang.engine import SpecEngine
from tide_sglang.engine.profile import profile_engine
from tide_sglang.engine.serve import ServeOptions, StepRecord, serve
from tide_sglang.engine.swap import DraftFollower
from tide_sglang.settings import TideSettings
from tide_sglang.stream import StreamWriter, connect
from tide_sglang.stream.rollout import ControlState, StatsReporter, write_control
from tide_sglang.stream.server import LocalRedis
from tide_sglang.workloads import parse_schedule, plan_schedule

log = logging.getLogger("tide.demo")

DEPLOYMENT = "demo"
# Sized for 2 CPU cores: a small draft vocabulary and frequent publish decisions, so versions arrive in minutes.
TRAINER_ENV = {
    "TIDE_TRAIN_DRAFT_VOCAB_SIZE": "4096",
    "TIDE_TRAIN_VOCAB_WARMUP_ROWS": "3000",
    "TIDE_TRAIN_EVAL_INTERVAL_STEPS": "40",
    "TIDE_TRAIN_MIN_HELDOUT_ROWS": "128",
    "TIDE_TRAIN_BATCH_CHUNKS": "8",
    "TIDE_TRAIN_CHUNK_LEN": "32",
    "TIDE_TRAIN_LR": "1e-3",
    "TIDE_TRAIN_CHECKPOINT_INTERVAL_S": "30",
    "OMP_NUM_THREADS": "1",  # one core for the trainer, one for the engine
}


class DemoOptions(BaseModel):
    schedule: str
    batch_size: int
    max_new_tokens: int
    seed: int
    target: str
    out: Path


class Promoter(threading.Thread):
    """Stand-in for the operator: promote every version the trainer announces on the events stream."""

    def __init__(self, client: redis.Redis, deployment: str) -> None:
        super().__init__(name="tide-demo-promoter", daemon=True)
        self.client, self.deployment = client, deployment
        self.published: list[int] = []
        self.stop = threading.Event()

    def run(self) -> None:
        last = "0-0"
        while not self.stop.is_set():
            try:
                reply = self.client.xread({keys.events(self.deployment): last}, block=300, count=10)
            except redis.RedisError as e:
                log.warning("promoter cannot read the events stream: %s", e)
                self.stop.wait(1.0)
                continue
            for _, entries in reply or []:
                for entry_id, fields in entries:
                    last = entry_id
                    version = int(fields[b"version"])
                    self.published.append(version)
                    write_control(self.client, self.deployment, ControlState(stable=version))


def _start_trainer(options: DemoOptions, url: str) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "tide_sglang.cli", "train", "--registry", str(options.out / "registry"),
           "--create-registry", "--checkpoint-dir", str(options.out / "trainer"), "--target", options.target,
           "--deployment", DEPLOYMENT, "--redis-url", url, "--consumer", "demo-trainer", "--device", "cpu"]
    log = (options.out / "trainer.log").open("wb")
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **TRAINER_ENV})


def run_demo(options: DemoOptions, console: Console) -> DemoSummary:
    options.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(options.seed)
    torch.set_num_threads(1)
    plans = plan_schedule(parse_schedule(options.schedule), seed=options.seed)
    server = None if "TIDE_REDIS_URL" in os.environ else LocalRedis().start()
    url = os.environ.get("TIDE_REDIS_URL") or server.url  # type: ignore[union-attr]
    settings = TideSettings(redis_url=url, deployment=DEPLOYMENT)
    client = connect(settings)
    DraftRegistry(options.out / "registry", create=True)
    trainer = _start_trainer(options, url)
    promoter = Promoter(client, DEPLOYMENT)
    records: list[StepRecord] = []
    interrupted = False
    try:
        with console.status("loading the target model and profiling it"):
            engine, follower, reporter, writer = _engine(options, settings, client)
        promoter.start()
        view = LiveView(console, plans, writer, client, promoter, trainer)

        def on_record(record: StepRecord) -> None:
            records.append(record)  # kept here too, so Ctrl-C still has every step for the report
            view.update(record)

        with view:
            serve(engine, plans, ServeOptions(batch_size=options.batch_size, max_new_tokens=options.max_new_tokens),
                  follower=follower, reporter=reporter, on_record=on_record)
        writer.close()
    except KeyboardInterrupt:
        interrupted = True
        console.print("[yellow]interrupted: stopping and writing the report[/]")
    finally:
        promoter.stop.set()
        if promoter.is_alive():
            promoter.join(5)
        trainer.terminate()
        try:
            trainer.wait(30)
        except subprocess.TimeoutExpired:
            trainer.kill()
        if server is not None:
            server.close()
    return write_report(options.out, records, promoter.published, interrupted, options.model_dump(mode="json"))


def _engine(options: DemoOptions, settings: TideSettings, client: redis.Redis):
    target = load_target(options.target)
    heads = heads_of(target.model)
    # A throwaway draft of the trainer's shape, only to time one draft step for the policy's profile.
    config = DraftConfig.from_target(target.model.config, int(TRAINER_ENV["TIDE_TRAIN_DRAFT_VOCAB_SIZE"]),
                                     target.aux_layer_ids, torch_dtype="float32")
    probe = init_draft(config, select_vocab(torch.ones(config.vocab_size), config.draft_vocab_size),
                       heads.embed, heads.lm_head, heads.norm)
    profile = profile_engine(target, probe, options.batch_size, settings.control_max_steps)
    controller = SpeculationController(profile, settings)
    writer = StreamWriter(lambda: connect(settings, check=False), keys.hidden_states(DEPLOYMENT),
                          budget_bytes=settings.stream_budget_mib << 20, queue_entries=settings.stream_queue_entries)
    reporter = StatsReporter(client, DEPLOYMENT)
    follower = DraftFollower(client, DraftRegistry(options.out / "registry"), DEPLOYMENT, "stable", heads.embed,
                             reporter=reporter)
    engine = SpecEngine(target, controller=controller, writer=writer)
    return engine, follower, reporter, writer


def default_out() -> Path:
    return Path("runs") / time.strftime("%Y%m%d-%H%M%S")
