"""The whole loop on the CPU: a SpecForge-format draft imported as v0 (`tide import`), the real `tide train` process,
the real operator (kopf against kmock) and two `tide engine` processes (the reference engine as one pod each,
`TIDE_POD_NAME` set) standing in for inference pods, all through tide_sglang.rollout and one real redis-server.

Only what cannot exist here is stood in for: the Kubernetes API (kmock runs no pods, so the test marks the
inference Deployment's replicas ready, as its controller would) and the GPU SGLang pods (the reference engine,
which speaks the same protocol). The trainer learns v1 from the pods' captures; v1 is canaried on one pod,
promoted and served by every pod; a worse version (v0's weights republished, as a trainer gone wrong would) is
canaried and rolled back; a pin to v0 reaches every engine. It runs twice: with the registry in a directory and
in a real S3 server (SeaweedFS), where every process stages versions from the bucket onto local disk.
"""

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import torch
from safetensors.torch import load_file, save_file
from tide_operator.emulator import Cluster, Operator, wait_for

from tests.operator.harness import ApiServer, cluster_fixture, operator_fixture  # noqa: F401
from tests.s3server import BUCKET, LocalS3
from tests.specforge import write_specforge_export
from tide_sglang.draft import DraftRegistry, open_registry
from tide_sglang.draft.target import load_heads
from tide_sglang.engine.online import CPU_TRAINER_ENV
from tide_sglang.rollout import Published, append_event, read_heartbeats
from tide_sglang.stream.server import LocalRedis

pytestmark = [pytest.mark.asyncio, pytest.mark.kmock(cls=ApiServer), pytest.mark.slow, pytest.mark.timeout(300)]

NS, NAME = "default", "loop"
PODS = ("loop-6f7c9d-a", "loop-6f7c9d-b")
HEARTBEAT_S = 1.0


def specforge_draft(out: Path) -> Path:
    """A SpecForge export for SmolLM2-135M that started from its target (lm_head rows and norm), as a user
    brings one; the rest of its weights are random, so acceptance has room to grow."""
    heads = load_heads()
    hot = torch.arange(2048)
    source = write_specforge_export(out, hidden_size=576, intermediate_size=256, num_attention_heads=9,
                                    num_key_value_heads=3, head_dim=64, vocab_size=heads.config.vocab_size,
                                    hot_ids=hot, layout="sglang")
    weights = load_file(str(source / "model.safetensors"))
    weights["lm_head.weight"], weights["norm.weight"] = heads.lm_head[hot].clone(), heads.norm.clone()
    save_file(weights, str(source / "model.safetensors"), metadata={"format": "pt"})
    return source


class Processes:
    """The trainer and the pods, each logging to its own file; every one is stopped at the end."""

    def __init__(self, workdir: Path, env: dict[str, str]) -> None:
        self.workdir, self.env = workdir, env
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.stopped: set[str] = set()

    def start(self, name: str, args: list[str], **env: str) -> None:
        log = (self.workdir / f"{name}.log").open("wb")
        self.procs[name] = subprocess.Popen([sys.executable, *args], stdout=log, stderr=subprocess.STDOUT,
                                            env={**self.env, **env})

    def stop(self, name: str) -> None:
        self.stopped.add(name)
        proc = self.procs[name]
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def check(self) -> None:
        for name, proc in self.procs.items():
            assert name in self.stopped or proc.poll() is None, f"{name} exited: {self.tail(name)}"

    def tail(self, name: str) -> str:
        return (self.workdir / f"{name}.log").read_text(errors="replace")[-3000:]

    def close(self) -> None:
        for name in set(self.procs) - self.stopped:
            self.stop(name)


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Processes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TIDE_")}
    procs = Processes(tmp_path, {**env, **CPU_TRAINER_ENV, "TIDE_TRAIN_MIN_HELDOUT_ROWS": "32",
                                # the first publish decision after 80 steps: v1 is then clearly better when served
                                "TIDE_TRAIN_EVAL_INTERVAL_STEPS": "80",
                                # whole prompts are held out: with 12 prompts, about 4 are never trained on
                                "TIDE_TRAIN_HELDOUT_FRACTION": "0.3"})
    yield procs
    procs.close()


def tide(redis_url: str, registry: dict[str, str], location: str) -> dict:
    return {"apiVersion": "tide.dev/v1alpha1", "kind": "TideDeployment", "metadata": {"name": NAME, "namespace": NS},
            "spec": {"model": {"path": "smollm2-135m"}, "draft": {"initialPath": f"{location}/v000000"},
                     "inference": {"replicas": len(PODS), "image": "tide-inference", "gpus": 0},
                     "training": {"gate": "always", "separatePool": False, "gpus": 0},
                     "redis": {"url": redis_url}, "registry": registry,
                     "rollout": {"minTokens": 300, "maxTokens": 1_000_000, "minImprovement": 0.02,
                                 "rollbackThreshold": 0.02, "heartbeatInterval": f"{HEARTBEAT_S:g}s"}}}


def phase(cluster: Cluster, version: int) -> str | None:
    return ((cluster.get("DraftVersion", f"{NAME}-v{version}") or {}).get("status") or {}).get("phase")


def served(r: redis.Redis) -> dict[str, int]:
    """The version each live pod reports serving."""
    beats = read_heartbeats(r, NS, NAME, now=time.time(), heartbeat_s=HEARTBEAT_S)
    return {pod: beat.version for pod, beat in beats.items()}


def describe(cluster: Cluster) -> str:
    """The rollout as the cluster shows it, for a failure message."""
    dvs = sorted((o for o in cluster.kmock.objects if o[0].plural == "draftversions"), key=str)
    lines = [f"{key[2]}: {cluster.get('DraftVersion', key[2]).get('status')}" for key in dvs
             if cluster.get("DraftVersion", key[2])]
    return "\n".join([*lines, f"TideDeployment: {(cluster.get('TideDeployment', NAME) or {}).get('status')}"])


async def watching(procs: Processes, cluster: Cluster, predicate: object, timeout: float, what: str) -> None:
    """Poll for an outcome while every process still runs; on timeout, say where the rollout stands."""
    async def check() -> bool:
        procs.check()
        return predicate()  # type: ignore[operator]

    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await check():
        if loop.time() > deadline:
            logs = "\n".join(f"--- {n}\n{procs.tail(n)}" for n in procs.procs)
            raise AssertionError(f"timed out after {timeout}s waiting for {what}\n{describe(cluster)}\n{logs}")
        await asyncio.sleep(0.2)


def publish_worse(registry: DraftRegistry, r: redis.Redis, parent: int) -> int:
    """A trainer gone wrong: v0's weights published again as the newest version."""
    draft = registry.load(0, load_heads().embed)
    version = registry.publish(draft, parent=parent).version
    append_event(r, NS, NAME, Published(version=version, parent=parent))
    return version


def registry_wiring(store: str, request: pytest.FixtureRequest, tmp_path: Path) -> tuple[dict, str, dict[str, str]]:
    """The CR's `registry`, and the location and variables the operator's pod specs give trainer and pods for it
    (the deployment's own lineage <namespace>/<name> under the CR's volume or URL)."""
    if store == "directory":
        root = tmp_path / "registry"
        return {"url": f"file://{root}"}, str(root / NS / NAME), {"TIDE_REGISTRY_DIR": str(root / NS / NAME)}
    server: LocalS3 = request.getfixturevalue("s3_server")
    url = f"s3://{BUCKET}/{tmp_path.name}"
    return ({"url": url, "endpoint": server.url}, f"{url}/{NS}/{NAME}",
            {"TIDE_REGISTRY_URL": f"{url}/{NS}/{NAME}", **server.env})


@pytest.mark.parametrize("store", ["directory", "s3"])
async def test_specforge_draft_to_promoted_v1_rolled_back_worse_version_and_pin_to_v0(
        cluster: Cluster, operator: Operator, redis_server: LocalRedis, processes: Processes, tmp_path: Path,
        store: str, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    spec_registry, location, registry_env = registry_wiring(store, request, tmp_path)
    for name, value in registry_env.items():
        if name.startswith("AWS_"):
            monkeypatch.setenv(name, value)  # this test's own reads of the registry
    imported = subprocess.run([sys.executable, "-m", "tide_sglang.cli", "import",
                               str(specforge_draft(tmp_path / "specforge")), "--registry", location],
                              capture_output=True, text=True, env={**processes.env, **registry_env}, timeout=120)
    assert imported.returncode == 0, imported.stderr
    registry = open_registry(location)
    assert registry.versions() == [0]
    r = redis.Redis.from_url(redis_server.url)

    async def until(predicate: object, timeout: float, what: str) -> None:
        await watching(processes, cluster, predicate, timeout, what)

    common = {"TIDE_NAMESPACE": NS, "TIDE_DEPLOYMENT": NAME, "TIDE_REDIS_URL": redis_server.url, **registry_env}
    await cluster.create(tide(redis_server.url, spec_registry, location))
    processes.start("trainer", ["-m", "tide_sglang.cli", "-v", "train", "--gate", "trigger", "--device", "cpu",
                                "--checkpoint-dir", str(tmp_path / "ckpt"), "--consumer", "trainer"],
                    **common, TIDE_TRAIN_METRICS_PORT="0")
    for pod in PODS:  # the same few short requests over and over: traffic a draft learns within a minute on a CPU
        processes.start(pod, ["-m", "tide_sglang.cli", "engine", "--version", "0", "--schedule", "writing:12",
                              "--repeat", "--max-new-tokens", "24"],
                        **common, TIDE_POD_NAME=pod, TIDE_HEARTBEAT_S=f"{HEARTBEAT_S:g}", TIDE_SWAP_POLL_S="0.3",
                        TIDE_STATS_FLUSH_S="0.5")
    await wait_for(lambda: cluster.get("Deployment", NAME), what="the inference Deployment")
    cluster.mark_ready(NAME)  # kmock runs no pods: the processes above are them
    await until(lambda: served(r) == dict.fromkeys(PODS, 0), 90, "every pod serving the imported v0")

    # the trainer continues v0 and publishes a better v1; the operator canaries it on one named pod
    await until(lambda: phase(cluster, 1) is not None, 200, "v1 published")
    processes.stop("trainer")  # its job is done: later versions come from this test
    await until(lambda: phase(cluster, 1) == "Canary", 30, "v1 canaried")
    (canary,) = cluster.get("DraftVersion", f"{NAME}-v1")["status"]["canaryPods"]
    stable = next(p for p in PODS if p != canary)
    await until(lambda: served(r) == {canary: 1, stable: 0}, 30, "the canary pod alone serving v1")
    await until(lambda: phase(cluster, 1) == "Promoted", 90, "v1 promoted and served by every pod")
    v1 = cluster.get("DraftVersion", f"{NAME}-v1")
    assert v1["spec"]["parent"] == 0  # the lineage of the imported draft
    status = v1["status"]
    assert status["reason"] == "BetterAcceptance" and status["acceptance"] > status["stableAcceptance"]
    assert served(r) == dict.fromkeys(PODS, 1)
    assert cluster.get("TideDeployment", NAME)["status"]["stable"] == 1

    # a worse version is canaried and rolled back; every pod serves v1 again
    worse = publish_worse(registry, r, parent=1)
    await until(lambda: phase(cluster, worse) == "RolledBack", 90, f"v{worse} rolled back")
    assert cluster.get("DraftVersion", f"{NAME}-v{worse}")["status"]["reason"] == "WorseAcceptance"
    assert served(r) == dict.fromkeys(PODS, 1)

    # a pin to the imported v0 reaches every engine
    await cluster.patch("TideDeployment", NAME, {"spec": {"draft": {"version": 0}}})
    await until(lambda: phase(cluster, 1) == "RolledBack", 60, "the pin to v0 served by every pod")
    assert cluster.get("DraftVersion", f"{NAME}-v0")["status"]["reason"] == "Pinned" and phase(cluster, 0) == "Promoted"
    assert served(r) == dict.fromkeys(PODS, 0)
    r.close()
