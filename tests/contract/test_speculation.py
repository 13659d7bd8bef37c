"""A TIDE step decision overrides SGLang's real adaptive params (through the patched get_steps_for_batch), and
ranks end up with the same table: the element-wise MIN of their proposals."""

import json
from pathlib import Path

import pytest
import torch
from prometheus_client import CollectorRegistry
from sglang.srt.speculative.adaptive_spec_params import AdaptiveSpeculativeParams

import tide_sglang.plugin
from tide_sglang.plugin import hooks
from tide_sglang.plugin.cli import adaptive_config
from tide_sglang.plugin.metrics import PluginMetrics
from tide_sglang.plugin.runtime import Runtime
from tide_sglang.plugin.speculation import StepTable, choose_steps
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
