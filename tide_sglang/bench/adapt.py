"""`tide bench adapt`: one drifting workload served three ways, side by side, at several batch sizes.

    no-spec : the target alone
    static  : a draft trained offline on the first phase's domain only, fixed draft steps; it trains on the
              "train" side of that workload and every arm serves "eval" prompts (workloads.split_of), so it is
              never graded on its own training text
    tide    : starts from that same draft; captures, trains online in a separate process, hot-swaps versions,
              and lets the TIDE policy choose the draft steps (0 = off)

Per phase: tokens/s and acceptance length, the ratios tide/static and tide/no-spec, and the time tide takes to
recover after each shift. Absolute numbers count only on a GPU; on CPU read the ratios.
"""

import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
from pydantic import BaseModel
from rich.console import Console
from rich.table import Table

from tide_sglang import keys
from tide_sglang.bench import BenchReport, goal
from tide_sglang.draft import DirectoryRegistry
from tide_sglang.draft.target import Target, heads_of, load_target
from tide_sglang.engine import FixedSteps, SpecEngine
from tide_sglang.engine.online import (
    CPU_TRAINER_ENV,
    Promoter,
    cpu_trainer_settings,
    online_engine,
    start_trainer,
    stop_trainer,
)
from tide_sglang.engine.serve import PhaseSummary, ServeOptions, StepRecord, phase_summaries, serve
from tide_sglang.rollout import ControlState, write_control
from tide_sglang.settings import TideSettings
from tide_sglang.stream import StreamReader, StreamWriter, connect
from tide_sglang.stream.server import LocalRedis
from tide_sglang.trainer.service import DraftTrainer
from tide_sglang.workloads import PhasePlan, parse_schedule, plan_schedule

STATIC_STEPS = 3


class Size(BaseModel):
    workloads: list[str]
    requests: int  # per phase, at least two waves of the batch size
    batches: list[int]
    max_new_tokens: int
    offline_requests: int
    offline_steps: int

    def schedule(self, batch: int) -> str:
        return ",".join(f"{w}:{max(self.requests, 2 * batch)}" for w in self.workloads)


DRIFT = ["writing", "code", "math", "french"]
SIZES = {
    "quick": Size(workloads=DRIFT[:2], requests=4, batches=[2], max_new_tokens=12, offline_requests=8,
                  offline_steps=20),
    "cpu": Size(workloads=DRIFT, requests=16, batches=[1, 8], max_new_tokens=48, offline_requests=48,
                offline_steps=300),
    "gpu": Size(workloads=DRIFT, requests=8, batches=[1, 8, 32, 64], max_new_tokens=64, offline_requests=96,
                offline_steps=600),
}


class ArmResult(BaseModel):
    arm: str
    batch_size: int
    phases: list[PhaseSummary]
    recovery_s: dict[str, float | None]
    published: list[int] = []


def recovery_seconds(records: list[StepRecord], phase: PhaseSummary, window: int = 20) -> float | None:
    """Seconds from the phase start until the rolling acceptance length (last `window` steps) first reaches 90%
    of where the phase settles (its last quarter); None when it never speculates."""
    steps = [r for r in records if r.phase == phase.phase]
    tail = steps[len(steps) * 3 // 4 :]
    settled = sum(r.emitted for r in tail) / max(sum(r.batch_size for r in tail), 1)
    if settled <= 1.05:
        return None
    for i in range(len(steps)):
        w = steps[max(0, i - window + 1) : i + 1]
        if sum(r.emitted for r in w) / sum(r.batch_size for r in w) >= 0.9 * settled:
            return round(steps[i].t - phase.start, 3)
    return None


def static_plans(size: Size) -> list[PhasePlan]:
    """What the static draft trains on: the first workload's "train" prompts."""
    return plan_schedule(parse_schedule(f"{size.workloads[0]}:{size.offline_requests}"), seed=1000, split="train")


def served_plans(size: Size, batch: int) -> list[PhasePlan]:
    """What every arm serves: "eval" prompts only."""
    return plan_schedule(parse_schedule(size.schedule(batch)), seed=0, split="eval")


def _settings(url: str, **train: object) -> TideSettings:
    return TideSettings(redis_url=url, deployment="bench", **train)


def train_offline_draft(target: Target, plans: list[PhasePlan], size: Size, registry: Path, device: str) -> None:
    """Capture `plans` (the static draft's "train" prompts) with no speculation, then train a draft on them."""
    with LocalRedis() as server:
        settings = _settings(server.url)
        writer = StreamWriter(lambda: connect(settings, check=False), keys.hidden_states("default", "bench"))
        engine = SpecEngine(target, writer=writer)
        serve(engine, plans, ServeOptions(batch_size=8, max_new_tokens=size.max_new_tokens))
        rows = writer.close().sent_tokens
        env = cpu_trainer_settings()
        env["train_vocab_warmup_rows"] = str(rows)  # choose the vocabulary once every captured row is counted
        train = _settings(server.url, registry_dir=registry, train_device=device, **env)
        reader = StreamReader(connect(train), keys.hidden_states("default", "bench"),
                              keys.dead_letter("default", "bench"), "offline", block_ms=100)
        trainer = DraftTrainer(train, DirectoryRegistry(registry, create=True), reader, heads_of(target.model),
                               should_train=lambda: True)
        while trainer.poll():
            pass
        trainer.close_sequences()
        for _ in range(size.offline_steps):
            trainer.train_step()
        assert trainer.draft is not None
        DirectoryRegistry(registry).publish(trainer.draft)


def _run_arm(arm: str, target: Target, plans: list[PhasePlan], batch: int, size: Size, static: Path,
             workdir: Path, device: str) -> ArmResult:
    options = ServeOptions(batch_size=batch, max_new_tokens=size.max_new_tokens)
    if arm == "no-spec":
        records = serve(SpecEngine(target), plans, options)
        return _result(arm, batch, records, [])
    if arm == "static":
        param = next(target.model.parameters())
        draft = DirectoryRegistry(static).load(1, heads_of(target.model).embed, str(param.device))
        draft = draft.to(param.dtype).eval()
        records = serve(SpecEngine(target, draft=draft, draft_version=1, controller=FixedSteps(STATIC_STEPS)),
                        plans, options)
        return _result(arm, batch, records, [])
    registry = workdir / f"tide-b{batch}"
    shutil.copytree(static, registry)  # same lineage: v1 is the static draft
    with LocalRedis() as server:
        settings = _settings(server.url)
        client = connect(settings)
        write_control(client, settings.namespace, "bench", ControlState(stable=1))
        trainer = start_trainer(registry, workdir / f"tide-b{batch}-work", target.name, settings, device=device,
                                env=CPU_TRAINER_ENV)
        promoter = Promoter(client, settings.namespace, "bench")
        promoter.start()
        try:
            parts = online_engine(target, settings, registry, max_batch=batch,
                                  draft_vocab_size=int(CPU_TRAINER_ENV["TIDE_TRAIN_DRAFT_VOCAB_SIZE"]))
            records = serve(parts.engine, plans, options, follower=parts.follower, reporter=parts.reporter)
            parts.writer.close()
            parts.follower.close()
        finally:
            promoter.close()
            stop_trainer(trainer)
    return _result(arm, batch, records, promoter.published)


def _result(arm: str, batch: int, records: list[StepRecord], published: list[int]) -> ArmResult:
    phases = phase_summaries(records)
    return ArmResult(arm=arm, batch_size=batch, phases=phases, published=published,
                     recovery_s={p.phase: recovery_seconds(records, p) for p in phases[1:]})


def _ratios(results: list[ArmResult]) -> list[dict[str, object]]:
    """Per batch size and phase: tokens/s of each arm and tide's ratios over static and over no-spec."""
    rows = []
    for batch in sorted({r.batch_size for r in results}):
        arms = {r.arm: r for r in results if r.batch_size == batch}
        for i, phase in enumerate(arms["tide"].phases):
            tps = {a: arms[a].phases[i].tokens_per_s for a in arms}
            rows.append({
                "batch": batch, "phase": phase.phase, "drifted": i > 0,
                **{f"{a}_tokens_s": v for a, v in tps.items()},
                **{f"{a}_accept_length": arms[a].phases[i].accept_length for a in arms},
                "tide_over_static": tps["tide"] / tps["static"], "tide_over_nospec": tps["tide"] / tps["no-spec"],
                "tide_recovery_s": arms["tide"].recovery_s.get(phase.phase),
            })
    return rows


def _table(rows: list[dict[str, object]], label: str) -> Table:
    table = Table(title=f"tide bench adapt ({label}): tokens/s per phase, acceptance length in brackets")
    for col in ("batch", "phase", "no-spec", "static", "tide", "tide/static", "tide/no-spec", "recovery s"):
        table.add_column(col, justify="left" if col == "phase" else "right")
    for r in rows:
        cells = [f"{r[f'{a}_tokens_s']:.1f} ({r[f'{a}_accept_length']:.2f})" for a in ("no-spec", "static", "tide")]
        rec = r["tide_recovery_s"]
        table.add_row(str(r["batch"]), str(r["phase"]), *cells, f"{r['tide_over_static']:.2f}x",
                      f"{r['tide_over_nospec']:.2f}x", "-" if rec is None else f"{rec:.1f}")
    return table


def run(quick: bool, console: Console) -> BenchReport:
    gpu = torch.cuda.is_available()
    size = SIZES["quick" if quick else "gpu" if gpu else "cpu"]
    if os.environ.get("TIDE_BENCH_BATCHES"):  # split a long run over several calls (docs/benchmarks.md)
        size = size.model_copy(update={"batches": [int(b) for b in os.environ["TIDE_BENCH_BATCHES"].split(",")]})
    device = "cuda" if gpu else "cpu"
    if not gpu:
        torch.set_num_threads(1)  # the other core is the online trainer's
    target = load_target(device=device, dtype=torch.bfloat16 if gpu else torch.float32)
    offline = static_plans(size)
    results: list[ArmResult] = []
    with tempfile.TemporaryDirectory(prefix="tide-bench-adapt-", dir=Path.cwd()) as tmp:
        workdir = Path(tmp)
        static = workdir / "static"
        with console.status(f"static draft: capture {size.offline_requests} {size.workloads[0]} requests, "
                            f"train {size.offline_steps} steps offline"):
            train_offline_draft(target, offline, size, static, device)
        for batch in size.batches:
            plans = served_plans(size, batch)
            for arm in ("no-spec", "static", "tide"):
                t0 = time.monotonic()
                with console.status(f"batch {batch}: {arm} serving {size.schedule(batch)}"):
                    results.append(_run_arm(arm, target, plans, batch, size, static, workdir, device))
                console.print(f"batch {batch} {arm}: {time.monotonic() - t0:.0f} s, tokens/s per phase "
                              + ", ".join(f"{p.tokens_per_s:.0f}" for p in results[-1].phases))
    rows = _ratios(results)
    label = "GPU" if gpu else "CPU"
    console.print(_table(rows, label))
    drifted = [r for r in rows if r["drifted"]]
    return BenchReport(
        name="adapt", quick=quick,
        figures={"label": label, "size": size.model_dump(), "static_steps": STATIC_STEPS, "rows": rows,
                 "arms": [r.model_dump() for r in results]},
        goals=[
            goal("tide_over_static_drifted_min", min(float(r["tide_over_static"]) for r in drifted), "x", ">=", 1.3),
            goal("tide_over_nospec_min", min(float(r["tide_over_nospec"]) for r in rows), "x", ">=", 1.0),
        ],
    )


