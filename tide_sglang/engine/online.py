"""TIDE online, on one machine: the engine serving with capture, a trainer process, and a stand-in promoter.

    trainer process : tide train --registry DIR            (stream -> draft versions -> events stream)
    this process    : SpecEngine + StreamWriter + StatsReporter + DraftFollower + SpeculationController
    promoter thread : the operator's job in a cluster: every published version becomes `stable`

Shared by `tide demo` and `tide bench adapt`, so the demo shows exactly what the benchmark measures.
"""

import logging
import os
import subprocess
import sys
import threading
from pathlib import Path

import redis
import torch
from pydantic import BaseModel, ConfigDict

from tide_sglang import keys
from tide_sglang.control import SpeculationController
from tide_sglang.draft import DraftConfig, init_draft, open_registry, select_vocab
from tide_sglang.draft.target import Target, heads_of
from tide_sglang.engine.engine import SpecEngine
from tide_sglang.engine.profile import profile_engine
from tide_sglang.engine.swap import DraftFollower
from tide_sglang.rollout import ControlState, StatsReporter, read_event_page, write_control
from tide_sglang.settings import TideSettings
from tide_sglang.stream import StreamWriter, connect

log = logging.getLogger("tide.engine.online")

# Sized for 2 CPU cores: a small draft vocabulary and frequent publish decisions, so versions arrive in minutes.
CPU_TRAINER_ENV = {
    "TIDE_TRAIN_DRAFT_VOCAB_SIZE": "2048",
    "TIDE_TRAIN_VOCAB_WARMUP_ROWS": "2000",
    "TIDE_TRAIN_TTT_STEPS": "3",
    "TIDE_TRAIN_EVAL_INTERVAL_STEPS": "25",
    "TIDE_TRAIN_MIN_HELDOUT_ROWS": "64",
    "TIDE_TRAIN_HELDOUT_FRACTION": "0.15",  # few, long requests: hold out enough of them early
    "TIDE_TRAIN_BATCH_CHUNKS": "4",
    "TIDE_TRAIN_CHUNK_LEN": "32",
    "TIDE_TRAIN_LR": "1e-3",
    "TIDE_TRAIN_CHECKPOINT_INTERVAL_S": "30",
    "OMP_NUM_THREADS": "1",  # one core for the trainer, one for the engine
}


def cpu_trainer_settings() -> dict[str, str]:
    """CPU_TRAINER_ENV as TideSettings fields, for a trainer that runs in this process."""
    return {k.removeprefix("TIDE_").lower(): v for k, v in CPU_TRAINER_ENV.items() if k.startswith("TIDE_")}


class Promoter(threading.Thread):
    """Stand-in for the operator: promote every version the trainer announces on the events stream."""

    def __init__(self, client: redis.Redis, namespace: str, deployment: str) -> None:
        super().__init__(name="tide-promoter", daemon=True)
        self.client, self.namespace, self.deployment = client, namespace, deployment
        self.published: list[int] = []
        self.stop = threading.Event()

    def run(self) -> None:
        last = "0-0"
        while not self.stop.is_set():
            try:
                events, last = read_event_page(self.client, self.namespace, self.deployment, last)
                for _, event in events:
                    self.published.append(event.version)
                    write_control(self.client, self.namespace, self.deployment, ControlState(stable=event.version))
            except redis.RedisError as e:
                log.warning("promoter cannot read the events stream: %s", e)
                self.stop.wait(1.0)
                continue
            self.stop.wait(0.3)

    def close(self) -> None:
        self.stop.set()
        if self.is_alive():
            self.join(5)


def start_trainer(registry: Path, workdir: Path, target: str, settings: TideSettings, *, device: str,
                  env: dict[str, str]) -> subprocess.Popen[bytes]:
    """`tide train` as a separate process (as in a cluster, where it runs on the training pool)."""
    workdir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "tide_sglang.cli", "-v", "train", "--registry", str(registry), "--create-registry",
           "--checkpoint-dir", str(workdir / "trainer"), "--target", target, "--deployment", settings.deployment,
           "--namespace", settings.namespace,
           "--consumer", f"{settings.deployment}-trainer", "--device", device]
    logfile = (workdir / "trainer.log").open("wb")
    # The preset gives defaults; TIDE_TRAIN_* variables already in the environment win. The Redis URL goes in the
    # environment, not argv: it may hold a password, and argv is visible to every process on the machine.
    return subprocess.Popen(cmd, stdout=logfile, stderr=subprocess.STDOUT,
                            env={**env, **os.environ, "TIDE_REDIS_URL": settings.redis_url})


def stop_trainer(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()  # the trainer checkpoints and acks on SIGTERM
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


class OnlineParts(BaseModel):
    model_config = ConfigDict(arbitrary_types_allowed=True)

    engine: SpecEngine
    writer: StreamWriter
    reporter: StatsReporter
    follower: DraftFollower
    controller: SpeculationController


def online_engine(target: Target, settings: TideSettings, registry: Path | str, *, max_batch: int,
                  draft_vocab_size: int) -> OnlineParts:
    """An engine that captures to the stream, follows the control state, reports heartbeats (until
    `follower.close()`) and lets the TIDE policy pick steps."""
    heads = heads_of(target.model)
    param = next(target.model.parameters())
    # A throwaway draft of the trainer's shape, only to time one draft step for the policy's profile.
    config = DraftConfig.from_target(target.model.config, draft_vocab_size, target.aux_layer_ids,
                                     torch_dtype="float32")
    probe = init_draft(config, select_vocab(torch.ones(config.vocab_size), draft_vocab_size), heads.embed,
                       heads.lm_head, heads.norm).to(param.device, param.dtype)
    controller = SpeculationController(profile_engine(target, probe, max_batch, settings.control_max_steps),
                                       settings)
    client = connect(settings)
    stream = keys.hidden_states(settings.namespace, settings.deployment)
    writer = StreamWriter.from_settings(settings, stream)
    reporter = StatsReporter(client, settings.namespace, settings.deployment)
    follower = DraftFollower(client, open_registry(registry), settings.namespace, settings.deployment,
                             settings.pod_name, heads.embed, device=param.device, dtype=param.dtype,
                             reporter=reporter, trigger=controller.trigger.report,
                             on_swap=controller.credit)
    follower.start_heartbeats(settings.heartbeat_s)
    engine = SpecEngine(target, controller=controller, writer=writer)
    return OnlineParts(engine=engine, writer=writer, reporter=reporter, follower=follower, controller=controller)
