"""`tide bench capture`: what the SGLang plugin's capture path costs a CPU-bound scheduler, in one run.

A real SGLang scheduler at small models is launch-bound: its thread runs Python (batch bookkeeping, kernel
launches) and often waits with the GIL released (CUDA syncs, zmq). A TIDE background thread (finisher, stream
writer) that holds the GIL when the scheduler wants it back stalls the scheduler (convoy effect), and the cost
grows with the batch size. This benchmark reproduces that on the CPU: a simulated scheduler loop does, per batch,
`work_us` of pure Python and `wait_us` of GIL-released waiting (in `waits` sleeps), once alone and once with the
real `Capturer` fed a verify result every batch through its scheduler-thread entry points (`on_verify`, then
`on_commit` of the previous batch, as under overlap scheduling) and a real `StreamWriter` to a local redis-server.

Read the loop-rate ratio (with / without capture) per batch size: the figure is the scheduler's throughput loss.
On the CPU path the device-to-host copy runs synchronously on the scheduler thread (a GPU queues it), so the
scheduler-thread figure is an upper bound of the GPU path's launch cost. Torch runs one intra-op thread here: on
a 2-core machine an OpenMP worker spinning on the second core stalls the simulated scheduler's CPU copies for
milliseconds, an artefact of the CPU path (on a GPU those copies are queued, not run by the scheduler thread).
"""

import random
import statistics
import threading
import time
import types
from typing import Any

import torch
from prometheus_client import CollectorRegistry
from pydantic import BaseModel
from rich.console import Console
from rich.table import Table

from tide_sglang import keys
from tide_sglang.bench import BenchReport, goal
from tide_sglang.plugin.capture import Capturer
from tide_sglang.plugin.metrics import PluginMetrics
from tide_sglang.rollout import StatsReporter
from tide_sglang.settings import TideSettings
from tide_sglang.stream import StreamWriter, connect
from tide_sglang.stream.server import LocalRedis

ND = 4  # rows per request in a verify output: 3 draft steps + 1
WIDTH = 3 * 576  # K*H: SmolLM2-135M, 3 aux layers, bf16
VOCAB = 49_152  # SmolLM2-135M's vocabulary
BATCH_SIZES = (8, 48)
ACCEPT = ((1, 0.82), (2, 0.16), (3, 0.015), (4, 0.005))  # accept length (bonus included) -> share: mean ~1.2
QUICK = {"seconds": 0.4, "reps": 1}


class Params(BaseModel):
    work_us: float = 4000.0  # pure-Python work per batch (holds the GIL)
    wait_us: float = 3000.0  # GIL-released waiting per batch, split into `waits` sleeps
    waits: int = 4
    seconds: float = 3.0  # per timed run
    reps: int = 3  # alone/with pairs per batch size, interleaved; the median ratio is reported


class Arm(BaseModel):
    batch_size: int
    rate_alone: float  # batches/s
    rate_capture: float
    ratio: float  # rate_capture / rate_alone
    loss_pct: float
    ms_per_batch_alone: float
    ms_per_batch_capture: float
    sched_capture_us: float  # per batch, on the scheduler thread: on_verify + on_commit (wall)
    finisher_cpu_us: float  # per batch, CPU time of the finisher thread
    writer_cpu_us: float  # per batch, CPU time of the stream-writer thread
    captured_tokens: int
    drops: int


# -- stand-ins for SGLang objects (the real ScheduleBatch / GenerationBatchResult / Req need SGLang and a GPU) ----


class Req:
    """Stands in for sglang's Req: the capture path reads `rid`, `finished()` and `is_retracted`."""

    def __init__(self, rid: str) -> None:
        self.rid, self.is_retracted = rid, False

    def finished(self) -> bool:
        return False


def _batches(bs: int, count: int, seed: int) -> list[tuple[Any, dict[str, Any]]]:
    """`count` verify outputs at batch `bs`: a ScheduleBatch stand-in and the fields of a GenerationBatchResult."""
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    reqs = [Req(f"req-{bs}-{i}") for i in range(bs)]
    lens, weights = zip(*ACCEPT, strict=True)
    out = []
    for c in range(count):
        batch = types.SimpleNamespace(reqs=reqs, seq_lens=torch.arange(bs, dtype=torch.int64) * 7 + 100 + c)
        fields = {
            "hidden": torch.randn(bs * ND, WIDTH, generator=g).to(torch.bfloat16),
            "next_token_ids": torch.randint(0, VOCAB, (bs * ND,), generator=g, dtype=torch.int64),
            "accept_lens": torch.tensor(rng.choices(lens, weights, k=bs), dtype=torch.int32),
        }
        out.append((batch, fields))
    return out


def _result(fields: dict[str, Any]) -> Any:
    """A fresh GenerationBatchResult stand-in per batch (the plugin parks its pending capture on it)."""
    return types.SimpleNamespace(logits_output=types.SimpleNamespace(hidden_states=fields["hidden"]),
                                 next_token_ids=fields["next_token_ids"], accept_lens=fields["accept_lens"])


# -- the simulated scheduler --------------------------------------------------------------------------------


def _spin(n: int) -> int:
    acc = 0
    for i in range(n):
        acc += i & 7
    return acc


def calibrate(target_us: float = 20_000.0) -> float:
    """Iterations of `_spin` per µs on this machine, nothing else running."""
    n = 10_000
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        _spin(n)
        best = min(best, time.perf_counter() - t0)
    n = max(1, int(n * target_us / 1e6 / best))
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        _spin(n)
        best = min(best, time.perf_counter() - t0)
    return n / (best * 1e6)


def _cpu_s(thread: threading.Thread) -> float:
    return time.clock_gettime(time.pthread_getcpuclockid(thread.ident))


class Loop(BaseModel):
    batches: int
    seconds: float
    capture_ns: int


def scheduler_loop(p: Params, spin_per_us: float, seconds: float, work: list[tuple[Any, dict[str, Any]]],
                   capturer: Capturer | None) -> Loop:
    """Run batches for `seconds`: Python work and GIL-released waits, interleaved; with a capturer, each batch's
    verify is captured and the previous batch's result is committed (overlap scheduling)."""
    chunk = max(1, int(p.work_us * spin_per_us / (p.waits + 1)))
    wait_s = p.wait_us / 1e6 / max(p.waits, 1)
    previous = None
    capture_ns = batches = 0
    start = time.perf_counter()
    end = start + seconds
    while time.perf_counter() < end:
        batch, fields = work[batches % len(work)]
        result = _result(fields)
        _spin(chunk)
        if capturer is not None:
            t0 = time.perf_counter_ns()
            capturer.on_verify(batch, result, ND)
            if previous is not None:
                capturer.on_commit(*previous)
            capture_ns += time.perf_counter_ns() - t0
        previous = (batch, result)
        for _ in range(p.waits):
            time.sleep(wait_s)  # a CUDA sync or a zmq poll: the GIL is released
            _spin(chunk)
        batches += 1
    return Loop(batches=batches, seconds=time.perf_counter() - start, capture_ns=capture_ns)


def _arm(p: Params, bs: int, spin: float, server: LocalRedis) -> Arm:
    work = _batches(bs, 8, seed=bs)
    settings = TideSettings(redis_url=server.url, deployment="bench", stats_flush_s=1.0)
    metrics = PluginMetrics("bench", registry=CollectorRegistry())
    ratios, alone, capture = [], [], []
    sched_us, fin_us, wr_us = [], [], []
    tokens = drops = 0
    for rep in range(p.reps):
        stream = keys.hidden_states("default", f"bench-{bs}-{rep}")
        writer = StreamWriter(lambda: connect(settings, check=False), stream, budget_bytes=256 << 20,
                              queue_entries=settings.stream_queue_entries)
        stats = StatsReporter(lambda: connect(settings, check=False), "default", "bench", interval_s=None)
        capturer = Capturer(settings, writer, metrics, stats, aux_layers=3, device="cpu", vocab_size=VOCAB)
        scheduler_loop(p, spin, min(0.2, p.seconds), work, capturer)  # warm up: connection, ring buffers
        writer.flush()
        a = scheduler_loop(p, spin, p.seconds, work, None)
        f0, w0, t0 = _cpu_s(capturer._thread), _cpu_s(writer._thread), writer.stats.sent_tokens
        dropped0 = capturer.dropped + writer.stats.dropped
        c = scheduler_loop(p, spin, p.seconds, work, capturer)
        f1, w1 = _cpu_s(capturer._thread), _cpu_s(writer._thread)
        capturer.close()
        writer.close()
        tokens += writer.stats.sent_tokens - t0
        drops += capturer.dropped + writer.stats.dropped - dropped0
        ra, rc = a.batches / a.seconds, c.batches / c.seconds
        alone.append(ra)
        capture.append(rc)
        ratios.append(rc / ra)
        sched_us.append(c.capture_ns / 1e3 / c.batches)
        fin_us.append((f1 - f0) * 1e6 / c.batches)
        wr_us.append((w1 - w0) * 1e6 / c.batches)
    ratio = statistics.median(ratios)
    ra, rc = statistics.median(alone), statistics.median(capture)
    return Arm(batch_size=bs, rate_alone=ra, rate_capture=rc, ratio=ratio, loss_pct=(1 - ratio) * 100,
               ms_per_batch_alone=1e3 / ra, ms_per_batch_capture=1e3 / rc,
               sched_capture_us=statistics.median(sched_us), finisher_cpu_us=statistics.median(fin_us),
               writer_cpu_us=statistics.median(wr_us), captured_tokens=tokens, drops=drops)


def _table(arms: list[Arm], p: Params) -> Table:
    table = Table(title=f"simulated scheduler ({p.work_us:g} µs Python + {p.wait_us:g} µs GIL-released in "
                        f"{p.waits} waits per batch), alone vs with TIDE capture")
    for col in ("batch", "alone batch/s", "capture batch/s", "ratio", "loss %", "sched µs/batch",
                "finisher CPU µs/batch", "writer CPU µs/batch", "tokens", "drops"):
        table.add_column(col, justify="right")
    for a in arms:
        table.add_row(str(a.batch_size), f"{a.rate_alone:.1f}", f"{a.rate_capture:.1f}", f"{a.ratio:.3f}",
                      f"{a.loss_pct:.1f}", f"{a.sched_capture_us:.0f}", f"{a.finisher_cpu_us:.0f}",
                      f"{a.writer_cpu_us:.0f}", str(a.captured_tokens), str(a.drops))
    return table


def _arms(p: Params, console: Console) -> tuple[list[Arm], float]:
    arms: list[Arm] = []
    with console.status("calibrating the simulated scheduler's Python work") as status:
        spin = calibrate()
        with LocalRedis() as server:
            for bs in BATCH_SIZES:
                status.update(f"batch {bs}: {p.reps} x (alone, with capture), {p.seconds:g} s each")
                arms.append(_arm(p, bs, spin, server))
    return arms, spin


def run(quick: bool, console: Console, *, work_us: float | None = None, wait_us: float | None = None,
        waits: int | None = None, seconds: float | None = None, reps: int | None = None) -> BenchReport:
    """Parameters left None take Params' defaults (QUICK's under --quick); `tide bench capture -p work_us=3000`."""
    given = {"work_us": work_us, "wait_us": wait_us, "waits": waits, "seconds": seconds, "reps": reps}
    p = Params(**{**(QUICK if quick else {}), **{k: v for k, v in given.items() if v is not None}})
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        arms, spin = _arms(p, console)
    finally:
        torch.set_num_threads(threads)
    console.print(_table(arms, p))
    console.print("scheduler loop rate with / without TIDE capture: "
                  + ", ".join(f"batch {a.batch_size} {a.ratio:.3f} ({a.loss_pct:+.1f} % loss)" for a in arms))
    return BenchReport(
        name="capture",
        quick=quick,
        figures={"params": p.model_dump(), "nd": ND, "width": WIDTH, "dtype": "bf16", "torch_threads": 1,
                 "accept_mean": sum(a * w for a, w in ACCEPT), "spin_per_us": spin,
                 "results": [a.model_dump() for a in arms],
                 "ratio_capture_over_alone": {str(a.batch_size): a.ratio for a in arms}},
        goals=[goal(f"loss_pct_bs{a.batch_size}", a.loss_pct, "%", "<=", 1) for a in arms],
    )
