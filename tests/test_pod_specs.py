"""The quickstart's TideDeployment, as its pods would run it: the operator's builders make the inference and trainer
pod specs, and their init containers, the trainer and a reference engine run here on the CPU with exactly the
commands, environment and files those specs give them.

Stood in for, because they cannot exist here: each volume is a local directory (the registry PVC one directory
for both pods, at the spec's sub-path; each pod its own model-cache), the hub is what a download leaves in the
model-cache's Hugging Face cache (a SmolLM2-135M checkpoint as the target's hub id, a SpecForge export for it as
the draft's; HF_HUB_OFFLINE=1, no network here), the Redis Service is a real password-protected redis-server
(the CR's `redis.url` points at it), the Secret is a dict, the downward API the pod's name and namespace, and
the SGLang container a reference engine (`tide engine`) with that container's environment: SGLang needs a GPU.
"""

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml
from tide_operator import builders
from tide_operator.status import parse, secret_refs

from tests.test_chart_docs import code_blocks
from tests.test_loop_e2e import specforge_draft
from tide_sglang import keys
from tide_sglang.draft import open_registry
from tide_sglang.draft.target import resolve
from tide_sglang.rollout import read_heartbeats
from tide_sglang.stream.server import LocalRedis

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

PASSWORD = "s3cret-redis"


def quickstart_cr() -> dict[str, Any]:
    (doc,) = [d for block in code_blocks("yaml") for d in yaml.safe_load_all(block)
              if d and d.get("kind") == "TideDeployment"]
    return doc


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

    def __init__(self, dep: dict[str, Any], name: str, root: Path, claims: Path, secrets: dict[str, dict]) -> None:
        self.spec, self.name, self.namespace = dep["spec"]["template"]["spec"], name, dep["metadata"]["namespace"]
        self.secrets = secrets
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
        out = {}
        for e in c.get("env", []):
            ref = e.get("valueFrom", {})
            if "value" in e:
                out[e["name"]] = self.local(c, e["value"])
            elif "secretKeyRef" in ref:
                out[e["name"]] = self.secrets[ref["secretKeyRef"]["name"]][ref["secretKeyRef"]["key"]]
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


def test_quickstart_pods_find_their_models_registry_and_redis(tmp_path: Path) -> None:
    doc = quickstart_cr()
    name, ns = doc["metadata"]["name"], doc["metadata"]["namespace"]
    spec = doc["spec"]
    assert "/" in spec["model"]["path"] and "/" in spec["draft"]["initialPath"]  # hub ids, fetched
    with LocalRedis(password=PASSWORD) as server:
        spec["redis"]["url"] = server.url.replace(f":{PASSWORD}@", "")  # the Service; its password from the Secret
        parsed, problems = parse(name, spec)
        assert parsed is not None and problems == []
        secrets: dict[str, dict[str, str]] = {}
        for field, ref in secret_refs(parsed):  # the hub token is never used offline
            secrets.setdefault(ref.name, {})[ref.key] = PASSWORD if field == "redis.passwordSecretRef" else "hf_x"
        draft = specforge_draft(tmp_path / "draft-export")
        claims = tmp_path / "claims"
        pods = {kind: Pod(dep, f"{dep['metadata']['name']}-7d9f-a", tmp_path / "pods", claims, secrets)
                for kind, dep in (("trainer", builders.trainer_deployment(name, ns, parsed)),
                                  ("inference", builders.inference_deployment(name, ns, parsed)))}
        for pod in pods.values():  # what the hub download would leave in each pod's model-cache volume
            hub = Path(pod.env(pod.container("fetch-target"))["HF_HUB_CACHE"])
            hub_snapshot(hub, spec["model"]["path"], resolve("smollm2-135m"))
            hub_snapshot(hub, spec["draft"]["initialPath"], draft)

        pods["trainer"].init(tmp_path)  # fetch-target (heads only), fetch-draft, import-draft
        registry = open_registry(str(claims / "tide-drafts" / ns / name))  # the spec's sub-path of the PVC
        assert registry.versions() == [0]
        trainer_target = Path(pods["trainer"].env(pods["trainer"].container("trainer"))["TIDE_TARGET"])
        assert (trainer_target / "config.json").is_file() and (trainer_target / "model.safetensors").is_file()

        client = redis.Redis.from_url(server.url)
        stream = keys.hidden_states(ns, name)
        trainer = pods["trainer"].popen("trainer", tmp_path / "trainer.log")
        try:
            deadline = time.monotonic() + 120
            while not (client.exists(stream) and client.xinfo_groups(stream)):
                assert trainer.poll() is None, (tmp_path / "trainer.log").read_text()[-3000:]
                assert time.monotonic() < deadline, "the trainer never joined its consumer group"
                time.sleep(0.2)
            time.sleep(2)
            assert trainer.poll() is None, (tmp_path / "trainer.log").read_text()[-3000:]
        finally:
            trainer.terminate()
        assert trainer.wait(60) == 0, (tmp_path / "trainer.log").read_text()[-3000:]
        assert "tide train: stopped" in (tmp_path / "trainer.log").read_text()

        inference = pods["inference"]
        inference.init(tmp_path)  # fetch-target, fetch-draft (whole models)
        sglang = inference.container("sglang")
        args = inference.argv(sglang)
        for flag in ("--model-path", "--speculative-draft-model-path"):  # what SGLang would load
            assert (Path(args[args.index(flag) + 1]) / "config.json").is_file(), flag
        # The reference engine in place of SGLang, with the SGLang container's environment: v0 from the registry
        engine = inference.popen("sglang", tmp_path / "engine.log", command=[
            "tide", "engine", "--version", "0", "--schedule", "writing:1", "--rounds", "1", "--max-new-tokens", "4"])
        assert engine.wait(180) == 0, (tmp_path / "engine.log").read_text()[-3000:]
        beats = read_heartbeats(client, ns, name, now=time.time(), heartbeat_s=60)
        assert {pod: beat.version for pod, beat in beats.items()} == {inference.name: 0}
        client.close()

