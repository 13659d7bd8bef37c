"""`tide bench control`: the speculation policy against its alternatives, batch size by batch size, in one run.

On the reference engine with one draft (trained offline on "train" writing prompts, as `tide bench adapt`'s
static draft), each batch size serves the same "eval" writing requests four ways: no speculation, static g = 3,
TIDE's binary switch (g = 3 when the model predicts S > 1) and this policy (g in 0..k, hysteresis). Also: the
speedup the model predicts for static g = 3 at its measured acceptance against the speedup measured. CPU figures
are labelled CPU.
"""

import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from tide_sglang.bench import BenchReport, goal
from tide_sglang.bench.adapt import Size, static_plans, train_offline_draft
from tide_sglang.control import SpeculationController, acceptance_from_tokens, speedup
from tide_sglang.draft import DirectoryRegistry
from tide_sglang.draft.target import heads_of, load_target
from tide_sglang.engine import FixedSteps, SpecEngine
from tide_sglang.engine.online import CPU_TRAINER_ENV
from tide_sglang.engine.profile import profile_by_forcing
from tide_sglang.engine.serve import ServeOptions, chat_ids
from tide_sglang.profiler.measure import Plan
from tide_sglang.settings import TideSettings
from tide_sglang.workloads import Prompt, load_workload

STATIC = 3
WAYS = ("no-spec", "static", "binary", "policy")
SIZES = {
    "quick": (Size(workloads=["writing"], requests=4, batches=[1, 2], max_new_tokens=16, offline_requests=8,
                   offline_steps=20), 1),
    "cpu": (Size(workloads=["writing"], requests=8, batches=[1, 2, 4, 8, 16], max_new_tokens=48,
                 offline_requests=48, offline_steps=300), 2),
    "gpu": (Size(workloads=["writing"], requests=8, batches=[1, 2, 4, 8, 16, 32, 64], max_new_tokens=64,
                 offline_requests=96, offline_steps=600), 2),
}


def eval_prompts() -> list[Prompt]:
    """What every way serves: the "eval" side of the writing workload, never the static draft's training text."""
    return load_workload("writing", 64, 7, split="eval")


def _controller(way: str, profile, settings: TideSettings):
    if way == "no-spec":
        return FixedSteps(0)
    if way == "static":
        return FixedSteps(STATIC)
    return SpeculationController(profile, settings, binary_steps=STATIC if way == "binary" else None,
                                 version=1, registry=None)


def _serve(engine: SpecEngine, prompts: list[list[int]], batch: int, waves: int, max_new: int) -> tuple[float, float]:
    """(tokens/s, acceptance length) over `waves` waves of `batch` requests; the first wave warms up, untimed."""
    tokens = request_steps = 0
    seconds = 0.0
    for w in range(waves + 1):
        wave = [prompts[(w * batch + i) % len(prompts)] for i in range(batch)]
        stats = []
        engine.generate(wave, max_new, on_step=stats.append)
        if w:
            tokens += sum(s.emitted for s in stats)
            request_steps += sum(s.batch_size for s in stats)
            seconds += sum(s.seconds for s in stats)
    return tokens / seconds, tokens / request_steps


def run(quick: bool, console: Console) -> BenchReport:
    gpu = torch.cuda.is_available()
    size, waves = SIZES["quick" if quick else "gpu" if gpu else "cpu"]
    device = "cuda" if gpu else "cpu"
    target = load_target(device=device, dtype=torch.bfloat16 if gpu else torch.float32)
    param = next(target.model.parameters())
    with tempfile.TemporaryDirectory(prefix="tide-bench-control-", dir=Path.cwd()) as tmp:
        offline = static_plans(size)
        with console.status("static draft: capture and train offline"):
            train_offline_draft(target, offline, size, Path(tmp), device)
        draft = DirectoryRegistry(tmp).load(1, heads_of(target.model).embed, str(param.device)).to(param.dtype).eval()
    settings = TideSettings(control_max_steps=4, control_probe_interval=16)
    opts = ServeOptions(max_new_tokens=size.max_new_tokens)
    prompts = [chat_ids(target.tokenizer, p.text, opts.max_prompt_tokens) for p in eval_prompts()]
    # quick: g = 0 and the static g timed (the others from the fitted T and D0), short waves, few samples
    plan = Plan(steps=[0, STATIC] if quick else list(range(settings.control_max_steps + 1)), batches=size.batches,
                min_samples=3 if quick else 16)
    with console.status("cost profile: each step count forced in turn"):
        profiled = profile_by_forcing(SpecEngine(target, draft=draft, draft_version=1), prompts, plan,
                                      8 if quick else size.max_new_tokens)
    profile = profiled.profile
    console.print(f"cost profile: {len(profiled.samples)} points in {profiled.seconds:.0f} s")
    rows = []
    for b in size.batches:
        row: dict[str, float] = {"batch": b}
        for way in WAYS:
            t0 = time.monotonic()
            engine = SpecEngine(target, draft=draft, draft_version=1, controller=_controller(way, profile, settings))
            row[f"{way}_tokens_s"], row[f"{way}_accept_length"] = _serve(engine, prompts, b, waves, size.max_new_tokens)
            console.print(f"batch {b} {way}: {row[f'{way}_tokens_s']:.1f} tokens/s, acceptance length "
                          f"{row[f'{way}_accept_length']:.2f} ({time.monotonic() - t0:.0f} s)")
        a = acceptance_from_tokens(row["static_accept_length"], STATIC)
        row["static_predicted_speedup"] = speedup(profile, a, STATIC, b)
        row["static_measured_speedup"] = row["static_tokens_s"] / row["no-spec_tokens_s"]
        row["policy_vs_best"] = row["policy_tokens_s"] / max(row["no-spec_tokens_s"], row["static_tokens_s"])
        rows.append(row)
    label = "GPU" if gpu else "CPU"
    console.print(_table(rows, label))
    errors = [abs(r["static_predicted_speedup"] / r["static_measured_speedup"] - 1) for r in rows]
    return BenchReport(
        name="control", quick=quick,
        figures={"label": label, "static_steps": STATIC, "profile": profile.model_dump(),
                 "profile_seconds": profiled.seconds, "profile_samples": profiled.samples, "rows": rows,
                 "trainer_env": {k: v for k, v in CPU_TRAINER_ENV.items() if k.startswith("TIDE_")}},
        goals=[goal("policy_vs_best_min", min(r["policy_vs_best"] for r in rows), "x", ">=", 0.98),
               goal("prediction_error_max", max(errors), "fraction", "<=", 0.10)],
    )


def _table(rows: list[dict[str, float]], label: str) -> Table:
    table = Table(title=f"tide bench control ({label}): tokens/s (acceptance length)")
    for col in ("batch", *WAYS, "policy / best", "S predicted", "S measured"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(str(int(r["batch"])), *(f"{r[f'{w}_tokens_s']:.1f} ({r[f'{w}_accept_length']:.2f})"
                                              for w in WAYS),
                      f"{r['policy_vs_best']:.2f}x", f"{r['static_predicted_speedup']:.2f}",
                      f"{r['static_measured_speedup']:.2f}")
    return table
