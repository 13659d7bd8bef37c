"""Profiles of the reference engine for the speculation policy.

`profile_by_forcing` is `tide profile`'s method (profiler/measure.py) in process: every candidate step count forced
in turn through `SpecEngine.forced_steps` (the attribute the control state's `force:<pod>` sets in `tide engine`),
whole decode steps of waves of b requests timed by the engine's own step clock. `profile_engine` times isolated
target forwards and draft steps at one context instead (T(n), D0(b)); the online demo still uses it.
"""

import torch
from transformers import DynamicCache

from tide_sglang.control import Profile, batch_grid, bucket, measure_profile, token_grid
from tide_sglang.draft import Eagle3Draft
from tide_sglang.draft.target import Target
from tide_sglang.engine.engine import SpecEngine, StepStats
from tide_sglang.profiler.measure import Plan, ProfileRun, Samples, measure

MAX_WAVES = 64  # per point of profile_by_forcing
CONTEXT = 128  # tokens already in the KV cache while timing, like a request mid-generation


@torch.no_grad()
def profile_engine(target: Target, draft: Eagle3Draft, max_batch: int, max_steps: int, *, repeats: int = 3) -> Profile:
    """Median times on this machine: T(n) for the token counts the policy can ask for, D0(b) for batch sizes."""
    model, device = target.model, next(target.model.parameters()).device

    def context(batch: int) -> DynamicCache:
        cache = DynamicCache()
        model(input_ids=torch.zeros(batch, CONTEXT, dtype=torch.int64, device=device), past_key_values=cache,
              use_cache=True)
        return cache

    cache = context(1)

    def target_forward(n: int) -> None:
        model(input_ids=torch.zeros(1, n, dtype=torch.int64, device=device), past_key_values=cache, use_cache=True,
              output_hidden_states=True)
        cache.crop(-n)  # drop the n new tokens: the same context for the next repeat
        _sync(device)

    def draft_step(b: int) -> None:
        cache = draft.new_cache(b, CONTEXT + 8)
        hidden = torch.zeros(b, 1, draft.config.hidden_size, device=device, dtype=draft.fc.weight.dtype)
        draft.step(hidden, torch.zeros(b, 1, dtype=torch.int64, device=device),
                   torch.full((b, 1), CONTEXT, device=device), cache)
        _sync(device)

    return measure_profile(target_forward, draft_step, token_grid(max_batch, max_steps), batch_grid(max_batch),
                           repeats=repeats, device=str(device))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def profile_by_forcing(engine: SpecEngine, prompts: list[list[int]], plan: Plan, max_new_tokens: int) -> ProfileRun:
    """`plan.batches` waves of b prompts (cycling through `prompts`) per forced step count, until bucket(b) holds
    `plan.min_samples` decode steps at that count (or MAX_WAVES waves: prompts that all end at once); each point
    starts with one untimed wave (allocation, caches)."""
    if not plan.batches or engine.draft is None:
        raise ValueError("profiling the reference engine needs batch sizes to drive and a draft to force steps on")
    cursor = 0

    def wave(b: int, max_new: int) -> list[StepStats]:
        nonlocal cursor
        stats: list[StepStats] = []
        engine.generate([prompts[(cursor + i) % len(prompts)] for i in range(b)], max_new, on_step=stats.append)
        cursor += b
        return stats

    def force(g: int | None) -> None:
        engine.forced_steps = g

    def run(b: int | None, g: int) -> Samples:
        assert b is not None
        wave(b, 2)
        seconds, count = 0.0, 0
        for _ in range(MAX_WAVES):
            if count >= plan.min_samples:
                break
            timed = [s for s in wave(b, max_new_tokens) if s.draft_steps == g and bucket(s.batch_size) == bucket(b)]
            seconds, count = seconds + sum(s.seconds for s in timed), count + len(timed)
        return {bucket(b): (seconds, count)}

    return measure(plan, force, run, device=str(engine.device))
