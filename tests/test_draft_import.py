"""`tide import`: SpecForge exports (both layouts), SGLang-format drafts with and without d2t, and TIDE versions
become a verified version 0; what cannot be served or trained is refused with the reason."""

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from tests.specforge import write_specforge_export
from tide_sglang.cli import main
from tide_sglang.draft import DirectoryRegistry, DraftConfig, Eagle3Draft, select_vocab
from tide_sglang.draft.importer import DraftImportError, import_draft, read_source

SHAPE = {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
         "head_dim": 8, "vocab_size": 100}
HOT = torch.tensor([0, 2, 3, 7, 11, 20, 42, 64, 98, 99])


def export(tmp_path: Path, name: str = "sf", **kw) -> Path:
    return write_specforge_export(tmp_path / name, **{**SHAPE, "hot_ids": HOT, **kw})


@pytest.mark.parametrize("layout", ["sglang", "hf"])
def test_specforge_export_becomes_version_0(tmp_path: Path, layout: str) -> None:
    source = export(tmp_path, layout=layout)
    registry = DirectoryRegistry(tmp_path / "registry", create=True)
    manifest = import_draft(source, registry)
    assert (manifest.version, manifest.parent, registry.versions()) == (0, None, [0])
    verified, tensors = registry.load_tensors(0)
    config = verified.config
    assert config.target_hidden_size == 32 and config.aux_layer_ids == [] and config.aux_layers == 3
    assert config.torch_dtype == "float32" and config.draft_vocab_size == HOT.numel()
    assert torch.equal(tensors["d2t"] + torch.arange(HOT.numel()), HOT)
    stored = load_file(str(source / "model.safetensors"))
    assert "embed_tokens.weight" not in tensors
    assert all(torch.equal(tensors[n], stored[n]) for n in tensors)  # weights unchanged
    body = json.loads((registry.path(0) / "config.json").read_text())
    assert "eagle_config" not in body  # SGLang picks its default layers, as for the source
    draft = Eagle3Draft.from_tensors(config, tensors, torch.zeros(100, 32))  # the trainer can build it
    assert draft.fc.in_features == 96


def test_sglang_draft_without_d2t_covers_the_whole_vocabulary(tmp_path: Path) -> None:
    source = export(tmp_path, hot_ids=torch.arange(100))
    tensors = load_file(str(source / "model.safetensors"))
    del tensors["d2t"], tensors["t2d"]
    save_file(tensors, str(source / "model.safetensors"))
    draft = read_source(source)
    assert draft.format == "sglang" and torch.equal(draft.vocab.token_ids, torch.arange(100))
    assert torch.equal(draft.tensors["d2t"], torch.zeros(100, dtype=torch.int64))


def test_tide_version_is_checked_against_its_manifest(tmp_path: Path) -> None:
    config = DraftConfig(**SHAPE, target_hidden_size=32, draft_vocab_size=10, aux_layer_ids=[1, 2, 3],
                         torch_dtype="bfloat16")
    other = DirectoryRegistry(tmp_path / "other", create=True)
    other.publish(Eagle3Draft(config, select_vocab(torch.rand(100), 10)))
    mine = DirectoryRegistry(tmp_path / "mine", create=True)
    import_draft(other.path(1), mine)
    assert mine.verify(0).config == config and mine.vocab_sha256() == other.vocab_sha256()
    weights = other.path(1) / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(Exception, match="sha256"):
        read_source(other.path(1))


def test_what_cannot_be_imported_is_refused_with_the_reason(tmp_path: Path) -> None:
    registry = DirectoryRegistry(tmp_path / "registry", create=True)
    import_draft(export(tmp_path), registry)
    with pytest.raises(ValueError, match="already holds versions"):
        import_draft(export(tmp_path, "again"), registry)  # a lineage starts once

    no_head = export(tmp_path, "no-head")
    tensors = load_file(str(no_head / "model.safetensors"))
    del tensors["lm_head.weight"]
    save_file(tensors, str(no_head / "model.safetensors"))
    with pytest.raises(DraftImportError, match="target's lm_head"):
        read_source(no_head)

    unsorted = export(tmp_path, "unsorted")
    tensors = load_file(str(unsorted / "model.safetensors"))
    tensors["d2t"] = tensors["d2t"].flip(0)
    save_file(tensors, str(unsorted / "model.safetensors"))
    with pytest.raises(DraftImportError, match="offset form"):
        read_source(unsorted)

    scaled = export(tmp_path, "scaled")
    body = json.loads((scaled / "config.json").read_text())
    body["rope_parameters"] = {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}
    (scaled / "config.json").write_text(json.dumps(body))
    with pytest.raises(DraftImportError, match="llama3"):
        read_source(scaled)

    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((scaled / "config.json").read_text())
    torch.save({}, pickled / "pytorch_model.bin")
    with pytest.raises(DraftImportError, match="pickle files are never loaded"):
        read_source(pickled)


def test_cli_imports_into_a_new_registry(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["import", str(export(tmp_path)), "--registry", str(tmp_path / "reg")])
    assert result.exit_code == 0, result.output
    assert "v0" in result.output and DirectoryRegistry(tmp_path / "reg").versions() == [0]
    again = CliRunner().invoke(main, ["import", str(export(tmp_path, "b")), "--registry", str(tmp_path / "reg")])
    assert again.exit_code != 0 and "already holds versions" in again.output
