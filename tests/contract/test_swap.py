"""Hot-swap into SGLang's real `LlamaForCausalLMEagle3`: tampered and wrong-shaped versions are refused and the
old weights stay; a good version is copied in place (same storage, so CUDA graphs stay valid) only when every
rank agrees. Ranks are simulated by the all-reduce function (there is one process here)."""

import json
import time
import types
from pathlib import Path

import pytest
import redis
import torch
from prometheus_client import CollectorRegistry
from safetensors.torch import load_file
from sglang.srt.server_args import prepare_server_args
from sglang.srt.speculative.adaptive_spec_params import AdaptiveSpeculativeParams

import tide_sglang.plugin
from tests.contract.drafts import CONFIG, draft, registry_with, sglang_eagle3
from tests.helpers import wait_for
from tests.specforge import write_specforge_export
from tide_sglang import keys
from tide_sglang.bench.faults import tamper
from tide_sglang.draft import DirectoryRegistry, DraftVocab, Eagle3Draft
from tide_sglang.draft.importer import import_draft
from tide_sglang.draft.registry import WEIGHTS, DraftMetrics
from tide_sglang.plugin import hooks
from tide_sglang.plugin.cli import adaptive_config
from tide_sglang.plugin.metrics import PluginMetrics
from tide_sglang.plugin.runtime import Runtime
from tide_sglang.plugin.swap import baseline_from_dir, never_loaded
from tide_sglang.plugin.swapper import DraftHandle, Swapper
from tide_sglang.rollout import ControlState, StatsReporter, read_heartbeats, write_control, write_forced_steps
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


def test_the_imported_version_0_is_swapped_to_like_any_other_and_heartbeats_say_so(
        tmp_path: Path, target_dir: Path, redis_server, monkeypatch) -> None:
    """A pod serving the user's own SpecForge export (no manifest: version 0) moves to v1, then a pin to v0
    brings the imported weights back; the heartbeat reports each version once it is copied."""
    hot = torch.arange(0, CONFIG.vocab_size, 3)[: CONFIG.draft_vocab_size]
    source = write_specforge_export(
        tmp_path / "specforge", hot_ids=hot, hidden_size=CONFIG.hidden_size,
        intermediate_size=CONFIG.intermediate_size, num_attention_heads=CONFIG.num_attention_heads,
        num_key_value_heads=CONFIG.num_key_value_heads, head_dim=CONFIG.head_dim, vocab_size=CONFIG.vocab_size)
    registry = DirectoryRegistry(tmp_path / "registry", create=True)
    import_draft(source, registry)
    v0 = registry.verify(0)
    registry.publish(Eagle3Draft(v0.config, DraftVocab.from_d2t(load_file(str(v0.weights_path))["d2t"], 100)),
                     parent=0)
    args = prepare_server_args(["--model-path", str(target_dir), "--device", "cpu", "--speculative-algorithm",
                                "EAGLE3", "--speculative-draft-model-path", str(source)])
    model = sglang_eagle3(source, args, monkeypatch)
    model.load_weights([(n, t) for n, t in load_file(str(source / WEIGHTS)).items() if not never_loaded(n)])
    client = redis.Redis.from_url(redis_server.url)
    settings = TideSettings(redis_url=redis_server.url, deployment="test", sync_interval_batches=1)
    handle = DraftHandle(load_weights=model.load_weights, param_names=[n for n, _ in model.named_parameters()],
                         shared=set(), hot_token_ids=[model.hot_token_id], pin=False)
    swapper = Swapper(registry, baseline_from_dir(source), handle, 0, pod="pod-a", namespace="default",
                      deployment="test", client=lambda: client,
                      metrics=PluginMetrics("test", registry=CollectorRegistry()), stats=None)
    runtime = Runtime(settings, swapper.metrics, None, swapper, None, lambda t: None)
    for version in (1, 0):
        write_control(client, "default", "test", ControlState(stable=version))
        swapper.follow()
        assert swapper.staged is not None and swapper.staged.version == version
        runtime.sync(None)
        assert swapper.current == version and swapper.heartbeat().version == version
        beats = read_heartbeats(client, "default", "test", now=time.time(), heartbeat_s=5)
        assert beats["pod-a"].version == version and beats["pod-a"].role == "stable"
    params = dict(model.named_parameters())
    assert torch.equal(params["model.fc.weight"], load_file(str(v0.weights_path))["fc.weight"])


def test_the_controller_is_credited_with_the_versions_held_out_gain_once_it_is_copied(setup) -> None:
    """The trigger takes a version's rise from the trainer's held-out figures in its manifest (a shift arriving
    with the version cannot confound them): staged with the weights, credited on every rank after the copy."""
    registry, _, swapper, settings, metrics, _ = setup
    registry.publish(draft(5), parent=1, metrics=DraftMetrics(accept_length=2.1, parent_accept_length=1.8))
    credited: list[tuple] = []
    rt = Runtime(settings, metrics, None, swapper, None, lambda t: None)
    rt.controller = types.SimpleNamespace(credit=lambda *a: credited.append(a))
    assert swapper.stage(5) is not None and credited == []  # staged, not yet agreed on nor copied
    rt.sync(None)
    assert swapper.current == 5 and credited == [(5, 2.1, 1.8)]


def test_the_stager_never_dies_and_counts_every_failure_in_the_heartbeat(setup) -> None:
    """Issue 19: a config.json that is a list (checksums made to match), a control value that is no number, and
    an unexpected error inside the stager's loop: each is counted as a swap failure; the thread lives on."""
    registry, _, swapper, _, _, client = setup
    tamper(registry.path(4), "config.json", b"[]")
    client.hset(keys.control("default", "test"), mapping={"stable": "²"})
    thread = swapper.start(poll_s=0.01, heartbeat_s=0.01)
    try:
        wait_for(lambda: swapper.swap_failures == 1, what="the malformed control state counted")
        write_control(client, "default", "test", ControlState(stable=4))
        wait_for(lambda: 4 in swapper.failed, what="the list config refused")
        assert "config.json is not a valid draft config" in swapper.failed[4]
        swapper.heartbeat = lambda: (_ for _ in ()).throw(RuntimeError("boom"))  # anything escaping the loop
        wait_for(lambda: swapper.swap_failures >= 3, what="the unexpected error counted")
        assert thread.is_alive()
    finally:
        swapper.stop()
        thread.join(5)


def test_forced_steps_from_the_control_state_run_in_every_slot_and_decode_steps_are_timed(setup, tmp_path) -> None:
    """`tide profile` forces this pod's steps through the control state: the swapper's poll reads them, every slot of
    SGLang's real adaptive params runs them (rounded down to its candidates), and SGLang's own choice is back once
    released. Decode batches are timed into tide_decode_step_seconds by bucket and steps (the capturer stand-in
    only marks the publishing rank)."""
    _, _, swapper, settings, _, client = setup
    tide_sglang.plugin.register()
    config = tmp_path / "adaptive.json"
    config.write_text(json.dumps(adaptive_config([1, 3])))
    params = AdaptiveSpeculativeParams(initial_steps=3, cfg_path=str(config))
    slots = hooks._slots(params)
    capturer = types.SimpleNamespace(sampling=True, collect=True, version=1, ns=0)
    registry = CollectorRegistry()
    rt = Runtime(settings, PluginMetrics("test", registry=registry), capturer, swapper, None, lambda t: None)

    def steps() -> list[int]:
        return [params.get_steps_for_batch(bs) for bs in (1, 8, 200)]

    def sample(name: str) -> float | None:
        return registry.get_sample_value(name, {"deployment": "test", "draft_version": "1", "batch_size": "8",
                                                "draft_steps": "1"})

    try:
        hooks.use_runtime(rt)
        write_forced_steps(client, "default", "test", "pod-a", 2)
        swapper.follow()
        rt.sync(slots)
        assert steps() == [1, 1, 1]  # 2 is no candidate: rounded down to 1 in every slot
        rt.observe([0] * 7, [True] * 7, draft_steps=1, now=10.0)  # the first result: nothing to compare with
        rt.sync(slots)
        rt.observe([0] * 7, [True] * 7, draft_steps=1, now=10.25)  # one batch launched since: 0.25 s
        rt.sync(slots)
        rt.sync(slots)  # two batches launched (a prefill in between): not one batch's time
        rt.observe([0] * 7, [True] * 7, draft_steps=1, now=11.0)
        rt.idle()
        rt.sync(slots)
        rt.observe([0] * 7, [True] * 7, draft_steps=1, now=20.0)  # after an idle scheduler: dropped too
        assert (sample("tide_decode_step_seconds_count"), sample("tide_decode_step_seconds_sum")) == (1.0, 0.25)
        write_forced_steps(client, "default", "test", "pod-a", None)
        swapper.follow()
        rt.sync(slots)
        assert rt.steps.table == {} and steps() == [3, 3, 3]  # SGLang's own choice (initial_steps=3)
    finally:
        hooks.use_runtime(None)
