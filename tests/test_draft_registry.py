"""DraftRegistry on both stores, through the same tests: atomic versions, verify() that rejects anything unsafe,
delete, one vocabulary per lineage, a publish killed half way, two publishers at once. The S3 store is a real
SeaweedFS server (conftest.s3_server); its restart mid-publish has its own server."""

import gc
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load, save

from tests.s3server import BUCKET, LocalS3
from tests.test_draft import TINY, tiny_draft
from tide_sglang.draft import (
    DirectoryRegistry,
    DraftMetrics,
    DraftRegistry,
    DraftVerificationError,
    Eagle3Draft,
    VocabMismatch,
    open_registry,
)
from tide_sglang.draft.registry import CONFIG, MANIFEST, WEIGHTS, Manifest, ProfileKey
from tide_sglang.draft.s3 import CLAIM, RegistryUnavailable, S3Registry
from tide_sglang.settings import TideSettings


class Store:
    """Raw access to a registry's stored files, beneath the registry (to tamper with them, or leave debris)."""

    def __init__(self, location: str) -> None:
        self.location = location

    def open(self, create: bool = True) -> DraftRegistry:
        return open_registry(self.location, create=create)

    def read(self, version: int, name: str) -> bytes:
        reg = self.open()
        if isinstance(reg, DirectoryRegistry):
            return (reg.path(version) / name).read_bytes()
        assert isinstance(reg, S3Registry)
        return reg.client.get_object(Bucket=reg.bucket, Key=reg._key(version, name))["Body"].read()

    def write(self, version: int, name: str, data: bytes) -> None:
        reg = self.open()
        if isinstance(reg, DirectoryRegistry):
            (reg.path(version) / name).write_bytes(data)
        else:
            assert isinstance(reg, S3Registry)
            reg.client.put_object(Bucket=reg.bucket, Key=reg._key(version, name), Body=data)

    def remove(self, version: int, name: str) -> None:
        reg = self.open()
        if isinstance(reg, DirectoryRegistry):
            (reg.path(version) / name).unlink()
        else:
            assert isinstance(reg, S3Registry)
            reg.client.delete_object(Bucket=reg.bucket, Key=reg._key(version, name))

    def debris(self) -> list[str]:
        """What is stored besides complete versions: temporaries (directory), numbers without a manifest (S3)."""
        reg = self.open()
        if isinstance(reg, DirectoryRegistry):
            return sorted(p.name for p in reg.root.iterdir() if p.name.startswith(".tmp-"))
        assert isinstance(reg, S3Registry)
        return sorted(f"v{v:06d}/" for v, files in reg._objects().items() if MANIFEST not in files)

    def leave_debris(self) -> None:
        """What a publisher killed before its commit leaves behind."""
        reg = self.open()
        if isinstance(reg, DirectoryRegistry):
            (reg.root / ".tmp-dead").mkdir()
        else:
            assert isinstance(reg, S3Registry)
            reg.client.put_object(Bucket=reg.bucket, Key=reg._key(999, CLAIM), Body=b"{}")


@pytest.fixture(params=["directory", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    if request.param == "directory":
        return Store(str(tmp_path / "reg"))
    return Store(request.getfixturevalue("s3_location"))


def _rehash(store: Store, version: int, name: str) -> None:
    """Make the manifest agree with a modified file, so only the deeper checks can catch the change."""
    import hashlib

    body = store.read(version, name)
    manifest = json.loads(store.read(version, MANIFEST))
    manifest["files"][name] = {"sha256": hashlib.sha256(body).hexdigest(), "bytes": len(body)}
    store.write(version, MANIFEST, json.dumps(manifest).encode())


def test_publish_verify_load_round_trip(store: Store) -> None:
    registry = store.open()
    draft = tiny_draft()
    m1 = registry.publish(draft, metrics=DraftMetrics(accept_length=1.5, training_tokens=10))
    m2 = registry.publish(draft, parent=m1.version)
    assert (m1.version, m2.version, m2.parent) == (1, 2, 1)
    assert registry.versions() == [1, 2] and registry.latest() == 2
    assert [m.version for m in registry.list()] == [1, 2] and registry.get(1).metrics.accept_length == 1.5

    verified = registry.verify(2)
    assert verified.config == TINY and verified.manifest.vocab_sha256 == draft.vocab.sha256()
    assert verified.manifest.tensors["lm_head.weight"].shape == [40, 32]
    # A local directory SGLang can load (an S3 registry downloaded it first)
    assert sorted(p.name for p in verified.path.iterdir()) == ["config.json", "manifest.json", "model.safetensors"]
    loaded = registry.load(2, draft.embed_tokens.weight)
    for name, t in draft.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], t), name
    assert store.debris() == []


def test_verify_rejects_corruption_shape_and_config_changes(store: Store) -> None:
    registry = store.open()
    for _ in range(4):
        registry.publish(tiny_draft())
    registry.verify(1)  # staged once: a later change in the store must still be seen
    # 1: one flipped byte in the weights
    raw = bytearray(store.read(1, WEIGHTS))
    raw[-3] ^= 0xFF
    store.write(1, WEIGHTS, bytes(raw))
    with pytest.raises(DraftVerificationError, match=r"v1 .*model.safetensors does not match its sha256"):
        registry.verify(1)
    # 2: a tensor of the wrong shape, with checksums made consistent
    tensors = load(store.read(2, WEIGHTS))
    tensors["lm_head.weight"] = tensors["lm_head.weight"][:39].clone()
    store.write(2, WEIGHTS, save(tensors))
    _rehash(store, 2, WEIGHTS)
    with pytest.raises(DraftVerificationError, match=r"wrong shape/dtype \[\('lm_head.weight', \[39, 32\]"):
        registry.verify(2)
    # 3: a config edited to another architecture size
    body = json.loads(store.read(3, CONFIG))
    store.write(3, CONFIG, json.dumps({**body, "intermediate_size": 65}).encode())
    _rehash(store, 3, CONFIG)
    with pytest.raises(DraftVerificationError, match=r"manifest tensors disagree with config\.json"):
        registry.verify(3)
    # 4: a missing file
    store.remove(4, CONFIG)
    with pytest.raises(DraftVerificationError, match=r"config\.json is missing"):
        registry.verify(4)
    with pytest.raises(DraftVerificationError, match="v9 does not exist"):
        registry.verify(9)
    # a refused version is never loaded
    with pytest.raises(DraftVerificationError):
        registry.load(1, tiny_draft().embed_tokens.weight)


def test_one_vocabulary_per_lineage(store: Store) -> None:
    registry = store.open()
    registry.publish(tiny_draft(0))
    with pytest.raises(VocabMismatch, match="fixed within a lineage"):
        registry.publish(tiny_draft(1))  # another seed picks another vocabulary
    assert registry.versions() == [1]


def test_delete_refuses_versions_in_use_and_stale_debris_goes(store: Store) -> None:
    registry = store.open()
    for _ in range(3):
        registry.publish(tiny_draft())
    store.leave_debris()
    with pytest.raises(ValueError, match="in use"):
        registry.delete(3, in_use={1, 3})  # the stable or canary version, or one a DraftVersion names
    registry.delete(2, in_use={1, 3})
    with pytest.raises(FileNotFoundError):
        registry.delete(2, in_use=set())
    assert registry.versions() == [1, 3]
    debris = store.debris()
    assert len(debris) == 1 and registry.remove_stale_tmp() == []  # fresh: a publish may still be writing it
    assert registry.remove_stale_tmp(stale_s=0) == debris and store.debris() == []
    assert registry.publish(tiny_draft()).version == 4  # numbers never go back


def test_cost_profiles_live_beside_the_versions_by_target_gpu_and_sglang(store: Store) -> None:
    """`tide profile` stores what it measured where every pod finds it; other keys, versions and the stale-debris
    sweep leave it alone; a second profile of the same key replaces the first."""
    registry = store.open()
    registry.publish(tiny_draft())
    h100 = ProfileKey(target="Qwen/Qwen3-8B", gpu="NVIDIA H100 80GB HBM3", sglang="0.5.17")
    assert h100.file_name() == "Qwen-Qwen3-8B__NVIDIA-H100-80GB-HBM3__sglang-0.5.17.json"
    assert registry.get_profile(h100) is None
    registry.put_profile(h100, '{"v": 1}')
    registry.put_profile(h100, '{"v": 2}')
    again = store.open()  # another pod, after a restart
    assert again.get_profile(h100) == '{"v": 2}'
    assert again.get_profile(h100.model_copy(update={"sglang": "0.5.23"})) is None
    assert again.get_profile(h100.model_copy(update={"gpu": "NVIDIA H200"})) is None
    assert again.versions() == [1] and again.remove_stale_tmp(stale_s=0) == [] and store.debris() == []
    assert again.get_profile(h100) == '{"v": 2}'


def test_a_registry_that_is_not_there_is_a_clear_error(tmp_path: Path, s3_location: str) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        DirectoryRegistry(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="bucket 'no-such-bucket' does not exist"):
        open_registry("s3://no-such-bucket/x")


def test_open_registry_parses_every_location(tmp_path: Path, s3_location: str) -> None:
    assert isinstance(open_registry(tmp_path), DirectoryRegistry)
    reg = open_registry(f"file://{tmp_path}/a", create=True)
    assert isinstance(reg, DirectoryRegistry) and reg.root == tmp_path / "a"
    s3 = open_registry(f"s3://{BUCKET}/team/chat/")
    assert isinstance(s3, S3Registry) and (s3.bucket, s3.prefix, s3.location) == (BUCKET, "team/chat",
                                                                                     f"s3://{BUCKET}/team/chat")
    for bad in ("gs://bucket/x", "s3:///x"):
        with pytest.raises(ValueError, match="s3://bucket/prefix"):
            open_registry(bad)
    assert TideSettings(registry_url=s3_location).registry == s3_location
    assert TideSettings(registry_dir=tmp_path).registry == str(tmp_path)
    with pytest.raises(ValueError, match="not both"):
        TideSettings(registry_url=s3_location, registry_dir=tmp_path)
    with pytest.raises(ValueError, match="registry_url"):
        TideSettings(registry_url="https://example.com/drafts")


_PUBLISHER = """
import sys, torch
from tests.test_draft import tiny_draft
from tide_sglang.draft import open_registry
registry, draft = open_registry(sys.argv[1]), tiny_draft()
print("ready", flush=True)
while True:
    registry.publish(draft)
"""


def _verify_all(registry: DraftRegistry) -> list[int]:
    versions = registry.versions()
    for version in versions:
        assert isinstance(registry.verify(version).manifest, Manifest)
    return versions


@pytest.mark.parametrize("delay_s", [0.05, 0.21])
def test_publish_killed_half_way_leaves_no_visible_version(store: Store, delay_s: float) -> None:
    """SIGKILL a process publishing in a loop: every visible version verifies; what is left is only debris."""
    store.open()  # creates the directory
    proc = subprocess.Popen([sys.executable, "-c", _PUBLISHER, store.location], stdout=subprocess.PIPE,
                            cwd=Path(__file__).parents[1])
    assert proc.stdout is not None and proc.stdout.readline().strip() == b"ready"
    time.sleep(delay_s)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    registry = store.open()
    _verify_all(registry)
    registry.remove_stale_tmp(stale_s=0)
    assert store.debris() == []
    before = registry.latest() or 0
    assert registry.publish(tiny_draft()).version > before


def test_two_publishers_at_once_never_share_a_number(store: Store) -> None:
    """Each publisher its own registry object (its own connection): every publish lands on its own number, and
    of two imports of version 0 exactly one wins."""
    store.open().publish(tiny_draft())  # the vocabulary of the lineage
    results: dict[int, list[int]] = {0: [], 1: []}
    start = threading.Barrier(2)

    def publish(i: int) -> None:
        registry = store.open()
        start.wait()
        results[i] += [registry.publish(tiny_draft()).version for _ in range(5)]

    threads = [threading.Thread(target=publish, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    numbers = results[0] + results[1]
    assert len(set(numbers)) == 10 and _verify_all(store.open()) == sorted([1, *numbers])


def test_two_imports_of_version_zero_one_wins(store: Store) -> None:
    draft = tiny_draft()
    outcomes: list[str] = []
    start = threading.Barrier(4)

    def initial() -> None:
        registry = store.open()
        start.wait()
        try:
            registry.store_initial(draft.config, draft.vocab, draft.draft_tensors())
            outcomes.append("stored")
        except ValueError as e:
            outcomes.append(str(e))

    threads = [threading.Thread(target=initial) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert outcomes.count("stored") == 1, outcomes
    assert all("already" in o for o in outcomes if o != "stored") and _verify_all(store.open()) == [0]


def test_s3_server_refuses_a_second_conditional_write(s3_location: str) -> None:
    """The race the S3 publisher relies on, straight at the server: of 8 simultaneous If-None-Match writes of
    one key, exactly one succeeds (S3 servers differ here; SeaweedFS must be one that refuses)."""
    registry = open_registry(s3_location)
    assert isinstance(registry, S3Registry)
    key, won = registry._key(7, CLAIM), []
    start = threading.Barrier(8)

    def claim(i: int) -> None:
        own = S3Registry(registry.bucket, registry.prefix)
        start.wait()
        if own._put_if_absent(key, str(i).encode()):
            won.append(i)

    threads = [threading.Thread(target=claim, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1 and registry.client.get_object(Bucket=registry.bucket, Key=key)["Body"].read() == \
        str(won[0]).encode()


class _IgnoresConditions:
    """A client for a server that ignores If-None-Match (older MinIO, some gateways): the real client, with the
    condition dropped from every put."""

    def __init__(self, client: Any) -> None:
        self._client = client

    def put_object(self, **kwargs: Any) -> Any:
        kwargs.pop("IfNoneMatch", None)
        return self._client.put_object(**kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)


def test_s3_server_ignoring_conditional_writes_is_refused(s3_location: str) -> None:
    registry = open_registry(s3_location)
    assert isinstance(registry, S3Registry)
    careless = S3Registry(registry.bucket, registry.prefix, client=_IgnoresConditions(registry.client))
    with pytest.raises(OSError, match="ignores conditional writes"):
        careless.publish(tiny_draft())
    assert registry.versions() == []


@pytest.fixture
def own_s3(monkeypatch: pytest.MonkeyPatch) -> Iterator[LocalS3]:
    with LocalS3() as server:
        for name, value in server.env.items():
            monkeypatch.setenv(name, value)
        yield server


def test_s3_server_stopped_and_restarted_mid_publish(own_s3: LocalS3) -> None:
    """Kill the object store while a publisher publishes in a loop, then bring it back on the same data: the
    publishes in flight fail with RegistryUnavailable, nothing half-written is visible, and publishing resumes."""
    location = f"s3://{BUCKET}/restart"
    registry = open_registry(location)
    draft = tiny_draft()
    stop, failures, published = threading.Event(), [], []

    def loop() -> None:
        own = open_registry(location)
        while not stop.is_set():
            try:
                published.append(own.publish(draft).version)
            except RegistryUnavailable as e:
                failures.append(e)
                time.sleep(0.05)

    thread = threading.Thread(target=loop)
    thread.start()
    try:
        while len(published) < 3:
            time.sleep(0.01)
        own_s3.stop(kill=True)
        while not failures:
            time.sleep(0.01)
        own_s3.start()
        count = len(published)
        while len(published) < count + 3:
            time.sleep(0.01)
    finally:
        stop.set()
        thread.join()
    assert _verify_all(registry) == sorted(published) and len(set(published)) == len(published)
    registry.remove_stale_tmp(stale_s=0)
    assert Store(location).debris() == []


def test_s3_server_errors_are_unavailable_and_refusals_are_not(s3_location: str) -> None:
    """A 5xx left after boto3's retries (a SeaweedFS just restarted answers InternalError for a while) is
    RegistryUnavailable, which publishers and stagers retry; a refusal such as 403 is a plain OSError."""
    from botocore.exceptions import ClientError

    registry = open_registry(s3_location)

    def answer(code: str, status: int) -> OSError:
        return registry._error("read v3 manifest", ClientError(
            {"Error": {"Code": code, "Message": code}, "ResponseMetadata": {"HTTPStatusCode": status}}, "GetObject"))

    assert isinstance(answer("InternalError", 500), RegistryUnavailable)
    assert isinstance(answer("SlowDown", 503), RegistryUnavailable)
    refused = answer("AccessDenied", 403)
    assert not isinstance(refused, RegistryUnavailable) and "AccessDenied" in str(refused)


def test_s3_staging_keeps_only_the_newest_versions_on_local_disk(s3_location: str, tmp_path: Path) -> None:
    registry = S3Registry(*s3_location.removeprefix("s3://").split("/", 1), cache_dir=tmp_path / "cache")
    for _ in range(4):
        registry.publish(tiny_draft())
    for version in (1, 2, 3, 4):
        assert registry.verify(version).path == tmp_path / "cache" / f"v{version:06d}"
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["v000003", "v000004"]
    assert os.listdir(tmp_path / "cache" / "v000004") != []


def test_s3_private_cache_goes_with_the_registry(s3_location: str) -> None:
    """Without a cache_dir each registry stages into its own temporary directory, removed with the object (a
    long test run or a trainer re-opening its registry leaves no downloaded drafts behind)."""
    registry = open_registry(s3_location)
    assert isinstance(registry, S3Registry)
    registry.publish(tiny_draft())
    cache = registry.cache
    assert registry.verify(1).path.parent == cache and cache.is_dir()
    del registry
    gc.collect()
    assert not cache.exists()


def test_from_tensors_rejects_a_foreign_embedding_shape() -> None:
    draft = tiny_draft()
    with pytest.raises(RuntimeError, match="embed_tokens"):
        Eagle3Draft.from_tensors(TINY, draft.draft_tensors(), torch.zeros(99, 32))
