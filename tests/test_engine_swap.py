"""Hot swap in the reference engine: follow the control hash (real redis-server), refuse a corrupt version and
keep serving, report per-version stats where the operator reads them."""

import pytest
import torch

from tide_sglang import keys
from tide_sglang.draft import DraftConfig, DraftRegistry, init_draft, select_vocab
from tide_sglang.draft.target import Target, heads_of, load_target
from tide_sglang.engine import FixedSteps, SpecEngine
from tide_sglang.engine.swap import DraftFollower
from tide_sglang.rollout import ControlState, StatsReporter, write_control
from tide_sglang.stream import connect


@pytest.fixture(scope="module")
def target() -> Target:
    return load_target()


def _draft(target: Target, seed: int):
    torch.manual_seed(seed)
    heads = heads_of(target.model)
    config = DraftConfig.from_target(target.model.config, 512, target.aux_layer_ids)
    vocab = select_vocab(torch.arange(config.vocab_size).flip(0).float(), 512)
    return init_draft(config, vocab, heads.embed, heads.lm_head, heads.norm)


def test_follow_swap_refuse_and_keep_serving(target, settings, tmp_path):
    client = connect(settings)
    registry = DraftRegistry(tmp_path / "registry", create=True)
    v1 = registry.publish(_draft(target, 1)).version
    v2 = registry.publish(_draft(target, 2), parent=v1).version
    weights = registry.path(v2) / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-100] ^= 0xFF  # a flipped byte on the PVC
    weights.write_bytes(bytes(data))

    ns, dep = settings.namespace, settings.deployment
    reporter = StatsReporter(client, ns, dep, interval_s=0)
    heads = heads_of(target.model)
    follower = DraftFollower(client, registry, ns, dep, "pod-a", heads.embed, reporter=reporter, poll_s=0)
    assert follower.poll() is None  # no control key yet: nothing to load

    write_control(client, ns, dep, ControlState(stable=v1))
    first = follower.poll()
    assert first is not None and first.version == v1 == follower.version and first.draft is not None
    engine = SpecEngine(target, draft=first.draft, draft_version=v1, controller=FixedSteps(2))

    write_control(client, ns, dep, ControlState(stable=v1, canary=v2, canary_pods=("pod-c",)))
    assert follower.poll() is None  # stable pods do not follow the canary
    canary = DraftFollower(client, registry, ns, dep, "pod-c", heads.embed, reporter=reporter, poll_s=0)
    assert canary.poll() is None and v2 in canary.refused
    assert "sha256" in canary.refused[v2]
    assert int(client.hget(keys.stats(ns, dep, v2), "swap_failures")) == 1
    assert canary.poll() is None  # refused once, never retried in a loop
    assert int(client.hget(keys.stats(ns, dep, v2), "swap_failures")) == 1

    ids = [target.tokenizer("The capital of France is").input_ids]
    out = engine.generate(ids, 6)  # still serving on v1
    assert len(out[0]) == 6 and engine.draft_version == v1

    write_control(client, ns, dep, ControlState(stable=0))  # the operator rolls back to the initial
    back = follower.poll()
    assert back is not None and back.version == 0 and back.draft is None  # cold start: no draft at all
