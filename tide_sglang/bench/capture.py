"""`tide bench capture`: what the SGLang plugin's capture path costs a CPU-bound scheduler, in one run.

A real SGLang scheduler at small models is launch-bound: its thread runs Python (batch bookkeeping, kernel
launches) and often waits with the GIL released (CUDA syncs, zmq). Any TIDE thread in its process that holds the
GIL when the scheduler wants it back stalls the scheduler (convoy effect), which is why capture keeps O(1) Python
per batch on the scheduler thread and moves everything else to a helper process. This benchmark reproduces the
setting on the CPU: a simulated scheduler loop does, per batch, `work_us` of pure Python and `wait_us` of
GIL-released waiting (in `waits` sleeps), once alone and once with the real `Capturer` fed every batch through its
scheduler-thread entry points (`on_verify`, then the previous batch's commit flags and `on_committed`, as under
overlap scheduling), the real slab and the real helper process writing to a local redis-server.

Read the loop-rate ratio (with / without capture) per batch size: the figure is the scheduler's throughput loss.
On the CPU path the device-to-host copy into the slab runs synchronously on the scheduler thread (a GPU queues
it), so the scheduler-thread figure is an upper bound of the GPU path's launch cost. Torch runs one intra-op
thread here: on a 2-core machine an OpenMP worker spinning on the second core stalls the simulated scheduler's
CPU copies for milliseconds, an artefact of the CPU path (on a GPU those copies are queued, not run by the
scheduler thread).
"""

import os
import random
import statistics
import time
import types
from pathlib import Path
from typing import Any

import redis
import torch
from pydantic import BaseModel
from rich.console import Console
from rich.table import Table

from tide_sglang import keys
from tide_sglang.bench import BenchReport, goal
from tide_sglang.plugin.capture import Capturer, flags
from tide_sglang.plugin.link import HelperLink
from tide_sglang.plugin.slab import FREE, Slab
from tide_sglang.rollout.stats import read_stats
from tide_sglang.settings import TideSettings
from tide_sglang.stream.server import LocalRedis

ND = 4  # rows per request in a verify output: 3 draft steps + 1
WIDTH = 3 * 576  # K*H: SmolLM2-135M, 3 aux layers, bf16
VOCAB = 49_152
BATCH_SIZES = (8, 48)
GPU_BATCH_SIZES = (1, 8, 32, 64, 128)  # the running batches of the SGLang capture run (docs/sglang.md)
ACCEPT = ((1, 0.82), (2, 0.16), (3, 0.015), (4, 0.005))  # accept length (bonus included) -> share: mean ~1.2
QUICK = {"seconds": 0.4, "reps": 1}


class Params(BaseModel):
    work_us: float = 4000.0  # pure-Python work per batch (holds the GIL)
    wait_us: float = 3000.0  # GIL-released waiting per batch, split into `waits` sleeps
    waits: int = 4
    seconds: float = 3.0  # per timed run
    reps: int = 3  # alone/with pairs per batch size, interleaved; the median ratio is reported
    device: str = "cpu"  # "cuda": the rows live on the GPU and the copy into the pinned slab is queued there


class Arm(BaseModel):
    batch_size: int
    rate_alone: float  # batches/s
    rate_capture: float
    ratio: float  # rate_capture / rate_alone
    loss_pct: float
    ms_per_batch_alone: float
    ms_per_batch_capture: float
    sched_capture_us: float  # per batch, on the scheduler thread: TIDE's entry points (wall)
    verify_us: float  # per batch, scheduler-thread CPU time in each entry point: on_verify
    commit_us: float  # the commit flags, read before SGLang's processing
    committed_us: float  # on_committed (the slot's ids and accepts, counts, finishes, posting finished copies)
    sched_share_pct: float  # sched_capture_us over the batch time with capture
    helper_cpu_us: float  # per batch, CPU time of the capture helper process (its own core, no GIL shared)
    captured_tokens: int
    drops: int


# -- stand-ins for SGLang objects (the real ScheduleBatch / GenerationBatchResult / Req need SGLang and a GPU) ----


class Req:
    """Stands in for sglang's Req: the capture path reads `rid`, `finished_reason`, `is_retracted`, its tag and, at
    admission, `sampling_params.custom_params` (no domain here, as for an untagged request)."""

    def __init__(self, rid: str) -> None:
        self.rid, self.finished_reason, self.is_retracted, self._tide_tag = rid, None, False, -1
        self.sampling_params = types.SimpleNamespace(custom_params=None)


def _batches(bs: int, count: int, seed: int, device: str = "cpu") -> list[tuple[Any, dict[str, Any]]]:
    """`count` verify outputs at batch `bs`: a ScheduleBatch stand-in and the fields of a GenerationBatchResult."""
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    reqs = [Req(f"req-{bs}-{i}") for i in range(bs)]
    lens, weights = zip(*ACCEPT, strict=True)
    out = []
    for c in range(count):
        seq = torch.arange(bs, dtype=torch.int64) * 7 + 100 + c
        batch = types.SimpleNamespace(reqs=reqs, seq_lens=seq.to(device))
        accept = rng.choices(lens, weights, k=bs)
        fields = {
            "hidden": torch.randn(bs * ND, WIDTH, generator=g).to(device, torch.bfloat16),
            "next_token_ids": torch.randint(0, 49_152, (bs * ND,), generator=g, dtype=torch.int64).to(device),
            "accept_lens": torch.tensor(accept, dtype=torch.int32, device=device),
            "correct": [a - 1 for a in accept],
        }
        out.append((batch, fields))
    return out


def _result(fields: dict[str, Any]) -> Any:
    """A fresh GenerationBatchResult stand-in per batch (the plugin parks its pending capture on it)."""
    return types.SimpleNamespace(logits_output=types.SimpleNamespace(hidden_states=fields["hidden"]),
                                 next_token_ids=fields["next_token_ids"], accept_lens=fields["accept_lens"],
                                 correct=fields["correct"], copy_done=None)


def _copy_to_cpu(result: Any) -> None:
    """SGLang's part after the verify, on a GPU, with or without TIDE: the next ids and accept lengths copied to
    pinned host memory, then `copy_done` recorded (behind TIDE's copies, when it captures)."""
    if result.next_token_ids.is_cuda:
        for name in ("next_token_ids", "accept_lens"):
            t = getattr(result, name)
            setattr(result, name, torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True))
        result.copy_done = torch.cuda.Event()
        result.copy_done.record()


def _wait_copy(result: Any) -> None:
    """SGLang's wait for `copy_done` before it processes a result."""
    if result.copy_done is not None:
        result.copy_done.synchronize()


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


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of process `pid`."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Loop(BaseModel):
    batches: int
    seconds: float
    capture_ns: int
    verify_ns: int = 0  # scheduler-thread CPU time per entry point, summed over the batches
    commit_ns: int = 0
    committed_ns: int = 0


_thread_ns = time.thread_time_ns


def _commit(capturer: Capturer, batch: Any, result: Any, loop: Loop) -> None:
    """What the plugin's commit hooks do around SGLang's processing of a decode result."""
    t0 = _thread_ns()
    fin, committed = flags(batch.reqs)
    loop.commit_ns += _thread_ns() - t0
    _wait_copy(result)
    t1 = _thread_ns()
    capturer.on_committed(result, batch.reqs, fin, committed, result.correct, ND)
    loop.committed_ns += _thread_ns() - t1


def scheduler_loop(p: Params, spin_per_us: float, seconds: float, work: list[tuple[Any, dict[str, Any]]],
                   capturer: Capturer | None) -> Loop:
    """Run batches for `seconds`: Python work and GIL-released waits, interleaved; with a capturer, each batch's
    verify is captured and the previous batch's result is committed (overlap scheduling)."""
    chunk = max(1, int(p.work_us * spin_per_us / (p.waits + 1)))
    wait_s = p.wait_us / 1e6 / max(p.waits, 1)
    previous = None
    loop = Loop(batches=0, seconds=0.0, capture_ns=0)
    start = time.perf_counter()
    end = start + seconds
    while time.perf_counter() < end:
        batch, fields = work[loop.batches % len(work)]
        result = _result(fields)
        _spin(chunk)
        if capturer is not None:
            t0, c0 = time.perf_counter_ns(), _thread_ns()
            capturer.on_verify(batch, result, ND)
            loop.verify_ns += _thread_ns() - c0
            loop.capture_ns += time.perf_counter_ns() - t0
        _copy_to_cpu(result)
        if previous is not None:
            if capturer is not None:
                t0 = time.perf_counter_ns()
                _commit(capturer, *previous, loop)
                loop.capture_ns += time.perf_counter_ns() - t0
            else:
                _wait_copy(previous[1])
        previous = (batch, result)
        for _ in range(p.waits):
            time.sleep(wait_s)  # a CUDA sync or a zmq poll: the GIL is released
            _spin(chunk)
        loop.batches += 1
    loop.seconds = time.perf_counter() - start
    return loop


def _capturer(server: LocalRedis, deployment: str, reqs: list[Req], device: str = "cpu") -> Capturer:
    settings = TideSettings()
    slab = Slab.create(settings.capture_ring_slots, settings.capture_slot_mib << 20)
    if device.startswith("cuda"):
        slab.pin()  # as the plugin does: the copy into the slab stays asynchronous
    config = {"slab": slab.name, "slots": slab.slots, "slot_bytes": slab.slot_bytes, "aux_layers": 3,
              "vocab_size": VOCAB}
    env = {"TIDE_REDIS_URL": server.url, "TIDE_DEPLOYMENT": deployment, "TIDE_STREAM_BUDGET_MIB": "256"}
    capturer = Capturer(slab, HelperLink(slab, config, env), device)
    for r in reqs:
        r._tide_tag = -1
        capturer.on_admit(r)
    return capturer


def _captured(server: LocalRedis, deployment: str) -> tuple[int, int]:
    """(stream entries added, tokens counted in the stats hash: accepted drafts + one bonus per verify step)."""
    client = redis.Redis.from_url(server.url)
    added = int(client.xinfo_stream(keys.hidden_states("default", deployment))["entries-added"])
    stats = read_stats(client, "default", deployment, 0)
    return added, stats.accepted + stats.verify_steps


def _arm(p: Params, bs: int, spin: float, server: LocalRedis) -> Arm:
    work = _batches(bs, 8, seed=bs, device=p.device)
    ratios, alone, capture = [], [], []
    sched_us, helper_us, share = [], [], []
    parts: dict[str, list[float]] = {"verify": [], "commit": [], "committed": []}
    tokens = drops = 0
    for rep in range(p.reps):
        deployment = f"bench-{bs}-{rep}"
        capturer = _capturer(server, deployment, work[0][0].reqs, p.device)
        scheduler_loop(p, spin, min(0.2, p.seconds), work, capturer)  # warm up: helper start, connection
        wait_for_helper(capturer)
        a = scheduler_loop(p, spin, p.seconds, work, None)
        h0, warm_entries = _cpu_s(capturer.link.proc.pid), _captured(server, deployment)[0]
        c = scheduler_loop(p, spin, p.seconds, work, capturer)
        h1 = _cpu_s(capturer.link.proc.pid)
        capturer.close()
        added, counted = _captured(server, deployment)
        tokens += counted
        drops += max(0, c.batches - (added - warm_entries))
        ra, rc = a.batches / a.seconds, c.batches / c.seconds
        alone.append(ra)
        capture.append(rc)
        ratios.append(rc / ra)
        sched_us.append(c.capture_ns / 1e3 / c.batches)
        for part, ns in (("verify", c.verify_ns), ("commit", c.commit_ns), ("committed", c.committed_ns)):
            parts[part].append(ns / 1e3 / c.batches)
        share.append(c.capture_ns / 1e9 / c.seconds * 100)
        helper_us.append((h1 - h0) * 1e6 / c.batches)
    ratio = statistics.median(ratios)
    ra, rc = statistics.median(alone), statistics.median(capture)
    return Arm(batch_size=bs, rate_alone=ra, rate_capture=rc, ratio=ratio, loss_pct=(1 - ratio) * 100,
               ms_per_batch_alone=1e3 / ra, ms_per_batch_capture=1e3 / rc,
               sched_capture_us=statistics.median(sched_us), sched_share_pct=statistics.median(share),
               verify_us=statistics.median(parts["verify"]), commit_us=statistics.median(parts["commit"]),
               committed_us=statistics.median(parts["committed"]),
               helper_cpu_us=statistics.median(helper_us), captured_tokens=tokens, drops=drops)


def wait_for_helper(capturer: Capturer, timeout: float = 60.0) -> None:
    """Until the helper has taken every slot posted so far (it imports torch when it starts)."""
    end = time.monotonic() + timeout
    while any(f != FREE for f in capturer.slab.flags) and time.monotonic() < end:
        time.sleep(0.05)


def _table(arms: list[Arm], p: Params) -> Table:
    table = Table(title=f"simulated scheduler ({p.work_us:g} µs Python + {p.wait_us:g} µs GIL-released in "
                        f"{p.waits} waits per batch), alone vs with TIDE capture")
    for col in ("batch", "alone batch/s", "capture batch/s", "ratio", "loss %", "sched µs/batch",
                "verify/commit/committed CPU µs", "sched %", "helper CPU µs/batch", "tokens", "drops"):
        table.add_column(col, justify="right")
    for a in arms:
        table.add_row(str(a.batch_size), f"{a.rate_alone:.1f}", f"{a.rate_capture:.1f}", f"{a.ratio:.3f}",
                      f"{a.loss_pct:.1f}", f"{a.sched_capture_us:.0f}",
                      f"{a.verify_us:.0f}/{a.commit_us:.0f}/{a.committed_us:.0f}", f"{a.sched_share_pct:.2f}",
                      f"{a.helper_cpu_us:.0f}", str(a.captured_tokens), str(a.drops))
    return table


def _arms(p: Params, console: Console) -> tuple[list[Arm], float]:
    arms: list[Arm] = []
    with console.status("calibrating the simulated scheduler's Python work") as status:
        spin = calibrate()
        with LocalRedis() as server:
            for bs in GPU_BATCH_SIZES if p.device.startswith("cuda") else BATCH_SIZES:
                status.update(f"batch {bs}: {p.reps} x (alone, with capture), {p.seconds:g} s each")
                arms.append(_arm(p, bs, spin, server))
    return arms, spin


def _device_name(device: str) -> str:
    return torch.cuda.get_device_name() if device.startswith("cuda") else "cpu"


def run(quick: bool, console: Console, *, work_us: float | None = None, wait_us: float | None = None,
        waits: int | None = None, seconds: float | None = None, reps: int | None = None,
        device: str | None = None) -> BenchReport:
    """Parameters left None take Params' defaults (QUICK's under --quick); `tide bench capture -p work_us=3000`.
    `--device cuda` (on a GPU machine): the same loop with the rows on the GPU, batch sizes 1 to 128."""
    given = {"work_us": work_us, "wait_us": wait_us, "waits": waits, "seconds": seconds, "reps": reps,
             "device": device}
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
        figures={"params": p.model_dump(), "device": _device_name(p.device), "nd": ND, "width": WIDTH,
                 "dtype": "bf16", "torch_threads": 1,
                 "accept_mean": sum(a * w for a, w in ACCEPT), "spin_per_us": spin,
                 "results": [a.model_dump() for a in arms],
                 "ratio_capture_over_alone": {str(a.batch_size): a.ratio for a in arms}},
        goals=[*(goal(f"loss_pct_bs{a.batch_size}", a.loss_pct, "%", "<=", 1) for a in arms),
               *(goal(f"sched_share_pct_bs{a.batch_size}", a.sched_share_pct, "%", "<=", 1) for a in arms),
               goal("drops", sum(a.drops for a in arms), "batches", "<=", 0)],
    )
