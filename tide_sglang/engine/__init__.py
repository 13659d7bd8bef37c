"""Engine: the reference speculative engine (HF target + TIDE draft) for the demo, CPU tests and GPU benchmarks."""

from tide_sglang.engine.chain import committed_rows, greedy_accept, truncate_at_eos
from tide_sglang.engine.engine import FixedSteps, SpecEngine, StepController, StepStats

__all__ = [
    "FixedSteps",
    "SpecEngine",
    "StepController",
    "StepStats",
    "committed_rows",
    "greedy_accept",
    "truncate_at_eos",
]
