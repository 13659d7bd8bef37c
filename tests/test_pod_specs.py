"""Every TideDeployment we publish (the quickstart's, docs/examples/, and those the values files in helm/ render), as
its pods would run it: the operator's builders make the inference and trainer pod specs, and their init containers,
the trainer and a reference engine run here on the CPU with exactly the commands, environment and files those
specs give them. Each must find its model, its registry, its checkpoint volume and its Redis (with the password
from its Secret); the trainer must join its consumer group and checkpoint on stop, the engine serve v0.

Stood in for, because they cannot exist here: each volume is a local directory (a PVC one directory shared by the
pods that mount it, at the spec's sub-path; each pod its own emptyDirs), the hub is what a download leaves in the
model-cache's Hugging Face cache (a SmolLM2-135M checkpoint for every target, a SpecForge export for it for every
draft; HF_HUB_OFFLINE=1, no network here), a model or draft on a PVC is those files on its directory, Redis is a
real redis-server (a one-node Redis Cluster for `redis.cluster`; plain TCP where the spec's Secret names a rediss://
server) whose address replaces the Service's host:port in the pods' variables (what cluster DNS would resolve)
and is what a `redis.urlSecretRef` Secret holds, an object store is SeaweedFS (its endpoint and keys added as
AWS_* variables, standing in for AWS's endpoint and the pod's cloud identity), each Secret is a dict holding what
the stand-ins need, the downward API the pod's name and namespace, and the SGLang container a reference engine
(`tide engine`) with that container's environment: SGLang needs a GPU.
"""

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml
from tide_operator import builders
from tide_operator.models import TideDeploymentSpec
from tide_operator.status import parse, secret_refs

from tests.chart_tools import VALUES_FILES, by_kind, render
from tests.operator.crdcheck import ROOT
from tests.s3server import LocalS3
from tests.test_chart_docs import code_blocks
from tests.test_loop_e2e import specforge_draft
from tide_sglang import keys
from tide_sglang.draft import open_registry
from tide_sglang.draft.target import resolve
from tide_sglang.rollout import read_heartbeats
from tide_sglang.stream.server import LocalRedis, free_port

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

PASSWORD = "s3cret-redis"


def hub_snapshot(cache: Path, repo: str, files: Path) -> None:
    """What `snapshot_download` leaves in a Hugging Face cache for `repo` at main (links to the files)."""
    snapshot = cache / f"models--{repo.replace('/', '--')}" / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0123abcd")
    for f in files.iterdir():
        (snapshot / f.name).symlink_to(f)


class Pod:
    """One pod of a built Deployment: its volumes as local directories, its containers as local processes."""

    def __init__(self, dep: dict[str, Any], name: str, root: Path, world: "World") -> None:
        self.spec, self.name, self.namespace = dep["spec"]["template"]["spec"], name, dep["metadata"]["namespace"]
        self.world = world
        claims = world.claims
        self.volumes: dict[str, Path] = {}
        for v in self.spec["volumes"]:
            claim = v.get("persistentVolumeClaim")
            self.volumes[v["name"]] = claims / claim["claimName"] if claim else root / name / v["name"]

    def container(self, name: str) -> dict[str, Any]:
        return next(c for c in [*self.spec.get("initContainers", []), *self.spec["containers"]] if c["name"] == name)

    def mounts(self, c: dict[str, Any]) -> list[tuple[str, Path]]:
        """(mount path, local directory), longest mount path first."""
        out = []
        for m in c.get("volumeMounts", []):
            local = self.volumes[m["name"]] / m.get("subPath", "")
            local.mkdir(parents=True, exist_ok=True)  # the kubelet creates a missing sub-path
            out.append((m["mountPath"], local))
        return sorted(out, key=lambda m: -len(m[0]))

    def local(self, c: dict[str, Any], text: str) -> str:
        for mount, local in self.mounts(c):
            if text == mount or text.startswith(mount.rstrip("/") + "/"):
                return str(local) + text[len(mount):]
        return text

    def env(self, c: dict[str, Any]) -> dict[str, str]:
        """The container's variables as the kubelet sets them (and the object store's stand-ins, where unset)."""
        out = dict(self.world.aws)
        for e in c.get("env", []):
            ref = e.get("valueFrom", {})
            if "value" in e:
                out[e["name"]] = self.world.resolve(self.local(c, e["value"]))
            elif "secretKeyRef" in ref:
                out[e["name"]] = self.world.secrets[ref["secretKeyRef"]["name"]][ref["secretKeyRef"]["key"]]
            else:
                out[e["name"]] = {"metadata.name": self.name,
                                  "metadata.namespace": self.namespace}[ref["fieldRef"]["fieldPath"]]
        return out

    def argv(self, c: dict[str, Any], command: list[str] | None = None) -> list[str]:
        """The container's command line (or `command` in its place); `tide` is this checkout's CLI."""
        words = [self.local(c, w) for w in (command or [*c["command"], *c.get("args", [])])]
        assert words[0] == "tide", words
        return [sys.executable, "-m", "tide_sglang.cli", *words[1:]]

    def popen(self, name: str, log: Path, command: list[str] | None = None) -> subprocess.Popen[bytes]:
        c = self.container(name)
        base = {k: v for k, v in os.environ.items() if not k.startswith(("TIDE_", "HF_", "AWS_"))}
        return subprocess.Popen(self.argv(c, command), env={**base, "HF_HUB_OFFLINE": "1", **self.env(c)},
                                stdout=log.open("wb"), stderr=subprocess.STDOUT)

    def init(self, logs: Path) -> None:
        """Every init container in order, each to completion, as the kubelet runs them."""
        for c in self.spec.get("initContainers", []):
            log = logs / f"{self.name}-{c['name']}.log"
            proc = self.popen(c["name"], log)
            assert proc.wait(180) == 0, f"{self.name}/{c['name']}: {log.read_text()[-3000:]}"




class World:
    """What surrounds the pods: the PVCs' directories, Redis and the object store, and the Secrets."""

    def __init__(self, root: Path) -> None:
        self.claims = root / "claims"
        self.hosts: dict[str, str] = {}  # a Service's host:port -> the local server's
        self.secrets: dict[str, dict[str, str]] = {}
        self.aws: dict[str, str] = {}
        self.redis_url = ""  # the local server's, with its password

    def resolve(self, value: str) -> str:
        for service, local in self.hosts.items():
            value = value.replace(f"@{service}", f"@{local}").replace(f"//{service}", f"//{local}")
        return value

    def client(self, cluster: bool) -> Any:
        return (redis.RedisCluster if cluster else redis.Redis).from_url(self.redis_url)


def _host(url: str) -> str:
    return url.split("://", 1)[1].split("@")[-1].split("/")[0]


@contextmanager
def world_for(name: str, ns: str, spec: TideDeploymentSpec, root: Path) -> Iterator[World]:
    """Redis (and an object store) for this spec, and the Secrets it names, holding what those servers need."""
    world = World(root)
    password = PASSWORD if builders.redis_password_ref(name, spec) is not None else None
    with ExitStack() as stack:
        if spec.redis.cluster:  # one node holding every slot: a Redis Cluster as far as clients can tell
            server = stack.enter_context(LocalRedis(free_port(cluster_bus=True), password, "--cluster-enabled", "yes"))
            node = redis.Redis(port=server.port, password=password)
            node.execute_command("CLUSTER", "ADDSLOTSRANGE", 0, 16383)
            while node.cluster("info").get("cluster_state") != "ok":
                time.sleep(0.05)
            node.close()
        else:
            server = stack.enter_context(LocalRedis(password=password))
        world.redis_url = server.url
        local = f"127.0.0.1:{server.port}"
        if spec.redis.url is not None:
            world.hosts[_host(spec.redis.url)] = local
        if spec.redis.managed.enabled:
            world.hosts[_host(builders.managed_redis_url(name, ns))] = local
            world.secrets[f"{name}-redis"] = {builders.REDIS_PASSWORD_KEY: PASSWORD}  # what the operator generates
        if spec.registry.url is not None and spec.registry.url.startswith("s3://"):
            s3 = stack.enter_context(LocalS3())
            s3.client().create_bucket(Bucket=spec.registry.url.split("/")[2])
            world.aws = s3.env
        for field, ref in secret_refs(spec):
            world.secrets.setdefault(ref.name, {})[ref.key] = {
                "redis.urlSecretRef": server.url.replace(f":{password}@", "") if password else server.url,
                "redis.passwordSecretRef": PASSWORD, "model.hubTokenSecretRef": "hf_x",
                "registry.accessKeyIdSecretRef": world.aws.get("AWS_ACCESS_KEY_ID", "x"),
                "registry.secretAccessKeySecretRef": world.aws.get("AWS_SECRET_ACCESS_KEY", "x")}[field]
        yield world


def place_models(spec: TideDeploymentSpec, pods: dict[str, Pod], world: World, draft: Path) -> None:
    """The target (SmolLM2-135M) and the draft where the spec says they are: the hub's cache of each pod's
    model-cache volume, or the directory of the PVC holding them."""
    files = {"target": resolve("smollm2-135m"), "draft": draft}
    for model, source in builders.sources(spec).items():
        if source.kind == "hub":
            for pod in pods.values():
                hub = Path(pod.env(pod.container(f"{builders.FETCH_PREFIX}{model}"))["HF_HUB_CACHE"])
                hub_snapshot(hub, source.location, files[model])
            continue
        pod = pods["inference"]
        local = Path(pod.local(pod.container("sglang"), builders.local_model(spec, model)))
        assert local.is_relative_to(world.claims), f"{model} at {local}: only hub ids and PVCs can be stood in for"
        local.parent.mkdir(parents=True, exist_ok=True)
        local.symlink_to(files[model])


def registry_of(name: str, ns: str, spec: TideDeploymentSpec, world: World) -> Any:
    if spec.registry.claim_name:
        return open_registry(str(world.claims / spec.registry.claim_name / ns / name))  # the spec's sub-path
    return open_registry(builders.registry_url(ns, name, spec.registry))


def quickstart_cr() -> dict[str, Any]:
    (doc,) = [d for block in code_blocks("yaml") for d in yaml.safe_load_all(block)
              if d and d.get("kind") == "TideDeployment"]
    return doc


def published() -> dict[str, dict[str, Any]]:
    """Every TideDeployment a user is shown: the quickstart's, docs/examples/, and what helm/'s values render."""
    out = {"quickstart": quickstart_cr()}
    out |= {p.name: yaml.safe_load(p.read_text()) for p in sorted((ROOT / "docs/examples").glob("tidedeployment-*"))}
    for path in VALUES_FILES:
        out |= {f"{path.name}:{td['metadata']['name']}": td for td in by_kind(render([path]), "TideDeployment")}
    return out


CASES = published()


def test_every_published_tide_deployment_is_run_here() -> None:
    assert len(CASES) >= 8 and "quickstart" in CASES and "tidedeployment-full.yaml" in CASES


@pytest.fixture(scope="module")
def draft(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One SpecForge export, the initial draft of every case (each links to it; nothing writes it)."""
    return specforge_draft(tmp_path_factory.mktemp("draft-export"))


@pytest.mark.parametrize("case", CASES)
def test_pods_find_their_models_registry_checkpoint_and_redis(case: str, draft: Path, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    doc = CASES[case]
    name, ns = doc["metadata"]["name"], doc["metadata"]["namespace"]
    spec, problems = parse(name, doc["spec"])
    assert spec is not None and problems == []
    with world_for(name, ns, spec, tmp_path) as world:
        for var, value in world.aws.items():  # this process reads an S3 registry as the pods do
            monkeypatch.setenv(var, value)
        pods = {kind: Pod(dep, f"{dep['metadata']['name']}-7d9f-a", tmp_path / "pods", world)
                for kind, dep in (("trainer", builders.trainer_deployment(name, ns, spec)),
                                  ("inference", builders.inference_deployment(name, ns, spec)))}
        place_models(spec, pods, world, draft)
        with ThreadPoolExecutor(2) as pool:  # two pods: their init containers run side by side
            for done in [pool.submit(pods[kind].init, tmp_path) for kind in pods]:
                done.result()
        assert registry_of(name, ns, spec, world).versions() == [0]  # import-draft stored the served draft as v0
        engine = _start_engine(pods["inference"], tmp_path)
        _trainer_runs(name, ns, spec, pods["trainer"], world, tmp_path)
        assert engine.wait(180) == 0, (tmp_path / "engine.log").read_text()[-3000:]
        client = world.client(spec.redis.cluster)
        beats = read_heartbeats(client, ns, name, now=time.time(), heartbeat_s=60)
        client.close()
        assert {pod: beat.version for pod, beat in beats.items()} == {pods["inference"].name: 0}


def _trainer_runs(name: str, ns: str, spec: TideDeploymentSpec, trainer: Pod, world: World, logs: Path) -> None:
    """It reads the target's heads, reads the stream as its stable consumer name, and checkpoints on SIGTERM."""
    c = trainer.container("trainer")
    env = trainer.env(c)
    target = Path(env["TIDE_TARGET"])
    assert (target / "config.json").is_file() and (target / "model.safetensors").is_file()
    client = world.client(spec.redis.cluster)
    stream, log = keys.hidden_states(ns, name), logs / "trainer.log"
    proc = trainer.popen("trainer", log)
    try:  # a consumer appears at its first read, once `tide train` has started (its SIGTERM handler is set)
        deadline = time.monotonic() + 180
        while not (client.exists(stream) and client.xinfo_groups(stream)
                   and [g for g in client.xinfo_consumers(stream, keys.TRAINER_GROUP)
                        if g["name"] in (env["TIDE_TRAIN_CONSUMER"], env["TIDE_TRAIN_CONSUMER"].encode())]):
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "the trainer never read the stream as its consumer"
            time.sleep(0.2)
    finally:
        proc.terminate()
        client.close()
    assert proc.wait(60) == 0, log.read_text()[-3000:]
    assert "tide train: stopped" in log.read_text()
    checkpoint = env.get("TIDE_TRAIN_CHECKPOINT_DIR")
    assert (checkpoint is not None) == spec.training.checkpoint.enabled
    if checkpoint is not None:  # on the checkpoint PVC's directory
        assert Path(checkpoint).is_relative_to(world.claims) and list(Path(checkpoint).glob("ckpt-*/state.json"))


def _start_engine(inference: Pod, logs: Path) -> subprocess.Popen[bytes]:
    """SGLang's arguments name local model directories; the reference engine, with the SGLang container's
    environment, serves v0 from the registry and heartbeats it."""
    args = inference.argv(inference.container("sglang"))
    for flag in ("--model-path", "--speculative-draft-model-path"):  # what SGLang would load
        assert (Path(args[args.index(flag) + 1]) / "config.json").is_file(), flag
    return inference.popen("sglang", logs / "engine.log", command=[
        "tide", "engine", "--version", "0", "--schedule", "writing:1", "--rounds", "1", "--max-new-tokens", "4"])
