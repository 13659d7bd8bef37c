"""Hot swap in the reference engine: follow the control hash (real redis-server), refuse a corrupt version and
keep serving, report per-version stats where the operator reads them."""

import time

import pytest
import torch

from tests.helpers import untrained_draft
from tide_sglang import keys
from tide_sglang.draft import DirectoryRegistry, DraftMetrics
from tide_sglang.draft.target import Target, heads_of, load_target
from tide_sglang.engine import FixedSteps, SpecEngine
from tide_sglang.engine.pod import PodOptions, run_pod
from tide_sglang.engine.swap import DraftFollower
from tide_sglang.rollout import ControlState, StatsReporter, read_heartbeats, read_stats, write_control
from tide_sglang.stream import StreamWriter, connect


@pytest.fixture(scope="module")
def target() -> Target:
    return load_target()


def test_follow_swap_refuse_report_and_keep_serving(target, settings, tmp_path):
    client = connect(settings)
    registry = DirectoryRegistry(tmp_path / "registry", create=True)
    imported = untrained_draft(target, 0)
    registry.store_initial(imported.config, imported.vocab, imported.draft_tensors())  # `tide import`
    v1 = registry.publish(untrained_draft(target, 1), parent=0,
                          metrics=DraftMetrics(accept_length=1.8, parent_accept_length=1.5)).version
    v2 = registry.publish(untrained_draft(target, 2), parent=v1).version
    weights = registry.path(v2) / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-100] ^= 0xFF  # a flipped byte on the PVC
    weights.write_bytes(bytes(data))

    ns, dep = settings.namespace, settings.deployment
    reporter = StatsReporter(client, ns, dep, interval_s=0)
    heads = heads_of(target.model)
    swaps: list[tuple[int, float | None, float | None]] = []  # what the controller is credited with
    follower = DraftFollower(client, registry, ns, dep, "pod-a", heads.embed, reporter=reporter, poll_s=0, version=0,
                             on_swap=lambda *swap: swaps.append(swap))
    assert follower.poll() is None  # no control state yet: keep serving v0

    write_control(client, ns, dep, ControlState(stable=v1))
    first = follower.poll()
    assert first is not None and first.version == v1 == follower.version
    assert swaps == [(v1, 1.8, 1.5)]  # the manifest's held-out accept lengths, this version's and its parent's
    engine = SpecEngine(target, draft=first.draft, draft_version=v1, controller=FixedSteps(2))

    write_control(client, ns, dep, ControlState(stable=v1, canary=v2, canary_pods=("pod-c",)))
    assert follower.poll() is None  # stable pods do not follow the canary
    canary = DraftFollower(client, registry, ns, dep, "pod-c", heads.embed, reporter=reporter, poll_s=0, version=v1)
    assert canary.poll() is None and v2 in canary.refused
    assert "sha256" in canary.refused[v2]
    assert int(client.hget(keys.stats(ns, dep, v2), "swap_failures")) == 1
    assert canary.poll() is None  # refused once, never retried in a loop
    assert int(client.hget(keys.stats(ns, dep, v2), "swap_failures")) == 1

    ids = [target.tokenizer("The capital of France is").input_ids]
    out = engine.generate(ids, 6)  # still serving on v1
    assert len(out[0]) == 6 and engine.draft_version == v1

    follower.heartbeat(), canary.heartbeat()  # what the heartbeat threads write every TIDE_HEARTBEAT_S
    beats = read_heartbeats(client, ns, dep, now=time.time(), heartbeat_s=settings.heartbeat_s)
    assert {p: (b.role, b.version, b.swap_failures) for p, b in beats.items()} == {
        "pod-a": ("stable", v1, 0), "pod-c": ("canary", v1, 1)}  # the canary pod still serves v1: it refused v2

    write_control(client, ns, dep, ControlState(stable=0, collect=False))  # the operator pins the imported draft
    back = follower.poll()
    assert back is not None and back.version == 0 and swaps[-1] == (0, None, None)  # imported: no held-out figures
    assert torch.equal(back.draft.fc.weight, registry.load_tensors(0)[1]["fc.weight"].float())
    assert not follower.collect
    stream = keys.hidden_states(ns, dep)
    with StreamWriter(lambda: connect(settings), stream) as writer:
        quiet = SpecEngine(target, draft=back.draft, draft_version=0, controller=FixedSteps(2), writer=writer)
        quiet.collect = follower.collect  # what serve() does after every poll
        quiet.generate(ids, 4)
        assert writer.flush() and writer.stats.sent_entries == 0  # collect off: nothing captured


def test_tide_engine_serves_as_one_pod(target, settings, tmp_path):
    """`tide engine` (the stand-in for an SGLang pod in CPU tests): serves the version it was started with,
    reports it in its heartbeat, adds the stats of that version and captures to the stream."""
    registry = DirectoryRegistry(tmp_path / "registry", create=True)
    imported = untrained_draft(target, 0)
    registry.store_initial(imported.config, imported.vocab, imported.draft_tensors())
    pod = settings.model_copy(update={"pod_name": "pod-z", "heartbeat_s": 0.2, "stats_flush_s": 0.1})
    options = PodOptions(registry=registry.location, target="smollm2-135m", schedule="writing:2", version=0, rounds=1,
                         max_new_tokens=8)
    assert run_pod(options, pod) > 0
    client = connect(settings)
    beats = read_heartbeats(client, settings.namespace, settings.deployment, now=time.time(), heartbeat_s=60)
    assert (beats["pod-z"].version, beats["pod-z"].role) == (0, "stable")
    assert read_stats(client, settings.namespace, settings.deployment, 0).tokens > 0
    assert client.xlen(keys.hidden_states(settings.namespace, settings.deployment)) > 0


def test_tide_engine_rounds_draw_new_prompts_unless_repeat(tmp_path):
    options = PodOptions(registry=str(tmp_path), target="smollm2-135m", schedule="writing:2", seed=5)
    assert [options.round_seed(r) for r in range(3)] == [5, 6, 7]
    assert [options.model_copy(update={"repeat": True}).round_seed(r) for r in range(3)] == [5, 5, 5]
