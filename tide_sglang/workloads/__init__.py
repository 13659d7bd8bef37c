"""Offline prompt workloads and drift schedules for the reference engine, the demo and benchmarks.

Every source is an installed package (no hub, no network); a missing one raises `WorkloadUnavailable`
with the install command. Loaders return plain user messages: the engine applies the chat template.
Nothing here imports the engine, plugin or trainer.
"""

from tide_sglang.workloads.benchmarks import load_gsm_symbolic, load_humaneval, load_mtbench, load_writing
from tide_sglang.workloads.handbook import load_french, load_german, load_handbook
from tide_sglang.workloads.prompt import Prompt, WorkloadUnavailable
from tide_sglang.workloads.registry import (
    WORKLOADS,
    Split,
    UnknownWorkload,
    Workload,
    get_workload,
    load_workload,
    split_of,
)
from tide_sglang.workloads.schedule import (
    DEFAULT_SPEC,
    Phase,
    PhasePlan,
    Schedule,
    ScheduleError,
    default_schedule,
    parse_schedule,
    plan_schedule,
)
from tide_sglang.workloads.sharegpt import TruncatedJSON, iter_json_array, load_sharegpt

__all__ = [
    "DEFAULT_SPEC",
    "WORKLOADS",
    "Phase",
    "PhasePlan",
    "Prompt",
    "Schedule",
    "ScheduleError",
    "Split",
    "TruncatedJSON",
    "UnknownWorkload",
    "Workload",
    "WorkloadUnavailable",
    "default_schedule",
    "get_workload",
    "iter_json_array",
    "load_french",
    "load_german",
    "load_gsm_symbolic",
    "load_handbook",
    "load_humaneval",
    "load_mtbench",
    "load_sharegpt",
    "load_workload",
    "load_writing",
    "parse_schedule",
    "plan_schedule",
    "split_of",
]
