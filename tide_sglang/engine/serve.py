"""Serve a drift schedule through the reference engine: waves of requests, stats to Redis, hot swaps between steps.

Shared by `tide demo` and `tide bench adapt`, so both measure exactly the same serving loop.
"""

import time
import uuid
from collections.abc import Callable, Iterator, Sequence

from pydantic import BaseModel
from transformers import PreTrainedTokenizerBase

from tide_sglang.engine.engine import SpecEngine, StepStats
from tide_sglang.engine.swap import DraftFollower
from tide_sglang.rollout import StatsReporter
from tide_sglang.workloads import PhasePlan


class StepRecord(StepStats):
    t: float  # seconds since serving started, at the end of the step
    phase: str


class PhaseSummary(BaseModel):
    phase: str
    domain: str | None
    start: float  # seconds since serving started
    seconds: float
    tokens: int
    tokens_per_s: float
    accept_length: float  # tokens emitted per request verify step (1.0 when speculation is off)
    speculative_share: float  # fraction of steps that drafted
    versions: list[int]  # draft versions that drafted in this phase


def _phase(records: list[StepRecord], start: float) -> PhaseSummary:
    seconds = max(records[-1].t - start, 1e-9)
    tokens = sum(r.emitted for r in records)
    return PhaseSummary(
        phase=records[0].phase, domain=records[0].domain, start=round(start, 3), seconds=round(seconds, 3),
        tokens=tokens, tokens_per_s=round(tokens / seconds, 2),
        accept_length=round(tokens / max(sum(r.batch_size for r in records), 1), 3),
        speculative_share=round(sum(r.draft_steps > 0 for r in records) / len(records), 3),
        versions=sorted({r.draft_version for r in records if r.draft_steps}),
    )


def phase_summaries(records: list[StepRecord]) -> list[PhaseSummary]:
    """Per-phase figures, in serving order (a phase runs from the end of the previous one to its last step)."""
    phases: list[PhaseSummary] = []
    start, current = 0.0, []
    for r in records:
        if current and r.phase != current[0].phase:
            phases.append(_phase(current, start))
            start, current = current[-1].t, []
        current.append(r)
    if current:
        phases.append(_phase(current, start))
    return phases


class ServeOptions(BaseModel):
    batch_size: int = 8
    max_new_tokens: int = 64
    max_prompt_tokens: int = 192


def chat_ids(tokenizer: PreTrainedTokenizerBase, text: str, max_prompt_tokens: int) -> list[int]:
    """The user message, cut to `max_prompt_tokens` tokens, in the target's chat template."""
    ids = tokenizer(text, add_special_tokens=False).input_ids[:max_prompt_tokens]
    message = [{"role": "user", "content": tokenizer.decode(ids)}]
    return list(tokenizer.apply_chat_template(message, add_generation_prompt=True, tokenize=True,
                                              return_dict=False))


def _waves(plan: PhasePlan, size: int) -> Iterator[Sequence]:
    prompts = plan.prompts
    for i in range(0, len(prompts), size):
        yield prompts[i : i + size]


def serve(engine: SpecEngine, plans: list[PhasePlan], options: ServeOptions, *,
          follower: DraftFollower | None = None, reporter: StatsReporter | None = None,
          on_record: Callable[[StepRecord], None] | None = None) -> list[StepRecord]:
    """Run every phase in order; returns one record per verify step. Ctrl-C propagates after the current step."""
    records: list[StepRecord] = []
    start = time.monotonic()
    tokenizer = engine.target.tokenizer

    def swap() -> None:
        if follower is None:
            return
        if (swap_to := follower.poll()) is not None:
            engine.set_draft(swap_to.draft, swap_to.version)
        engine.collect = follower.collect

    def on_step(stats: StepStats, phase: str) -> None:
        record = StepRecord(**stats.model_dump(), t=time.monotonic() - start, phase=phase)
        records.append(record)
        if reporter is not None and stats.draft_steps:
            reporter.add(stats.draft_version, tokens=stats.batch_size * stats.draft_steps,
                         accepted=stats.accepted, verify_steps=stats.batch_size)
        if on_record is not None:
            on_record(record)
        swap()

    swap()
    for plan in plans:
        for n, wave in enumerate(_waves(plan, options.batch_size)):
            ids = [chat_ids(tokenizer, p.text, options.max_prompt_tokens) for p in wave]
            # unique, as SGLang's are: two pods (or two rounds) reusing a rid would interleave in the trainer's
            # sequences, which are stitched by rid and position
            rids = [f"{plan.phase.name}-{n}-{i}-{uuid.uuid4().hex[:12]}" for i in range(len(wave))]
            engine.generate(ids, options.max_new_tokens, rids=rids, domain=plan.phase.workload,
                            on_step=lambda s, name=plan.phase.name: on_step(s, name))
    if reporter is not None:
        reporter.flush()
    return records
