"""DraftRegistry: atomic versions, verify() that rejects anything unsafe, delete, one vocabulary per lineage."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.test_draft import TINY, tiny_draft
from tide_sglang.draft import DraftMetrics, DraftRegistry, DraftVerificationError, Eagle3Draft, VocabMismatch
from tide_sglang.draft.registry import MANIFEST, WEIGHTS, Manifest, _sha256


def _rehash(path: Path, name: str) -> None:
    """Make the manifest agree with a modified file, so only the deeper checks can catch the change."""
    manifest = json.loads((path / MANIFEST).read_text())
    manifest["files"][name] = {"sha256": _sha256(path / name), "bytes": (path / name).stat().st_size}
    (path / MANIFEST).write_text(json.dumps(manifest))


def test_publish_verify_load_round_trip(tmp_path: Path) -> None:
    registry = DraftRegistry(tmp_path / "reg", create=True)
    draft = tiny_draft()
    m1 = registry.publish(draft, metrics=DraftMetrics(accept_length=1.5, training_tokens=10))
    m2 = registry.publish(draft, parent=m1.version)
    assert (m1.version, m2.version, m2.parent) == (1, 2, 1)
    assert registry.versions() == [1, 2] and registry.latest() == 2
    assert [m.version for m in registry.list()] == [1, 2] and registry.get(1).metrics.accept_length == 1.5

    verified = registry.verify(2)
    assert verified.config == TINY and verified.manifest.vocab_sha256 == draft.vocab.sha256()
    assert verified.manifest.tensors["lm_head.weight"].shape == [40, 32]
    assert sorted(p.name for p in verified.path.iterdir()) == ["config.json", "manifest.json", "model.safetensors"]
    loaded = registry.load(2, draft.embed_tokens.weight)
    for name, t in draft.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], t), name


def test_verify_rejects_corruption_shape_and_config_changes(tmp_path: Path) -> None:
    registry = DraftRegistry(tmp_path, create=True)
    for _ in range(4):
        registry.publish(tiny_draft())
    # 1: one flipped byte in the weights
    weights = registry.path(1) / WEIGHTS
    raw = bytearray(weights.read_bytes())
    raw[-3] ^= 0xFF
    weights.write_bytes(bytes(raw))
    with pytest.raises(DraftVerificationError, match=r"v1 .*model.safetensors does not match its sha256"):
        registry.verify(1)
    # 2: a tensor of the wrong shape, with checksums made consistent
    tensors = load_file(str(registry.path(2) / WEIGHTS))
    tensors["lm_head.weight"] = tensors["lm_head.weight"][:39].clone()
    save_file(tensors, str(registry.path(2) / WEIGHTS))
    _rehash(registry.path(2), WEIGHTS)
    with pytest.raises(DraftVerificationError, match=r"wrong shape/dtype \[\('lm_head.weight', \[39, 32\]"):
        registry.verify(2)
    # 3: a config edited to another architecture size
    body = json.loads((registry.path(3) / "config.json").read_text())
    (registry.path(3) / "config.json").write_text(json.dumps({**body, "intermediate_size": 65}))
    _rehash(registry.path(3), "config.json")
    with pytest.raises(DraftVerificationError, match=r"manifest tensors disagree with config\.json"):
        registry.verify(3)
    # 4: a missing file
    (registry.path(4) / "config.json").unlink()
    with pytest.raises(DraftVerificationError, match=r"config\.json is missing"):
        registry.verify(4)
    with pytest.raises(DraftVerificationError, match="v9 does not exist"):
        registry.verify(9)


def test_one_vocabulary_per_lineage(tmp_path: Path) -> None:
    registry = DraftRegistry(tmp_path, create=True)
    registry.publish(tiny_draft(0))
    with pytest.raises(VocabMismatch, match="fixed within a lineage"):
        registry.publish(tiny_draft(1))  # another seed picks another vocabulary
    assert registry.versions() == [1]


def test_delete_refuses_versions_in_use_and_stale_temporaries_go(tmp_path: Path) -> None:
    registry = DraftRegistry(tmp_path, create=True)
    for _ in range(3):
        registry.publish(tiny_draft())
    stale = tmp_path / ".tmp-dead"
    stale.mkdir()
    os.utime(stale, (time.time() - 7200, time.time() - 7200))
    fresh = tmp_path / ".tmp-publishing"
    fresh.mkdir()
    with pytest.raises(ValueError, match="in use"):
        registry.delete(3, in_use={1, 3})  # the stable or canary version, or one a DraftVersion names
    registry.delete(2, in_use={1, 3})
    with pytest.raises(FileNotFoundError):
        registry.delete(2, in_use=set())
    assert registry.versions() == [1, 3] and registry.remove_stale_tmp() == [stale] and fresh.exists()
    assert registry.publish(tiny_draft()).version == 4  # numbers never go back


def test_missing_registry_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        DraftRegistry(tmp_path / "nope")


_PUBLISHER = """
import sys, torch
from tests.test_draft import tiny_draft
from tide_sglang.draft import DraftRegistry
registry, draft = DraftRegistry(sys.argv[1]), tiny_draft()
print("ready", flush=True)
while True:
    registry.publish(draft)
"""


@pytest.mark.parametrize("delay_s", [0.05, 0.21])
def test_publish_killed_half_way_leaves_no_visible_version(tmp_path: Path, delay_s: float) -> None:
    """SIGKILL a process publishing in a loop: every visible version verifies; leftovers are only temporaries."""
    proc = subprocess.Popen([sys.executable, "-c", _PUBLISHER, str(tmp_path)], stdout=subprocess.PIPE,
                            cwd=Path(__file__).parents[1])
    assert proc.stdout is not None and proc.stdout.readline().strip() == b"ready"
    time.sleep(delay_s)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    registry = DraftRegistry(tmp_path)
    for version in registry.versions():
        assert isinstance(registry.verify(version).manifest, Manifest)
    assert all(p.name.startswith(".tmp-") for p in tmp_path.iterdir() if not p.name.startswith("v"))
    registry.remove_stale_tmp(stale_s=0)
    assert not list(tmp_path.glob(".tmp-*"))


def test_from_tensors_rejects_a_foreign_embedding_shape() -> None:
    draft = tiny_draft()
    with pytest.raises(RuntimeError, match="embed_tokens"):
        Eagle3Draft.from_tensors(TINY, draft.draft_tensors(), torch.zeros(99, 32))
