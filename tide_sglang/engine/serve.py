"""Serve a drift schedule through the reference engine: waves of requests, stats to Redis, hot swaps between steps.

Shared by `tide demo` and `tide bench adapt`, so both measure exactly the same serving loop.
"""

import time
import uuid
from collections.abc import Callable, Iterator

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


class Wave(BaseModel):
    """One wave of a phase: up to `batch_size` requests served together, as token ids in the chat template."""

    phase: str
    domain: str
    index: int  # within its phase
    ids: list[list[int]]


def waves(plans: list[PhasePlan], options: ServeOptions, tokenizer: PreTrainedTokenizerBase) -> Iterator[Wave]:
    for plan in plans:
        prompts = plan.prompts
        for n, i in enumerate(range(0, len(prompts), options.batch_size)):
            yield Wave(phase=plan.phase.name, domain=plan.phase.workload, index=n,
                       ids=[chat_ids(tokenizer, p.text, options.max_prompt_tokens)
                            for p in prompts[i : i + options.batch_size]])


class Serving:
    """One engine's serving loop, a wave at a time: hot swaps between steps, stats to Redis, a record per step.
    `start`: the clock records count from (engines served side by side share one)."""

    def __init__(self, engine: SpecEngine, options: ServeOptions, *, follower: DraftFollower | None = None,
                 reporter: StatsReporter | None = None, on_record: Callable[[StepRecord], None] | None = None,
                 start: float | None = None) -> None:
        self.engine, self.options, self.follower, self.reporter = engine, options, follower, reporter
        self.on_record = on_record
        self.start = time.monotonic() if start is None else start
        self.records: list[StepRecord] = []
        self.sync()

    def sync(self) -> None:
        """Take what the control state says now: a new draft version, `collect`, the forced steps. Called between
        steps; a driver that changes the control state between waves (`tide bench train-gate`) calls it before
        the next."""
        if self.follower is None:
            return
        if (swap_to := self.follower.poll()) is not None:
            self.engine.set_draft(swap_to.draft, swap_to.version)
        self.engine.collect = self.follower.collect
        self.engine.forced_steps = self.follower.forced

    def _on_step(self, stats: StepStats, phase: str) -> None:
        record = StepRecord(**stats.model_dump(), t=time.monotonic() - self.start, phase=phase)
        self.records.append(record)
        if self.reporter is not None and stats.draft_steps:
            self.reporter.add(stats.draft_version, **stats.counts())
        if self.on_record is not None:
            self.on_record(record)
        self.sync()

    def serve(self, wave: Wave) -> list[list[int]]:
        """Generate one wave; returns the completions. Ctrl-C propagates after the current step."""
        # unique, as SGLang's are: two pods (or two rounds) reusing a rid would interleave in the trainer's
        # sequences, which are stitched by rid and position
        rids = [f"{wave.phase}-{wave.index}-{i}-{uuid.uuid4().hex[:12]}" for i in range(len(wave.ids))]
        return self.engine.generate(wave.ids, self.options.max_new_tokens, rids=rids, domain=wave.domain,
                                    on_step=lambda s: self._on_step(s, wave.phase))

    def close(self) -> None:
        if self.reporter is not None:
            self.reporter.flush()


def serve(engine: SpecEngine, plans: list[PhasePlan], options: ServeOptions, *,
          follower: DraftFollower | None = None, reporter: StatsReporter | None = None,
          on_record: Callable[[StepRecord], None] | None = None) -> list[StepRecord]:
    """Run every phase in order; returns one record per verify step. Ctrl-C propagates after the current step."""
    serving = Serving(engine, options, follower=follower, reporter=reporter, on_record=on_record)
    for wave in waves(plans, options, engine.target.tokenizer):
        serving.serve(wave)
    serving.close()
    return serving.records
