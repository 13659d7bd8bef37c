"""A TIDE step decision overrides SGLang's real adaptive params (through the patched get_steps_for_batch), and
ranks end up with the same table: the element-wise MIN of their proposals. With TIDE_CONTROL_PROFILE, the decision
is TIDE's SpeculationController's, fed by the acceptance of committed decode results."""

import json
import types
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from prometheus_client import REGISTRY, CollectorRegistry
from sglang.srt.managers.schedule_batch import FINISH_LENGTH, Req, ScheduleBatch
from sglang.srt.managers.utils import GenerationBatchResult
from sglang.srt.model_executor.forward_batch_info import ForwardMode
from sglang.srt.sampling.sampling_params import SamplingParams
from sglang.srt.speculative.adaptive_spec_params import AdaptiveSpeculativeParams

import tide_sglang.plugin
from tide_sglang.control import Profile
from tide_sglang.plugin import build, hooks
from tide_sglang.plugin.cli import adaptive_config
from tide_sglang.plugin.metrics import PluginMetrics
from tide_sglang.plugin.runtime import Runtime
from tide_sglang.plugin.speculation import ProfileError, StepTable, choose_steps
from tide_sglang.settings import TideSettings


@pytest.mark.parametrize(("decision", "candidates", "steps"),
                         [(5, [0, 1, 3], 3), (3, [0, 1, 3], 3), (2, [0, 1, 3], 1), (0, [0, 1, 3], 0), (0, [2, 4], 2)])
def test_choose_steps_rounds_down_to_a_candidate(decision: int, candidates: list[int], steps: int) -> None:
    assert choose_steps(decision, candidates) == steps


@pytest.fixture
def params(tmp_path: Path) -> AdaptiveSpeculativeParams:
    tide_sglang.plugin.register()
    path = tmp_path / "adaptive.json"
    path.write_text(json.dumps(adaptive_config([1, 3])))
    return AdaptiveSpeculativeParams(initial_steps=3, cfg_path=str(path))


def test_agreed_decision_overrides_adaptive_steps(params: AdaptiveSpeculativeParams) -> None:
    slots = {bs: list(slot.candidate_steps) for bs, slot in params._slots.items()}
    other_rank = torch.full((2 + len(slots),), 1 << 40)
    other_rank[2 + sorted(slots).index(64)] = 1  # another rank proposes 1 step at batch 64: MIN wins
    rt = Runtime(TideSettings(sync_interval_batches=1), PluginMetrics("test", registry=CollectorRegistry()), None,
                 None, StepTable(lambda bs: 5 if bs < 16 else 0 if bs < 64 else 3),
                 lambda t: t.copy_(torch.minimum(t, other_rank)))
    try:
        hooks.use_runtime(rt)
        assert params.get_steps_for_batch(4) == 3  # before any agreement: SGLang's own choice
        rt.sync(slots)
        # 200 routes to the slot of 128, whose proposal is 3
        assert [params.get_steps_for_batch(bs) for bs in (1, 8, 16, 40, 64, 200)] == [3, 3, 0, 0, 1, 3]
    finally:
        hooks.use_runtime(None)


@pytest.fixture
def controlled(tmp_path: Path, monkeypatch) -> Iterator[Path]:
    """TIDE_CONTROL_PROFILE names a profile whose draft step costs 0.8 target decode steps at batch 1: speculation
    pays only at high acceptance (the prior is 0.95, so the controller starts on)."""
    profile = Profile.roofline(0.010, 1e-4, 0.008).save(tmp_path / "profile.json")
    for name, value in {"TIDE_CONTROL_PROFILE": str(profile), "TIDE_DEPLOYMENT": "test",
                        "TIDE_SYNC_INTERVAL_BATCHES": "1", "TIDE_CONTROL_PRIOR_ACCEPTANCE": "0.95"}.items():
        monkeypatch.setenv(name, value)
    hooks.reset_runtime()
    yield profile
    hooks.reset_runtime()


def decode_result(accept_lens: list[int], nd: int) -> GenerationBatchResult:
    """A decode result as process_batch_result_decode leaves it: SGLang's `_resolve_spec_v2_tokens` turned the
    host accept lengths into `num_correct_drafts_per_req_cpu` (accept_len - 1) after waiting for `copy_done`."""
    accept = torch.tensor(accept_lens, dtype=torch.int32)
    return GenerationBatchResult(next_token_ids=torch.zeros(len(accept_lens) * nd, dtype=torch.int32),
                                 accept_lens=accept, speculative_num_draft_tokens=nd,
                                 num_correct_drafts_per_req_cpu=[n - 1 for n in accept_lens])


def test_controller_chooses_steps_and_low_acceptance_turns_speculation_off(
        params: AdaptiveSpeculativeParams, controlled: Path) -> None:
    # Built from the environment as in a scheduler process; no draft worker here, so no capture or swap.
    hooks.use_runtime(hooks.build_runtime(TideSettings(), None))
    worker = types.SimpleNamespace(draft_worker=types.SimpleNamespace(),
                                   adaptive_controller=types.SimpleNamespace(params=params))
    batch = ScheduleBatch(reqs=[Req(f"r{i}", "", [1, 2, 3], SamplingParams(max_new_tokens=64)) for i in range(4)],
                          seq_lens=torch.tensor([10, 20, 30, 40]), forward_mode=ForwardMode.DECODE)
    hooks.before_forward(worker, batch)  # the sync point: builds the controller over the slots' steps, agrees
    controller = hooks.get_runtime(None).controller
    assert controller is not None and controller.policy.candidates == [0, 1, 3]
    assert [params.get_steps_for_batch(bs) for bs in (1, 2, 64, 128)] == [3, 3, 0, 0]

    def gauge(bs: int) -> float | None:
        return REGISTRY.get_sample_value("tide_speculation_steps", {"deployment": "test",
                                                                    "draft_version": "0", "batch_size": str(bs)})

    assert [gauge(bs) for bs in (1, 2, 64, 128)] == [3, 3, 0, 0]

    # One decode verify at 3 draft steps: the committed requests accept 1 draft token in all. r3 finished in the
    # previous batch (overlap scheduling ran it once more): its 4 accepted tokens do not count.
    result = decode_result([1, 2, 1, 4], nd=4)
    batch.reqs[3].finished_reason = FINISH_LENGTH(64)
    hooks.before_commit(None, batch, result)
    batch.reqs[0].finished_reason = FINISH_LENGTH(64)  # SGLang's processing finishes r0: it still counted
    hooks.after_commit(None, None, batch, result)
    assert controller.acceptance() < 0.3

    hooks.before_forward(worker, batch)
    assert [params.get_steps_for_batch(bs) for bs in (1, 2, 64, 128)] == [0, 0, 0, 0]
    assert [gauge(bs) for bs in (1, 2, 64, 128)] == [0, 0, 0, 0]


def test_a_bad_profile_stops_the_engine_at_its_first_batch(params: AdaptiveSpeculativeParams, controlled: Path,
                                                             monkeypatch) -> None:
    controlled.write_text("{")
    worker = types.SimpleNamespace(draft_worker=types.SimpleNamespace(),
                                   adaptive_controller=types.SimpleNamespace(params=params))
    monkeypatch.setattr(build, "_is_publisher", lambda: False)  # no capture: only the profile is under test
    with pytest.raises(ProfileError, match="TIDE_CONTROL_PROFILE="):
        hooks.before_forward(worker, None)  # unguarded: the scheduler stops instead of serving without control


def test_a_pending_profile_leaves_sglangs_steps_until_it_is_written(params: AdaptiveSpeculativeParams,
                                                                    controlled: Path, monkeypatch) -> None:
    """`tide serve`'s start-up profile: TIDE_CONTROL_PROFILE names a file `tide profile` has not written yet. The
    engine serves with SGLang's own steps; once the file exists, the next sync point starts the controller."""
    profile = Profile.load(controlled)
    controlled.unlink()
    monkeypatch.setenv("TIDE_CONTROL_PROFILE_PENDING", "1")
    monkeypatch.setattr(build, "_is_publisher", lambda: False)
    worker = types.SimpleNamespace(draft_worker=types.SimpleNamespace(),
                                   adaptive_controller=types.SimpleNamespace(params=params))
    for _ in range(3):
        hooks.before_forward(worker, None)
    assert hooks.get_runtime(None).controller is None
    assert [params.get_steps_for_batch(bs) for bs in (1, 128)] == [3, 3]  # SGLang's own (initial_steps=3)
    profile.save(controlled)
    hooks.before_forward(worker, None)
    assert hooks.get_runtime(None).controller is not None
    assert [params.get_steps_for_batch(bs) for bs in (1, 128)] == [3, 0]


def test_sglang_ema_does_not_switch_a_slot_tide_decides(params: AdaptiveSpeculativeParams) -> None:
    """Seen on the H100: SGLang's own EMA switched steps after each verify and TIDE's table switched them back
    before the next batch. Once TIDE decides a slot, SGLang's update leaves it alone; other slots keep theirs."""
    slots = {bs: list(slot.candidate_steps) for bs, slot in params._slots.items()}
    rt = Runtime(TideSettings(sync_interval_batches=1), PluginMetrics("test", registry=CollectorRegistry()), None,
                 None, StepTable(lambda bs: 3), lambda t: None)
    zero_acceptance = [0] * 8
    try:
        hooks.use_runtime(rt)
        rt.sync(slots)
        before = params._route(8).current_steps
        assert all(params.on_verify_complete(zero_acceptance, 8) is None for _ in range(200))
        assert params._route(8).current_steps == before and params.get_steps_for_batch(8) == 3
        hooks.use_runtime(None)  # without TIDE's table, SGLang's EMA drops the steps of zero acceptance
        assert any(params.on_verify_complete(zero_acceptance, 8) is not None for _ in range(200))
        assert params._route(8).current_steps < before
    finally:
        hooks.use_runtime(None)
