"""`tide train`: the online trainer service."""

import logging
import signal
import sys
import threading
from pathlib import Path
from typing import Any, NoReturn

import click
from pydantic import ValidationError

from tide_sglang import keys
from tide_sglang.settings import TideSettings

log = logging.getLogger("tide.trainer")


def _fail(message: str) -> NoReturn:
    click.echo(f"tide train: error: {message}", err=True)
    sys.exit(2)


def _settings(overrides: dict[str, Any]) -> TideSettings:
    try:
        return TideSettings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as e:
        first = e.errors()[0]
        _fail(f"invalid setting {'.'.join(map(str, first['loc']))}: {first['msg']}")


@click.command("train")
@click.option("--registry", help="Draft registry: a directory (a ReadWriteMany volume), file:///path or "
              "s3://bucket/prefix. [TIDE_REGISTRY_DIR or TIDE_REGISTRY_URL]")
@click.option("--create-registry", is_flag=True, help="Create the registry directory if missing (a new lineage).")
@click.option("--checkpoint-dir", "train_checkpoint_dir", type=click.Path(path_type=Path),
              help="Trainer state directory; a restarted trainer resumes from it. [TIDE_TRAIN_CHECKPOINT_DIR]")
@click.option("--target", help="Target checkpoint directory, or 'smollm2-135m'; only its embedding, lm_head and "
              "final norm are read. [TIDE_TARGET]")
@click.option("--deployment", help="TideDeployment name: the stream is tide:{NAMESPACE/NAME}:hs. [TIDE_DEPLOYMENT]")
@click.option("--namespace", help="Kubernetes namespace of the TideDeployment. [TIDE_NAMESPACE, default: default]")
@click.option("--redis-url", help="redis://, rediss:// or unix:// URL; a password in it shows in the process list, "
              "so pass it as TIDE_REDIS_PASSWORD(_FILE). [TIDE_REDIS_URL]")
@click.option("--consumer", "train_consumer", help="Consumer name in group 'trainers'; keep it stable across "
              "restarts to resume this trainer's pending entries. [TIDE_TRAIN_CONSUMER, default: host name]")
@click.option("--device", "train_device", help="auto, cpu, cuda or cuda:N. [TIDE_TRAIN_DEVICE]")
@click.option("--gate", "train_gate", type=click.Choice(["always", "trigger"]),
              help="always, or trigger: train only while the control hash field 'train' is not 0. [TIDE_TRAIN_GATE]")
@click.option("--max-steps", type=int, help="Stop after this many optimizer steps (tests and benchmarks).")
def train(registry: str | None, create_registry: bool, max_steps: int | None, **overrides: Any) -> None:
    """Train the EAGLE-3 draft online from the hidden-state stream and publish versions that beat the deployed one.

    Every option falls back to its TIDE_* variable. The other trainer settings are read from the environment
    only: TIDE_TRAIN_TTT_STEPS, _CHUNK_LEN, _BATCH_CHUNKS, _LR, _WEIGHT_DECAY, _DRAFT_VOCAB_SIZE,
    _VOCAB_WARMUP_ROWS, _RECENT_CHUNKS, _RESERVOIR_CHUNKS, _HELDOUT_FRACTION, _HELDOUT_CHUNKS,
    _EVAL_INTERVAL_STEPS, _PUBLISH_MARGIN, _MIN_HELDOUT_ROWS, _CHECKPOINT_INTERVAL_S and _NICE
    (docs/trainer.md).
    SIGTERM or Ctrl-C checkpoints, acks and exits. Under `torchrun --nproc-per-node N` each rank reads as
    consumer NAME-<rank> and PyTorch DDP averages the gradients.
    """
    settings = _settings(overrides)
    trainer = _build(settings, registry or settings.registry, create_registry)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    _serve_metrics(trainer, settings.train_metrics_port)
    trainer.run(stop, max_steps=max_steps)
    state = trainer.state
    click.echo(f"tide train: stopped after {state.steps if state else 0} steps; ingested {trainer.ingested_rows} "
               f"rows; published {trainer.published or 'nothing'}")


def _serve_metrics(trainer: Any, port: int) -> None:
    """Prometheus metrics on the `metrics` container port (rank 0 only under torchrun); a busy port only warns."""
    if port == 0 or (trainer.dist is not None and trainer.dist.rank != 0):
        return
    try:
        trainer.metrics.serve(port)
    except OSError as e:
        log.warning("not serving metrics on port %d: %s", port, e)


def reclaim_idle_ms(settings: TideSettings) -> int:
    """How long an entry stays pending before another trainer may claim it: a live trainer acks only at its next
    checkpoint, so twice the checkpoint interval (at least 30 s); shorter would hand a live trainer's entries to
    another one, which would train on them twice."""
    return max(30_000, int(2_000 * settings.train_checkpoint_interval_s))


def _build(settings: TideSettings, location: str | None, create_registry: bool) -> Any:
    # Heavy imports here, so that `tide train --help` and setting errors answer at once.
    from tide_sglang.draft import DraftVerificationError, VocabMismatch, open_registry
    from tide_sglang.draft.target import load_heads
    from tide_sglang.stream import RedisUnavailable, StreamReader, connect
    from tide_sglang.trainer.distributed import from_env
    from tide_sglang.trainer.service import DraftTrainer, TrainerError

    if location is None:
        _fail("no draft registry: pass --registry, or set TIDE_REGISTRY_DIR or TIDE_REGISTRY_URL")
    try:
        registry = open_registry(location, create=create_registry)
    except FileNotFoundError as e:
        _fail(f"{e} (--create-registry starts a new lineage there)")
    except (OSError, ValueError) as e:
        _fail(str(e))
    try:
        dist = from_env()  # under torchrun: one consumer per rank, DDP
        consumer = settings.train_consumer if dist is None else f"{settings.train_consumer}-{dist.rank}"
        client = connect(settings)
        heads = load_heads(settings.target)
        ns, dep = settings.namespace, settings.deployment
        reader = StreamReader.from_settings(client, settings, keys.hidden_states(ns, dep), keys.dead_letter(ns, dep),
                                            consumer, block_ms=200, claim_idle_ms=reclaim_idle_ms(settings),
                                            vocab_size=heads.config.vocab_size)
        return DraftTrainer(settings, registry, reader, heads, dist=dist)
    except (RedisUnavailable, TrainerError, VocabMismatch, DraftVerificationError, ValueError, OSError) as e:
        _fail(str(e))
