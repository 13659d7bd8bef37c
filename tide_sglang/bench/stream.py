"""`tide bench stream`: captured hidden states, engine -> trainer, through Redis Streams vs per-request files.

For each model shape, one run: a producer (the engine's thread) submits CaptureBatches, a consumer in another
process reads, decodes, verifies and acks them. The baseline in the same run is the TIDE paper's transport:
per-request files written with `torch.save` by the engine and loaded back by a reader process.

The producer offers load as fast as the transport drains it (it pauses while the writer's queue is half full),
so the figure is the sustained capacity with nothing dropped; caller-side enqueue time is timed per call.
"""

import multiprocessing as mp
import os
import shutil
import tempfile
import time
from multiprocessing.connection import Connection
from multiprocessing.sharedctypes import Synchronized
from pathlib import Path

import numpy as np
import redis
import torch
from pydantic import BaseModel
from rich.console import Console
from rich.table import Table

from tide_sglang import keys
from tide_sglang.bench import BenchReport, goal
from tide_sglang.capture import CaptureBatch
from tide_sglang.settings import TideSettings
from tide_sglang.stream import StreamReader, StreamWriter, connect
from tide_sglang.stream.server import LocalRedis

MIB = 1 << 20
TOKENS_PER_ENTRY = 64  # accepted rows of one verify step at batch ~32
SHAPES = {"smollm2-135m": 576, "llama-3.1-8b": 4096, "gpt-oss-120b": 2880}  # H; K = 3 aux layers, bf16


class Delivery(BaseModel):
    entries: int
    tokens: int
    bytes: int
    finished_at: float  # time.time(), comparable across processes on one machine


class TransportResult(BaseModel):
    transport: str
    shape: str
    entry_mib: float
    seconds: float
    mib_s: float
    tokens_s: float
    enqueue_p50_us: float
    enqueue_p99_us: float
    lost: int  # dropped by the writer or trimmed before the consumer read it
    redis_peak_mib: float | None = None


def _batch(hidden: int, seed: int) -> CaptureBatch:
    g = torch.Generator().manual_seed(seed)
    n = TOKENS_PER_ENTRY
    return CaptureBatch(
        rids=[f"r{seed}-{i}" for i in range(8)],
        req_index=torch.arange(n) // (n // 8),
        positions=torch.arange(n) + 100,
        token_ids=torch.randint(0, 128_000, (n,), generator=g),
        is_prompt=torch.zeros(n, dtype=torch.bool),
        hidden=torch.randn(n, 3 * hidden, generator=g).to(torch.bfloat16),
        vocab_size=128_256,  # Llama 3's
    )


# -- consumer process ----------------------------------------------------------------------------------------


def _consume_stream(url: str, stream: str, expected: Connection, progress: Synchronized) -> Delivery:
    reader = StreamReader(connect(TideSettings(redis_url=url)), stream, stream + ":dead", "bench", count=8,
                          block_ms=50)
    total: int | None = None
    entries = tokens = size = 0
    while total is None or entries < total:
        got = reader.read()
        reader.ack(got)
        entries += len(got)
        progress.value = entries
        tokens += sum(e.batch.num_tokens for e in got)
        size += sum(e.size_bytes for e in got)
        if total is None and expected.poll():
            total = expected.recv()
        elif total is not None and not got:
            break  # drained: whatever is still missing was trimmed by MAXLEN before it was read
    return Delivery(entries=entries, tokens=tokens, bytes=size, finished_at=time.time())


def _consume_files(directory: str, expected: Connection, progress: Synchronized) -> Delivery:
    total: int | None = None
    entries = tokens = size = 0
    while total is None or entries < total:
        names = sorted(n for n in os.listdir(directory) if n.endswith(".pt"))
        for name in names:
            path = os.path.join(directory, name)
            size += os.path.getsize(path)
            record = torch.load(path, weights_only=True)
            tokens += record["token_ids"].numel()
            os.unlink(path)
            entries += 1
            progress.value = entries
        if not names:
            time.sleep(0.001)
        if total is None and expected.poll():
            total = expected.recv()
    return Delivery(entries=entries, tokens=tokens, bytes=size, finished_at=time.time())


def _consumer_main(conn: Connection, progress: Synchronized) -> None:
    """Worker loop: one consume job per command, so the process (and its torch import) is reused."""
    while (job := conn.recv()) is not None:
        kind, arg1, arg2 = job
        if kind == "stream":
            delivery = _consume_stream(arg1, arg2, conn, progress)
        else:
            delivery = _consume_files(arg1, conn, progress)
        conn.send(delivery)


# -- producer side ---------------------------------------------------------------------------------------------

WINDOW = 24  # entries the producer may run ahead of the consumer: the figure is what the whole path sustains


class Consumer:
    """The consumer process, reused for every run, with a shared counter of entries it has finished."""

    def __init__(self) -> None:
        ctx = mp.get_context("spawn")
        self.progress: Synchronized = ctx.Value("q", 0)
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_consumer_main, args=(child, self.progress), daemon=True)
        self.proc.start()

    def start(self, kind: str, arg1: str, arg2: str | None) -> None:
        self.progress.value = 0
        self.conn.send((kind, arg1, arg2))

    def behind(self, produced: int) -> bool:
        return produced - self.progress.value > WINDOW

    def finish(self, produced: int) -> Delivery:
        self.conn.send(produced)
        return self.conn.recv()

    def close(self) -> None:
        self.conn.send(None)
        self.proc.join(10)


def _percentiles(samples_ns: list[int]) -> tuple[float, float]:
    a = np.asarray(samples_ns, dtype=np.float64) / 1e3
    return float(np.percentile(a, 50)), float(np.percentile(a, 99))


def _run_stream(shape: str, hidden: int, seconds: float, consumer: Consumer) -> TransportResult:
    batches = [_batch(hidden, s) for s in range(4)]
    with LocalRedis() as server:
        settings = TideSettings(redis_url=server.url, deployment="bench")
        stream = keys.hidden_states("default", "bench")
        writer = StreamWriter(lambda: connect(settings, check=False), stream, budget_bytes=512 * MIB,
                              queue_entries=settings.stream_queue_entries)
        consumer.start("stream", server.url, stream)
        time.sleep(0.5)  # let the consumer create its group before the clock starts
        samples: list[int] = []
        start, end, i = time.time(), time.monotonic() + seconds, 0
        while time.monotonic() < end:
            if writer.backlog >= settings.stream_queue_entries // 2 or consumer.behind(i):
                time.sleep(0.001)  # the engine would be running its next forward here
                continue
            t0 = time.perf_counter_ns()
            writer.submit(batches[i % 4])
            samples.append(time.perf_counter_ns() - t0)
            i += 1
        stats = writer.close()
        delivery = consumer.finish(stats.sent_entries)
        peak = int(redis.Redis.from_url(server.url).info("memory")["used_memory_peak"]) / MIB
    lost = stats.dropped + stats.sent_entries - delivery.entries
    return _result("redis-stream", shape, delivery, start, samples, lost, peak)


def _run_files(shape: str, hidden: int, seconds: float, consumer: Consumer) -> TransportResult:
    batches = [_batch(hidden, s) for s in range(4)]
    directory = tempfile.mkdtemp(prefix="tide-bench-files-", dir=Path.cwd())
    try:
        consumer.start("files", directory, None)
        samples: list[int] = []
        start, end, i = time.time(), time.monotonic() + seconds, 0
        while time.monotonic() < end:
            if consumer.behind(i):
                time.sleep(0.001)
                continue
            b = batches[i % 4]
            record = {"hidden": b.hidden, "token_ids": b.token_ids, "positions": b.positions}
            path = os.path.join(directory, f"{i:09d}")
            t0 = time.perf_counter_ns()
            torch.save(record, path + ".tmp")
            os.rename(path + ".tmp", path + ".pt")  # the reader only sees whole files
            samples.append(time.perf_counter_ns() - t0)
            i += 1
        delivery = consumer.finish(i)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    return _result("torch.save-files", shape, delivery, start, samples, i - delivery.entries, None)


def _result(transport: str, shape: str, d: Delivery, start: float, samples: list[int], lost: int,
            peak: float | None) -> TransportResult:
    seconds = d.finished_at - start
    p50, p99 = _percentiles(samples)
    return TransportResult(
        transport=transport, shape=shape, entry_mib=d.bytes / max(d.entries, 1) / MIB, seconds=seconds,
        mib_s=d.bytes / MIB / seconds, tokens_s=d.tokens / seconds, enqueue_p50_us=p50, enqueue_p99_us=p99,
        lost=lost, redis_peak_mib=peak,
    )


def _table(results: list[TransportResult]) -> Table:
    table = Table(title="hidden-state transport, producer -> consumer on loopback")
    for col in ("shape", "transport", "MiB/entry", "MiB/s", "tokens/s", "put p50 µs", "put p99 µs", "lost",
                "Redis MiB"):
        table.add_column(col, justify="right" if col not in ("shape", "transport") else "left")
    for r in results:
        peak = f"{r.redis_peak_mib:.0f}" if r.redis_peak_mib is not None else "-"
        table.add_row(r.shape, r.transport, f"{r.entry_mib:.2f}", f"{r.mib_s:.0f}", f"{r.tokens_s:,.0f}",
                      f"{r.enqueue_p50_us:.1f}", f"{r.enqueue_p99_us:.1f}", str(r.lost), peak)
    return table


def run(quick: bool, console: Console) -> BenchReport:
    seconds = 1.0 if quick else 6.0
    consumer = Consumer()
    results: list[TransportResult] = []
    try:
        with console.status("") as status:
            for shape, hidden in SHAPES.items():
                status.update(f"{shape}: Redis stream ({seconds:g} s)")
                results.append(_run_stream(shape, hidden, seconds, consumer))
                status.update(f"{shape}: torch.save files ({seconds:g} s)")
                results.append(_run_files(shape, hidden, seconds, consumer))
    finally:
        consumer.close()
    console.print(_table(results))
    by = {(r.shape, r.transport): r for r in results}
    llama = by[("llama-3.1-8b", "redis-stream")]
    ratios = {s: by[(s, "redis-stream")].mib_s / by[(s, "torch.save-files")].mib_s for s in SHAPES}
    blocking = {s: by[(s, "torch.save-files")].enqueue_p99_us / by[(s, "redis-stream")].enqueue_p99_us
                for s in SHAPES}
    console.print("Redis stream / torch.save files, end-to-end MiB/s: "
                  + ", ".join(f"{s} {r:.2f}x" for s, r in ratios.items()))
    console.print("caller-side p99, torch.save files / Redis stream: "
                  + ", ".join(f"{s} {r:.0f}x" for s, r in blocking.items()))
    worst_p99 = max(r.enqueue_p99_us for r in results if r.transport == "redis-stream")
    return BenchReport(
        name="stream",
        quick=quick,
        figures={"seconds_per_run": seconds, "tokens_per_entry": TOKENS_PER_ENTRY,
                 "results": [r.model_dump() for r in results], "ratio_stream_over_files": ratios,
                 "caller_p99_ratio_files_over_stream": blocking},
        goals=[
            goal("enqueue_p99_us", worst_p99, "us", "<", 50),
            goal("llama8b_sustained_mib_s", llama.mib_s, "MiB/s", ">=", 400),
            goal("llama8b_lost", llama.lost, "entries", "<=", 0),
        ],
    )
