"""The cost profile `tide bench control` measures, the way `tide profile` measures a server: each step count forced
in turn on the reference engine (`SpecEngine.forced_steps`, what the control state's `force:<pod>` sets), whole
decode steps timed per batch size. The full `tide bench control --quick` is not run here: it trains a static draft
and serves four ways, over five minutes on the loaded 2-core machine (docs/benchmarks.md)."""

import pytest

from tests.helpers import untrained_draft
from tide_sglang.control import Profile
from tide_sglang.draft.target import load_target
from tide_sglang.engine import FixedSteps, SpecEngine
from tide_sglang.engine.profile import profile_by_forcing
from tide_sglang.engine.serve import chat_ids
from tide_sglang.profiler.measure import Plan


def test_profile_by_forcing_times_every_forced_point_whatever_the_controller_says() -> None:
    target = load_target()
    draft = untrained_draft(target)
    engine = SpecEngine(target, draft=draft, draft_version=1, controller=FixedSteps(1))  # 1 unless forced
    prompts = [chat_ids(target.tokenizer, text, 64) for text in ("Tell me about the sea.", "Write a haiku.")]
    run = profile_by_forcing(engine, prompts, Plan(steps=[3], batches=[2], min_samples=3), max_new_tokens=8)
    assert {k: n >= 3 for k, n in run.samples.items()} == {"b=2,g=0": True, "b=2,g=3": True}
    assert engine.forced_steps is None  # released: the controller decides again
    profile = Profile.model_validate_json(run.profile.model_dump_json())
    assert {(t.batch, t.steps) for t in profile.steps} == {(2, 0), (2, 3)}
    assert profile.device == "cpu" and [p.n for p in profile.target] == [2]
    with pytest.raises(ValueError, match="a draft"):
        profile_by_forcing(SpecEngine(target), prompts, Plan(steps=[3], batches=[1]), max_new_tokens=8)
