"""A SpecForge export, and the version 0 `tide import` makes of it, through SGLang's real `LlamaForCausalLMEagle3`:
SGLang reads SpecForge's config.json (no target_hidden_size, no eagle_config) and every parameter gets the same
weights from the source and from v0, so v0 serves exactly what the user trained."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from sglang.srt.server_args import prepare_server_args

from tests.contract.drafts import CONFIG, draft, registry_with, sglang_eagle3
from tests.specforge import write_specforge_export
from tide_sglang.draft import DirectoryRegistry
from tide_sglang.draft.importer import import_draft
from tide_sglang.draft.registry import WEIGHTS
from tide_sglang.plugin.swap import never_loaded, uncovered


@pytest.fixture(scope="module")
def server_args(target_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    registry = registry_with(tmp_path_factory.mktemp("args-registry"), draft(0))
    return prepare_server_args(["--model-path", str(target_dir), "--device", "cpu", "--speculative-algorithm",
                                "EAGLE3", "--speculative-draft-model-path", str(registry.path(1))])


def _served(path: Path, server_args, monkeypatch) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    model = sglang_eagle3(path, server_args, monkeypatch)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float("nan"))
    tensors = load_file(str(path / WEIGHTS))
    model.load_weights([(n, t) for n, t in tensors.items() if not never_loaded(n)])
    params = dict(model.named_parameters())
    assert uncovered(params, tensors, shared=set()) == []
    assert not any(p.isnan().any() for n, p in params.items() if not never_loaded(n)), "a parameter got no weights"
    return {n: p.detach().clone() for n, p in params.items() if not never_loaded(n)}, model.hot_token_id


@pytest.mark.parametrize("layout", ["sglang", "hf"])
def test_specforge_export_and_its_v0_serve_the_same_draft(tmp_path: Path, server_args, monkeypatch,
                                                          layout: str) -> None:
    hot = torch.randperm(CONFIG.vocab_size, generator=torch.Generator().manual_seed(1))[:40].sort().values
    source = write_specforge_export(
        tmp_path / "specforge", layout=layout, hot_ids=hot, hidden_size=CONFIG.hidden_size,
        intermediate_size=CONFIG.intermediate_size, num_attention_heads=CONFIG.num_attention_heads,
        num_key_value_heads=CONFIG.num_key_value_heads, head_dim=CONFIG.head_dim, vocab_size=CONFIG.vocab_size)
    registry = DirectoryRegistry(tmp_path / "registry", create=True)
    import_draft(source, registry)
    from_source, hot_source = _served(source, server_args, monkeypatch)
    from_v0, hot_v0 = _served(registry.path(0), server_args, monkeypatch)
    assert torch.equal(hot_source, hot) and torch.equal(hot_v0, hot)
    assert from_source.keys() == from_v0.keys()
    assert all(torch.equal(from_source[n], from_v0[n]) for n in from_source)
