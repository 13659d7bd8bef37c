"""A TIDE checkpoint through SGLang's real `LlamaForCausalLMEagle3.load_weights`, and hot-swap refusals."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from sglang.srt.server_args import prepare_server_args

from tests.contract.drafts import draft, registry_with, sglang_eagle3
from tide_sglang.draft.registry import WEIGHTS
from tide_sglang.plugin.swap import MAPS, never_loaded, sglang_name, uncovered


@pytest.fixture(scope="module")
def server_args(target_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    registry = registry_with(tmp_path_factory.mktemp("args-registry"), draft(0))
    return prepare_server_args(["--model-path", str(target_dir), "--device", "cpu", "--speculative-algorithm",
                                "EAGLE3", "--speculative-draft-model-path", str(registry.path(1))])


def _record_loaders(model: torch.nn.Module) -> list[str]:
    """Wrap every parameter's weight_loader so the test sees which parameter each checkpoint tensor reached."""
    from sglang.srt.model_loader.weight_utils import default_weight_loader

    calls: list[str] = []
    for name, param in model.named_parameters():
        original = getattr(param, "weight_loader", default_weight_loader)

        def loader(p, w, *shard, _name=name, _original=original):
            calls.append(_name)
            return _original(p, w, *shard)

        param.weight_loader = loader
    return calls


def test_every_tide_checkpoint_name_is_consumed_by_sglang(tmp_path: Path, server_args, monkeypatch) -> None:
    registry = registry_with(tmp_path / "registry", draft(0))
    model = sglang_eagle3(registry.path(1), server_args, monkeypatch)
    calls = _record_loaders(model)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float("nan"))
    tensors = load_file(str(registry.path(1) / WEIGHTS))
    weights = [(n, t) for n, t in tensors.items() if not never_loaded(n)]
    model.load_weights(weights)

    loaded = [n for n, _ in weights if n not in MAPS]
    assert calls == [sglang_name(n) for n in loaded]  # one loader call per tensor, where our mapping says
    params = dict(model.named_parameters())
    for name, p in params.items():
        if never_loaded(name):
            assert p.isnan().all(), f"{name} is the target's tensor and must not be loaded"
        else:
            assert not p.isnan().any(), f"{name} got no weights from the TIDE checkpoint"
    assert uncovered(params, tensors, shared=set()) == []
    assert torch.equal(model.hot_token_id, tensors["d2t"] + torch.arange(tensors["d2t"].numel()))
    q, k, v = (tensors[f"midlayer.self_attn.{x}_proj.weight"] for x in "qkv")
    assert torch.equal(params["model.layers.0.self_attn.qkv_proj.weight"], torch.cat([q, k, v]))
    lm_head = params["lm_head.weight"]  # SGLang pads the vocabulary dimension to a multiple of 64
    assert torch.equal(lm_head[: tensors["lm_head.weight"].shape[0]], tensors["lm_head.weight"])


def test_uncovered_names_a_parameter_without_weights() -> None:
    params = ["model.fc.weight", "model.norm.weight", "model.embed_tokens.weight", "lm_head.weight"]
    assert uncovered(params, ["fc.weight", "norm.weight", "d2t"], shared=set()) == ["lm_head.weight"]
    assert uncovered(params, ["fc.weight", "norm.weight"], shared={"lm_head.weight"}) == []
