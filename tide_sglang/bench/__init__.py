"""Benchmarks: each compares ways side by side in one run, prints what it measured and writes JSON.

A benchmark module exposes `run(quick: bool, console: Console) -> BenchReport`; `tide bench NAME` finds it in
`BENCHMARKS`. Absolute times count only from a GPU; on the CPU machines the ratios are what to read.
"""

import json
import platform
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, Field

from tide_sglang import __version__


class Goal(BaseModel):
    name: str
    value: float
    unit: str
    target: str = Field(description="human-readable comparison, e.g. '< 50' or '>= 400'")
    met: bool


def goal(name: str, value: float, unit: str, op: str, bound: float) -> Goal:
    ops = {"<": value < bound, "<=": value <= bound, ">": value > bound, ">=": value >= bound}
    return Goal(name=name, value=round(value, 4), unit=unit, target=f"{op} {bound:g}", met=ops[op])


def machine() -> dict[str, Any]:
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    import os

    return {
        "host": platform.node(),
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "gpu": gpu,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "tide": __version__,
    }


class BenchReport(BaseModel):
    name: str
    quick: bool
    date: str = Field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    machine: dict[str, Any] = Field(default_factory=machine)
    figures: dict[str, Any]
    goals: list[Goal]

    def write(self, directory: Path) -> Path:
        directory.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        path = directory / f"{self.name}-{stamp}.json"
        path.write_text(json.dumps(self.model_dump(), indent=2) + "\n")
        return path


BENCHMARKS = {
    "stream": "tide_sglang.bench.stream",
    "adapt": "tide_sglang.bench.adapt",
    "train": "tide_sglang.bench.train",
    "control": "tide_sglang.bench.control",
    "capture": "tide_sglang.bench.capture",
    "faults": "tide_sglang.bench.faults",
    "train-gate": "tide_sglang.bench.train_gate",
}
