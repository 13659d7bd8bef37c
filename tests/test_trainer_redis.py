"""The trainer against real parts: SmolLM2-135M hidden states, written by StreamWriter into a real redis-server."""

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from tests.helpers import wait_for
from tests.specforge import write_specforge_export
from tide_sglang import keys, rollout
from tide_sglang.bench.traffic import cached_generate, capture, prompt_lengths, prompts
from tide_sglang.capture import CaptureBatch
from tide_sglang.cli import main
from tide_sglang.draft import DirectoryRegistry
from tide_sglang.draft.importer import import_draft
from tide_sglang.draft.target import Target, heads_of, load_target
from tide_sglang.settings import TideSettings
from tide_sglang.stream import StreamReader, StreamWriter, connect
from tide_sglang.trainer import DraftTrainer, service
from tide_sglang.trainer import state as ckpt
from tide_sglang.trainer.cli import train

SMALL = {"train_chunk_len": 16, "train_batch_chunks": 8, "train_ttt_steps": 3, "train_lr": 2e-3,
         "train_draft_vocab_size": 512, "train_vocab_warmup_rows": 300, "train_heldout_fraction": 0.25,
         "train_min_heldout_rows": 20, "train_publish_margin": 0.02, "train_device": "cpu"}


@pytest.fixture(scope="module")
def smollm2() -> Target:
    return load_target()


@pytest.fixture(scope="module")
def traffic(smollm2: Target) -> list[CaptureBatch]:
    """24 greedy SmolLM2 completions (cached on disk after the first run), cut into verify-step entries."""
    texts = prompts(24)
    sequences = cached_generate(smollm2, texts, max_new=40)
    return capture(smollm2, sequences, [f"req-{i}" for i in range(len(sequences))], prompt_lengths(smollm2, texts),
                   rows_per_step=4)


def _write(settings: TideSettings, batches: list[CaptureBatch]) -> None:
    with StreamWriter(lambda: connect(settings), keys.hidden_states(settings.namespace, settings.deployment)) as writer:
        for b in batches:
            assert writer.submit(b)
        assert writer.flush()
        assert writer.stats.sent_entries == len(batches)


def _trainer(settings: TideSettings, registry: Path, smollm2: Target, consumer: str = "t1",
             count: int = 16, block_ms: int = 50, should_train: Callable[[], bool] | None = None) -> DraftTrainer:
    reader = StreamReader(connect(settings), keys.hidden_states(settings.namespace, settings.deployment),
                          keys.dead_letter(settings.namespace, settings.deployment), consumer, count=count,
                          block_ms=block_ms)
    return DraftTrainer(settings, DirectoryRegistry(registry, create=True), reader, heads_of(smollm2.model),
                        should_train=should_train)


def _drain(trainer: DraftTrainer, rows: int) -> None:
    for _ in range(200):
        if trainer.ingested_rows >= rows:
            return
        trainer.poll()
    raise AssertionError(f"ingested {trainer.ingested_rows} of {rows} rows")


def test_trainer_learns_from_the_stream_and_publishes(settings: TideSettings, smollm2: Target,
                                                      traffic: list[CaptureBatch], tmp_path: Path) -> None:
    settings = settings.model_copy(update=SMALL)
    _write(settings, traffic)
    trainer = _trainer(settings, tmp_path / "reg", smollm2)
    _drain(trainer, sum(b.num_tokens for b in traffic))
    assert trainer.draft is not None and trainer.draft.config.draft_vocab_size == 512

    first = trainer.evaluate()  # the untrained draft against itself: nothing to publish
    assert first.candidate.accept_length == first.deployed.accept_length and not first.decision.publish
    for _ in range(40):
        trainer.train_step()
    report = trainer.evaluate()
    assert report.candidate.rows == first.candidate.rows >= 20
    assert report.candidate.accept_length > first.candidate.accept_length + 0.1, report
    assert report.published == 1, report.decision.reason
    manifest = trainer.registry.verify(1).manifest
    assert manifest.parent is None and manifest.metrics.accept_length == report.candidate.accept_length
    assert manifest.metrics.parent_accept_length == first.candidate.accept_length
    events = rollout.read_events(connect(settings), settings.namespace, settings.deployment)
    assert [e.version for _, e in events] == [1] and events[0][1].parent is None
    assert events[0][1].metrics["accept_length"] == report.candidate.accept_length
    again = trainer.evaluate()  # now v1 is the deployed version: the same weights do not publish again
    assert again.deployed_version == 1 and not again.decision.publish


def test_trainer_with_rows_trains_without_waiting_for_entries_at_its_own_niceness(
        settings: TideSettings, smollm2: Target, traffic: list[CaptureBatch], tmp_path: Path) -> None:
    """Sharing cores with serving (the CPU demo), the trainer must load the machine alike whether an engine is
    capturing or not, and let the engine go first: with rows to train on it never waits for new entries (each wait
    here would be the reader's 10 s), and its thread runs at TIDE_TRAIN_NICE, the caller's thread untouched."""
    settings = settings.model_copy(update={**SMALL, "train_nice": 3, "redis_timeout_s": 30.0})
    _write(settings, traffic)
    trainer = _trainer(settings, tmp_path / "reg", smollm2, block_ms=10_000)
    _drain(trainer, sum(b.num_tokens for b in traffic))
    assert trainer.ready
    caller_nice, seen = os.nice(0), {}

    def run() -> None:
        t0 = time.monotonic()
        trainer.run(threading.Event(), max_steps=4, slice_s=0.05)
        seen.update(seconds=time.monotonic() - t0, nice=os.nice(0))

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(120)
    assert trainer.state is not None and trainer.state.steps >= 4
    assert seen["seconds"] < 8.0, seen
    assert seen["nice"] == max(caller_nice, 3) and os.nice(0) == caller_nice


def test_restarted_trainer_resumes_without_losing_acked_work(settings: TideSettings, smollm2: Target,
                                                             traffic: list[CaptureBatch], tmp_path: Path) -> None:
    settings = settings.model_copy(update={**SMALL, "train_checkpoint_dir": tmp_path / "ckpt"})
    half = len(traffic) // 2
    _write(settings, traffic[:half])
    a = _trainer(settings, tmp_path / "reg", smollm2, consumer="pod-a", count=2)
    _drain(a, sum(b.num_tokens for b in traffic[:half]))
    for _ in range(2):
        a.train_step()
    a.checkpoint()  # acks everything read so far
    client = connect(settings)
    assert a.reader.pending() == 0
    _write(settings, traffic[half:])
    a.poll()  # read (not acked) ...
    a.reader.ack = lambda entries: None  # ... written into a checkpoint, but the trainer dies before acking ...
    a.checkpoint()
    saved_rows = len(a.replay) + len(a.heldout)
    a.poll()  # ... and it read more, which no checkpoint holds
    assert a.reader.pending() > 0
    weights = {k: v.clone() for k, v in a.draft.state_dict().items()}
    del a

    b = _trainer(settings, tmp_path / "reg", smollm2, consumer="pod-a")
    assert b.state.steps == 2 and len(b.replay) + len(b.heldout) == saved_rows
    for name, t in b.draft.state_dict().items():
        assert torch.equal(t, weights[name]), name
    _drain(b, sum(x.num_tokens for x in traffic))  # entries no checkpoint holds are delivered again, then the rest
    assert b.ingested_rows == sum(x.num_tokens for x in traffic)  # nothing lost, nothing counted twice
    b.train_step()  # the restored AdamW state steps on
    b.checkpoint()
    assert b.reader.pending() == 0 and client.xinfo_groups(keys.hidden_states("default", "test"))[0]["lag"] == 0


def test_trainer_refuses_a_vocabulary_change_in_a_lineage(settings: TideSettings, smollm2: Target,
                                                          traffic: list[CaptureBatch], tmp_path: Path) -> None:
    settings = settings.model_copy(update=SMALL)
    _write(settings, traffic[:6])
    trainer = _trainer(settings, tmp_path / "reg", smollm2)
    _drain(trainer, sum(b.num_tokens for b in traffic[:6]))
    trainer.registry.publish(trainer.draft)
    env = {"TIDE_REDIS_URL": settings.redis_url, "TIDE_DEPLOYMENT": "test", "TIDE_TRAIN_DRAFT_VOCAB_SIZE": "1024",
           "PATH": "/usr/bin:/bin"}
    result = subprocess.run([sys.executable, "-m", "tide_sglang.cli", "train", "--registry", str(tmp_path / "reg")],
                            capture_output=True, text=True, env=env, cwd=Path(__file__).parents[1], timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("tide train: error: TIDE_TRAIN_DRAFT_VOCAB_SIZE=1024")
    assert "fixed within a lineage" in result.stderr


@pytest.mark.parametrize(("args", "message"), [
    ([], "no draft registry"),
    (["--registry", "/nonexistent/registry"], "does not exist"),
    (["--registry", "{tmp}", "--redis-url", "redis://127.0.0.1:1/0"], "cannot reach Redis"),
    (["--registry", "{tmp}", "--redis-url", "http://x"], "invalid setting redis_url"),
])
def test_tide_train_bad_settings_give_one_error_line(args: list[str], message: str, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("TIDE_REGISTRY_DIR", "TIDE_REGISTRY_URL", "TIDE_REDIS_URL"):
        monkeypatch.delenv(name, raising=False)
    argv = [a.replace("{tmp}", str(tmp_path)) for a in args]
    result = CliRunner().invoke(main, ["train", *argv])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tide train: error:") and message in lines[0], result.stderr


def test_tide_train_help_documents_every_option() -> None:
    result = CliRunner().invoke(train, ["--help"])
    assert result.exit_code == 0
    for param in train.params:
        assert param.help, f"--{param.name} has no help text"
        assert param.opts[0] in result.output


@pytest.mark.slow
def test_tide_train_killed_and_restarted_resumes_without_losing_acked_work(
        settings: TideSettings, traffic: list[CaptureBatch], tmp_path: Path) -> None:
    """The real command, SIGKILLed while it holds unacked entries, then restarted: it resumes from its last
    checkpoint, and every captured row is ingested exactly once over the two runs."""
    cut = 2 * len(traffic) // 3
    _write(settings, traffic[:cut])
    env = {"PATH": "/usr/bin:/bin", "TIDE_REDIS_URL": settings.redis_url, "TIDE_DEPLOYMENT": "test",
           **{f"TIDE_{k.upper()}": str(v) for k, v in SMALL.items()},
           "TIDE_TRAIN_EVAL_INTERVAL_STEPS": "6", "TIDE_TRAIN_CHECKPOINT_INTERVAL_S": "3"}
    argv = [sys.executable, "-m", "tide_sglang.cli", "train", "--registry", str(tmp_path / "reg"),
            "--create-registry", "--checkpoint-dir", str(tmp_path / "ckpt"), "--consumer", "pod-0"]
    client = connect(settings)
    stream = keys.hidden_states("default", "test")

    first = subprocess.Popen(argv, env=env, cwd=Path(__file__).parents[1], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: any((tmp_path / "ckpt").glob("ckpt-*")), timeout=120, what="a first checkpoint")
        _write(settings, traffic[cut:])
        wait_for(lambda: client.xpending(stream, keys.TRAINER_GROUP)["pending"] > 0, timeout=60,
                 what="the trainer to hold unacked entries")
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    steps = ckpt.load_latest(tmp_path / "ckpt")[0].steps

    result = subprocess.run([*argv, "--max-steps", str(steps + 1)], capture_output=True, text=True, env=env,
                            cwd=Path(__file__).parents[1], timeout=240)
    assert result.returncode == 0, result.stderr[-2000:]
    total = sum(b.num_tokens for b in traffic)
    assert f"stopped after {steps + 1} steps; ingested {total} rows" in result.stdout
    assert client.xpending(stream, keys.TRAINER_GROUP)["pending"] == 0
    registry = DirectoryRegistry(tmp_path / "reg")
    for version in registry.versions():
        assert registry.verify(version).manifest.metrics.accept_length > 1.0
    assert client.xlen(keys.events("default", "test")) == len(registry.versions())


def test_an_imported_specforge_draft_is_continued_gated_as_served_and_rolled_back_to(
        settings: TideSettings, smollm2: Target, traffic: list[CaptureBatch], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    settings = settings.model_copy(update=SMALL)
    monkeypatch.setattr(service, "CONTROL_POLL_S", 0.0)  # read the control state on every look
    heads = heads_of(smollm2.model)
    counts = torch.bincount(torch.cat([b.token_ids for b in traffic]), minlength=heads.config.vocab_size)
    hot = counts.topk(512).indices.sort().values
    source = write_specforge_export(tmp_path / "specforge", hidden_size=576, intermediate_size=256,
                                    num_attention_heads=9, num_key_value_heads=3, head_dim=64,
                                    vocab_size=heads.config.vocab_size, hot_ids=hot, layout="hf",
                                    dtype=torch.bfloat16)
    weights = load_file(str(source / "model.safetensors"))  # a SpecForge draft that started from its target
    weights["lm_head.weight"] = heads.lm_head[hot].to(torch.bfloat16)
    weights["norm.weight"] = heads.norm.to(torch.bfloat16)
    save_file(weights, str(source / "model.safetensors"), metadata={"format": "pt"})
    registry = DirectoryRegistry(tmp_path / "reg", create=True)
    import_draft(source, registry)

    _write(settings, traffic)
    trainer = _trainer(settings, tmp_path / "reg", smollm2)
    v0 = registry.load_tensors(0)[1]
    assert trainer.state.parent == 0 and torch.equal(trainer.draft.d2t, v0["d2t"])  # its vocabulary, its weights
    assert torch.equal(trainer.draft.fc.weight, v0["fc.weight"].float())
    _drain(trainer, sum(b.num_tokens for b in traffic))
    first = trainer.evaluate()
    assert first.deployed_version == 0 and first.candidate == first.deployed  # gated against v0 as served
    for _ in range(40):
        trainer.train_step()
    assert trainer.evaluate().published == 1 and registry.get(1).parent == 0
    client = connect(settings)
    events = rollout.read_events(client, settings.namespace, settings.deployment)
    assert [(e.version, e.parent) for _, e in events] == [(1, 0)]

    ns, dep = settings.namespace, settings.deployment
    rollout.write_control(client, ns, dep, rollout.ControlState(stable=0, canary=1, canary_pods=("pod-a",)))
    assert trainer.follow_rollbacks() is None  # v1 serves as the canary: keep training it
    rollout.write_control(client, ns, dep, rollout.ControlState(stable=0))  # the operator rolled v1 back
    assert trainer.follow_rollbacks() == 0 and trainer.state.parent == 0
    assert torch.equal(trainer.draft.fc.weight, v0["fc.weight"].float())  # v1's weights are not trained further
    assert trainer.follow_rollbacks() is None


@pytest.mark.parametrize(("interval_s", "idle_ms"), [(5.0, 30_000), (60.0, 120_000), (600.0, 1_200_000)])
def test_entries_are_reclaimed_only_after_a_live_trainer_would_have_acked_them(interval_s: float,
                                                                               idle_ms: int) -> None:
    """A live trainer acks at its checkpoints: another trainer must not claim its pending entries sooner."""
    from tide_sglang.trainer.cli import reclaim_idle_ms

    idle = reclaim_idle_ms(TideSettings(train_checkpoint_interval_s=interval_s))
    assert idle == idle_ms and idle > interval_s * 1000


def test_trainer_run_survives_dropped_connections_and_acks_at_checkpoints(
        settings: TideSettings, smollm2: Target, traffic: list[CaptureBatch], tmp_path: Path) -> None:
    """Issue 18: a dropped Redis connection is retried, not fatal; entries stay pending until a checkpoint holds
    them, then are acked (all of them, once)."""
    settings = settings.model_copy(update={**SMALL, "train_checkpoint_dir": tmp_path / "ckpt",
                                           "train_checkpoint_interval_s": 1.0})
    _write(settings, traffic)
    # Not training: the trainer then waits in its blocking reads, where a killed connection is felt (one that
    # trains reads without waiting, between slices, and misses most kills).
    trainer = _trainer(settings, tmp_path / "reg", smollm2, should_train=lambda: False)
    stop, errors = threading.Event(), []

    def run() -> None:
        try:
            trainer.run(stop, slice_s=0.05)
        except Exception as e:  # the test fails on it below
            errors.append(e)

    thread = threading.Thread(target=run)
    thread.start()
    admin = connect(settings)
    try:
        # Until the reader has felt one (a trainer busy in a long step on a loaded machine may miss a few kills).
        deadline = time.monotonic() + 30
        for kills in range(1000):
            if kills >= 6 and (trainer.reader.stats.redis_errors or time.monotonic() > deadline):
                break
            time.sleep(0.2)
            admin.client_kill_filter(_type="normal", skipme=True)
        total = sum(b.num_tokens for b in traffic)
        wait_for(lambda: trainer.ingested_rows == total or not thread.is_alive(), timeout=60, what="ingestion")
        wait_for(lambda: admin.xpending(keys.hidden_states("default", "test"), keys.TRAINER_GROUP)["pending"] == 0
                 or not thread.is_alive(), timeout=30, what="the checkpoint's acks")
    finally:
        stop.set()
        thread.join(60)
    assert not errors and trainer.ingested_rows == total
    assert trainer.reader.stats.redis_errors > 0  # the kills were felt, and survived
    assert ckpt.load_latest(tmp_path / "ckpt") is not None
