"""Hot-swap into SGLang's real `LlamaForCausalLMEagle3`: tampered and wrong-shaped versions are refused and the
old weights stay; a good version is copied in place (same storage, so CUDA graphs stay valid) only when every
rank agrees. Ranks are simulated by the all-reduce function (there is one process here)."""

from pathlib import Path

import pytest
import redis
import torch
from prometheus_client import CollectorRegistry
from safetensors.torch import load_file
from sglang.srt.server_args import prepare_server_args

from tests.contract.drafts import CONFIG, draft, registry_with, sglang_eagle3
from tests.helpers import wait_for
from tide_sglang import keys
from tide_sglang.draft.registry import WEIGHTS
from tide_sglang.plugin.metrics import PluginMetrics
from tide_sglang.plugin.runtime import Runtime
from tide_sglang.plugin.swap import baseline_from_dir, never_loaded
from tide_sglang.plugin.swapper import DraftHandle, Swapper
from tide_sglang.rollout import ControlState, StatsReporter, write_control
from tide_sglang.settings import TideSettings


@pytest.fixture
def setup(tmp_path: Path, target_dir: Path, redis_server, monkeypatch):
    wrong = CONFIG.model_copy(update={"intermediate_size": 48})
    registry = registry_with(tmp_path / "registry", draft(0), draft(1), draft(2, wrong), draft(3))
    args = prepare_server_args(["--model-path", str(target_dir), "--device", "cpu", "--speculative-algorithm",
                                "EAGLE3", "--speculative-draft-model-path", str(registry.path(1))])
    model = sglang_eagle3(registry.path(1), args, monkeypatch)
    model.load_weights(list(load_file(str(registry.path(1) / WEIGHTS)).items()))
    with torch.no_grad():
        model.model.embed_tokens.weight.normal_()  # stands in for the target's embedding (SGLang shares it)
    settings = TideSettings(redis_url=redis_server.url, deployment="test", sync_interval_batches=1)
    client = redis.Redis.from_url(redis_server.url)
    metrics = PluginMetrics("test", registry=CollectorRegistry())
    handle = DraftHandle(load_weights=model.load_weights, param_names=[n for n, _ in model.named_parameters()],
                         shared=set(), hot_token_ids=[model.hot_token_id], pin=False)
    swapper = Swapper(registry, baseline_from_dir(registry.path(1)), handle, 1, pod="pod-a", namespace="default",
                      deployment="test", client=lambda: client, metrics=metrics,
                      stats=StatsReporter(lambda: client, "default", "test", interval_s=None))
    return registry, model, swapper, settings, metrics, client


def snapshot(model: torch.nn.Module) -> dict[str, tuple[int, torch.Tensor]]:
    return {n: (p.data_ptr(), p.detach().clone()) for n, p in model.named_parameters()}


def assert_unchanged(model: torch.nn.Module, before: dict[str, tuple[int, torch.Tensor]]) -> None:
    for n, p in model.named_parameters():
        assert p.data_ptr() == before[n][0] and torch.equal(p, before[n][1]), n


def test_tampered_and_wrong_shaped_versions_are_refused_and_old_weights_stay(setup) -> None:
    registry, model, swapper, _, metrics, client = setup
    weights = registry.path(4) / WEIGHTS
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0xFF  # one flipped bit in the stored weights
    weights.write_bytes(bytes(data))
    before = snapshot(model)
    assert swapper.stage(4) is None and "sha256" in swapper.failed[4]
    assert swapper.stage(3) is None and "intermediate" not in swapper.failed[3]
    assert "wrong shape" in swapper.failed[3] and "mlp.down_proj.weight" in swapper.failed[3]
    assert not swapper.apply_agreed(3) and not swapper.apply_agreed(4) and swapper.current == 1
    assert_unchanged(model, before)
    assert metrics.swap_failures.labels(deployment="test", draft_version="3")._value.get() == 1
    swapper.stats.flush()
    assert client.hget(keys.stats("default", "test", 4), "swap_failures") == b"1"


def test_a_good_version_is_copied_in_place_only_when_all_ranks_agree(setup) -> None:
    registry, model, swapper, settings, metrics, client = setup
    write_control(client, "default", "test", ControlState(stable=1, canary=2, canary_pods=("pod-a",)))
    swapper.start(0.02)
    wait_for(lambda: swapper.staged is not None, what="the stager to stage v2")
    swapper.stop()
    before = snapshot(model)
    other_rank = torch.tensor([1, -1])  # another rank still on v1: MIN/MAX disagree, nobody copies
    lagging = Runtime(settings, metrics, None, swapper, None, lambda t: t.copy_(torch.minimum(t, other_rank)))
    lagging.sync(None)
    assert swapper.current == 1
    assert_unchanged(model, before)

    Runtime(settings, metrics, None, swapper, None, lambda t: None).sync(None)  # every rank staged v2
    assert swapper.current == 2 and swapper.staged is None
    v2 = load_file(str(registry.path(2) / WEIGHTS))
    params = dict(model.named_parameters())
    for name, p in params.items():
        assert p.data_ptr() == before[name][0], f"{name} was reallocated: CUDA graphs would read stale memory"
        if never_loaded(name):
            assert torch.equal(p, before[name][1]), f"{name} is the target's tensor"
    assert torch.equal(params["model.fc.weight"], v2["fc.weight"])
    assert torch.equal(params["model.layers.0.mlp.down_proj.weight"], v2["midlayer.mlp.down_proj.weight"])
    assert metrics.version.labels(deployment="test")._value.get() == 2
