"""End to end: the real kopf operator (tide_operator.handlers) against kmock and a real redis-server.

Only the Kubernetes API is emulated (kmock, see tide_operator/emulator.py for what it lacks: it runs no pods, so
the tests mark Deployments ready). Redis is a real `redis-server` (LocalRedis); the tests play the trainer
(events), the engines' stats and the inference pods (`Engines`: each follows the control state and heartbeats),
all through tide_sglang.rollout, as the real ones do. The operator restarted mid-rollout is the `operator-restarted`
drill of `tide bench faults` (tests/test_faults.py).
"""

import base64
import copy
from collections.abc import AsyncIterator
from pathlib import Path

import kmock as km
import pytest
import pytest_asyncio
import redis
import yaml
from tide_operator.emulator import Cluster, Engines, Operator, wait_for
from tide_operator.generate import rbac_rules

from tests.operator.crdcheck import ROOT
from tests.operator.harness import ApiServer, cluster_fixture, operator_fixture  # noqa: F401
from tide_sglang.rollout import ControlState, Published, StatsReporter, append_event, read_control
from tide_sglang.stream.server import LocalRedis

pytestmark = [pytest.mark.asyncio, pytest.mark.kmock(cls=ApiServer)]

NS, NAME = "default", "chat"
PODS = ("chat-7d9f-a", "chat-7d9f-b")
H100 = {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
A100 = {"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB"}


def tide(redis_url: str, **spec_overrides: object) -> dict:
    doc = yaml.safe_load((ROOT / "docs/examples/tidedeployment-minimal.yaml").read_text())
    doc["metadata"] = {"name": NAME, "namespace": NS}
    doc["spec"]["redis"] = {"url": redis_url}
    doc["spec"]["inference"]["replicas"] = len(PODS)
    doc["spec"]["rollout"] = {"minTokens": 1000, "maxTokens": 100_000, "heartbeatInterval": "1s"}
    for key, value in copy.deepcopy(spec_overrides).items():
        doc["spec"][key] = {**doc["spec"].get(key, {}), **value}
    return doc


@pytest.fixture
def r(redis_server: LocalRedis) -> redis.Redis:
    client = redis.Redis.from_url(redis_server.url)
    yield client
    client.close()


@pytest_asyncio.fixture
async def engines(r: redis.Redis) -> AsyncIterator[Engines]:
    async with Engines(r, NS, NAME, PODS).running() as fleet:
        yield fleet


def control(r: redis.Redis) -> ControlState | None:
    return read_control(r, NS, NAME)


def publish(r: redis.Redis, version: int, parent: int) -> None:
    """What the trainer does after DraftRegistry.publish."""
    append_event(r, NS, NAME, Published(version=version, parent=parent, metrics={"acc": 0.7}))


def report(r: redis.Redis, version: int, tokens: int, accepted: int, swap_failures: int = 0) -> None:
    """What engines do for the version that drafted the tokens."""
    stats = StatsReporter(r, NS, NAME, interval_s=None)
    stats.add(version, tokens=tokens, accepted=accepted, verify_steps=tokens // 4, swap_failures=swap_failures)
    stats.flush()


def phase(cluster: Cluster, version: int) -> str | None:
    return cluster.phase(NAME, version)


def replicas(cluster: Cluster, name: str) -> int | None:
    return ((cluster.get("Deployment", name) or {}).get("spec") or {}).get("replicas")


def td_status(cluster: Cluster) -> dict:
    return (cluster.get("TideDeployment", NAME) or {}).get("status") or {}


async def running(cluster: Cluster, redis_server: LocalRedis, r: redis.Redis, **overrides: object) -> None:
    """A TideDeployment whose pods are ready and serve v0."""
    await cluster.create(tide(redis_server.url, **overrides))
    await wait_for(lambda: cluster.get("Deployment", NAME), what="children")
    cluster.mark_ready(NAME)
    await wait_for(lambda: (c := control(r)) is not None and c.stable == 0, what="control state")


async def canary_of_v1(cluster: Cluster, redis_server: LocalRedis, r: redis.Redis, **overrides: object) -> None:
    """... whose trainer has just published v1, now in canary."""
    await running(cluster, redis_server, r, **overrides)
    publish(r, 1, 0)
    await wait_for(lambda: phase(cluster, 1) == "Canary", what="canary")


def pod(cluster: Cluster, name: str) -> dict:
    return cluster.get("Deployment", name)["spec"]["template"]["spec"]


async def test_create_puts_children_on_the_right_pools(cluster: Cluster, operator: Operator,
                                                       redis_server: LocalRedis, r: redis.Redis,
                                                       engines: Engines) -> None:
    await cluster.create(tide(redis_server.url))
    await wait_for(lambda: cluster.get("Deployment", f"{NAME}-trainer"), what="children")
    td = cluster.get("TideDeployment", NAME)
    for child in (NAME, f"{NAME}-trainer"):
        dep = cluster.get("Deployment", child)
        assert dep["metadata"]["ownerReferences"][0]["uid"] == td["metadata"]["uid"]
    assert pod(cluster, NAME)["nodeSelector"] == H100
    assert pod(cluster, f"{NAME}-trainer")["nodeSelector"] == A100
    env = {e["name"]: e.get("value", e.get("valueFrom")) for e in pod(cluster, NAME)["containers"][0]["env"]}
    assert env["TIDE_POD_NAME"] == {"fieldRef": {"fieldPath": "metadata.name"}} and env["TIDE_DEPLOYMENT"] == NAME
    assert env["TIDE_REDIS_URL"] == redis_server.url and env["TIDE_HEARTBEAT_S"] == "1"
    assert replicas(cluster, NAME) == 2 and cluster.get("Deployment", f"{NAME}-canary") is None
    assert cluster.get("Service", NAME)["spec"]["selector"]["tide.dev/deployment"] == NAME
    # the initial draft is version 0, stable, and announced to the engines
    await wait_for(lambda: phase(cluster, 0) == "Promoted", what="DraftVersion v0")
    await wait_for(lambda: control(r) == ControlState(stable=0, train=True, collect=True), what="control state")
    # Ready once the pods are (the test plays the Deployment controller); Swapped once they report v0
    await wait_for(lambda: cluster.condition(NAME, "Ready").get("reason") == "PodsNotReady", what="not Ready")
    cluster.mark_ready(NAME, f"{NAME}-trainer")
    await wait_for(lambda: cluster.condition(NAME, "Ready").get("status") == "True", what="Ready")
    await wait_for(lambda: cluster.condition(NAME, "Swapped").get("status") == "True", what="Swapped")
    assert cluster.condition(NAME, "Swapped")["message"] == "2 pod(s) serve stable v0"
    cond = cluster.condition(NAME, "Degraded")
    assert cond["status"] == "False" and cond["observedGeneration"] == 1
    assert td_status(cluster)["stable"] == 0


async def test_spec_change_updates_children(cluster: Cluster, operator: Operator, redis_server: LocalRedis) -> None:
    await cluster.create(tide(redis_server.url))
    await wait_for(lambda: cluster.get("Deployment", f"{NAME}-trainer"), what="children")
    l40s = {"nvidia.com/gpu.product": "NVIDIA-L40S"}
    await cluster.patch("TideDeployment", NAME, {"spec": {
        "inference": {"replicas": 5, "nodeSelector": {"nvidia.com/gpu.product": "NVIDIA-H200"}},
        "training": {"nodeSelector": l40s, "tolerations": [{"key": "pool", "operator": "Exists"}]},
        "monitoring": {"podMonitor": True}}})
    await wait_for(lambda: replicas(cluster, NAME) == 5, what="replicas")
    assert pod(cluster, NAME)["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H200"}
    await wait_for(lambda: pod(cluster, f"{NAME}-trainer")["nodeSelector"] == l40s, what="training pool")
    assert pod(cluster, f"{NAME}-trainer")["tolerations"] == [{"key": "pool", "operator": "Exists"}]
    await wait_for(lambda: cluster.get("PodMonitor", NAME), what="PodMonitor")
    # switching the trainer off removes it and stops capture; observedGeneration follows the spec
    await cluster.patch("TideDeployment", NAME, {"spec": {"training": {"enabled": False}}})
    await wait_for(lambda: cluster.get("Deployment", f"{NAME}-trainer") is None, what="trainer deleted")
    await wait_for(lambda: cluster.condition(NAME, "Degraded").get("observedGeneration") == 3, what="generation")


async def test_canary_on_a_named_pod_promoted_once_every_pod_serves_it_then_pinned_back(
        cluster: Cluster, operator: Operator, redis_server: LocalRedis, r: redis.Redis, engines: Engines) -> None:
    await running(cluster, redis_server, r)
    template = pod(cluster, NAME)
    report(r, 0, 50_000, 30_000)  # stable traffic before the canary: not part of the comparison
    publish(r, 1, 0)
    await wait_for(lambda: phase(cluster, 1) == "Canary", what="canary")
    assert control(r).canary == 1 and control(r).canary_pods == (PODS[0],)
    await wait_for(lambda: engines.loaded == {PODS[0]: 1, PODS[1]: 0}, what="the canary pod swapped")
    await wait_for(lambda: td_status(cluster).get("canaryPods") == [PODS[0]], what="status")
    assert td_status(cluster)["candidate"] == 1
    engines.stuck = {PODS[1]}  # the stable pod will not swap at first
    report(r, 0, 2_000, 1_200)  # stable 0.60 over the window
    report(r, 1, 2_000, 1_500)  # canary 0.75
    await wait_for(lambda: phase(cluster, 1) == "Promoting", what="promotion decided")
    assert control(r) == ControlState(stable=1)  # routed to every pod at once
    await wait_for(lambda: cluster.condition(NAME, "Swapped").get("message") == f"{PODS[1]} serves v0, not v1",
                   what="the lagging pod named")
    assert phase(cluster, 1) == "Promoting"  # the pass that saw the lag did not confirm
    assert cluster.condition(NAME, "Progressing")["reason"] == "Promoting"
    engines.stuck = set()
    await wait_for(lambda: phase(cluster, 1) == "Promoted", what="promotion confirmed")
    assert engines.loaded == dict.fromkeys(PODS, 1)
    assert "confirmed: 2 pod(s) serve v1" in cluster.get("DraftVersion", f"{NAME}-v1")["status"]["message"]
    await wait_for(lambda: td_status(cluster)["stable"] == 1, what="status")
    assert "canary" not in td_status(cluster)
    # manual rollback: pin version 0; RolledBack once every pod serves v0 again
    await cluster.patch("TideDeployment", NAME, {"spec": {"draft": {"version": 0}}})
    await wait_for(lambda: phase(cluster, 1) == "RolledBack", what="manual rollback")
    assert engines.loaded == dict.fromkeys(PODS, 0) and control(r).stable == 0
    await wait_for(lambda: cluster.condition(NAME, "RolloutPaused").get("reason") == "Pinned", what="paused")
    assert pod(cluster, NAME) == template  # no pod template changed: nothing restarted


def trainer(cluster: Cluster) -> tuple[str | None, str | None]:
    """What `kubectl get tided` shows in the Trainer and Trainer Reason columns."""
    training = td_status(cluster).get("training") or {}
    return training.get("state"), training.get("reason")


async def test_trigger_votes_scale_the_trainer_down_and_back(cluster: Cluster, operator: Operator,
                                                            redis_server: LocalRedis, r: redis.Redis,
                                                            engines: Engines) -> None:
    quiet = {"state": "idle", "reason": "plateau", "train": False, "collect": False, "short": 0.7, "long": 0.7}
    drift = {**quiet, "state": "active", "reason": "drift", "train": True, "collect": True}
    engines.trigger = drift
    await running(cluster, redis_server, r, training={"holdFor": "1s", "idleAfter": "2s", "minUp": "2s"})
    await wait_for(lambda: trainer(cluster) == ("Training", "TriggerFired"), what="training on a vote")
    assert td_status(cluster)["training"]["message"] == f"{PODS[0]}, {PODS[1]} of 2 live pod(s) vote to train"
    assert replicas(cluster, f"{NAME}-trainer") == 1
    assert (control(r).train, control(r).collect) == (True, True)
    engines.trigger = quiet  # every pod's trigger went idle: training off, then the trainer scaled to zero
    await wait_for(lambda: trainer(cluster)[0] == "Idle", what="idle")
    assert (control(r).train, control(r).collect) == (False, False)
    await wait_for(lambda: trainer(cluster) == ("ScaledDown", "IdleAfter"), what="scaled down")
    await wait_for(lambda: replicas(cluster, f"{NAME}-trainer") == 0, what="trainer at zero")
    assert cluster.get("PersistentVolumeClaim", f"{NAME}-trainer-checkpoint") is not None  # it resumes from it
    assert (control(r).train, control(r).collect) == (False, False)
    engines.trigger = drift  # drift again: back to one trainer at once
    await wait_for(lambda: replicas(cluster, f"{NAME}-trainer") == 1, what="trainer back")
    # The Deployment is scaled before the status is patched in the same pass: wait for both.
    await wait_for(lambda: trainer(cluster) == ("Training", "TriggerFired"), what="status training again")
    await wait_for(lambda: control(r).train, what="train on")
    assert_rbac_covers(cluster.kmock)


async def test_swap_timeout_names_the_lagging_pod(cluster: Cluster, operator: Operator, redis_server: LocalRedis,
                                                  r: redis.Redis, engines: Engines) -> None:
    await running(cluster, redis_server, r, rollout={"swapTimeout": "1s"})
    await wait_for(lambda: cluster.condition(NAME, "Swapped").get("status") == "True", what="Swapped")
    engines.stuck = {PODS[1]}
    publish(r, 1, 0)
    await wait_for(lambda: phase(cluster, 1) == "Canary", what="canary")
    await cluster.patch("TideDeployment", NAME, {"spec": {"draft": {"version": 1}}})
    await wait_for(lambda: cluster.condition(NAME, "Swapped").get("reason") == "SwapTimeout", what="SwapTimeout")
    assert cluster.condition(NAME, "Swapped")["message"] == f"{PODS[1]} serves v0, not v1"
    assert phase(cluster, 1) == "Promoting"


async def test_worse_candidate_is_rolled_back(cluster: Cluster, operator: Operator, redis_server: LocalRedis,
                                              r: redis.Redis, engines: Engines) -> None:
    await canary_of_v1(cluster, redis_server, r)
    report(r, 0, 3_000, 2_100)  # 0.70
    report(r, 1, 3_000, 1_500)  # 0.50
    await wait_for(lambda: phase(cluster, 1) == "RolledBack", what="rollback confirmed")
    dv = cluster.get("DraftVersion", f"{NAME}-v1")
    assert dv["status"]["reason"] == "WorseAcceptance" and dv["status"]["acceptance"] == 0.5
    assert dv["spec"] == {"deployment": NAME, "version": 1, "parent": 0, "metrics": {"acc": 0.7}}
    assert control(r) == ControlState(stable=0) and engines.loaded == dict.fromkeys(PODS, 0)


async def test_canary_whose_pod_never_swaps_times_out_and_unblocks(
        cluster: Cluster, operator: Operator, redis_server: LocalRedis, r: redis.Redis, engines: Engines) -> None:
    engines.stuck = {PODS[0]}  # the pod named for the canary never loads it
    await canary_of_v1(cluster, redis_server, r, rollout={"canaryTimeout": "2s"})
    await wait_for(lambda: phase(cluster, 1) == "Rejected", what="canary timeout")
    status = cluster.get("DraftVersion", f"{NAME}-v1")["status"]
    assert status["reason"] == "CanaryTimeout" and f"canary pods never loaded v1: {PODS[0]}" in status["message"]
    engines.stuck = set()
    publish(r, 2, 0)  # the next version is not blocked
    await wait_for(lambda: phase(cluster, 2) == "Canary", what="next canary")


async def test_retention_deletes_old_versions_but_never_a_named_one(
        cluster: Cluster, operator: Operator, redis_server: LocalRedis, r: redis.Redis, engines: Engines,
        tmp_path: Path) -> None:
    registry = tmp_path / "registry" / "default" / NAME  # the deployment's own lineage under registry.url
    for v in range(5):  # v4 is published but not announced yet
        (registry / f"v{v:06d}").mkdir(parents=True)
    await running(cluster, redis_server, r, registry={"claimName": None, "url": f"file://{tmp_path / 'registry'}"},
                  draft={"keepVersions": 1})
    for v in (1, 2, 3):
        publish(r, v, 0)
    await wait_for(lambda: phase(cluster, 3) == "Canary", what="newest canaried")
    await wait_for(lambda: cluster.get("DraftVersion", f"{NAME}-v1") is cluster.get("DraftVersion", f"{NAME}-v2")
                   is None, what="superseded DraftVersions retired")
    assert phase(cluster, 0) == "Promoted" and phase(cluster, 3) == "Canary"
    await wait_for(lambda: sorted(p.name for p in registry.iterdir()) == ["v000000", "v000003", "v000004"],
                   what="their files deleted")


async def test_wrong_spec_shows_a_condition_and_recovers(cluster: Cluster, operator: Operator,
                                                         redis_server: LocalRedis) -> None:
    doc = tide(redis_server.url, training={"nodeSelector": H100})
    doc["spec"]["redis"] = {"urlSecretRef": {"name": "redis-url", "key": "url"}}
    await cluster.create(doc)
    await wait_for(lambda: cluster.condition(NAME, "Degraded").get("status") == "True", what="Degraded")
    message = cluster.condition(NAME, "Degraded")["message"]
    assert "training.nodeSelector" in message and "'redis-url' does not exist or is not labelled" in message
    assert cluster.get("Deployment", NAME) is None  # nothing is deployed from a wrong spec
    url = base64.b64encode(redis_server.url.encode()).decode()
    await cluster.create({"apiVersion": "v1", "kind": "Secret", "data": {"url": url},
                          "metadata": {"name": "redis-url", "namespace": "default"}})
    await cluster.patch("TideDeployment", NAME, {"spec": {"training": {"nodeSelector": A100}}})
    # a Secret nobody labelled for TIDE is neither read nor referenced
    await wait_for(lambda: "training.nodeSelector" not in cluster.condition(NAME, "Degraded").get("message", "x"),
                   what="the spec fixed")
    assert cluster.condition(NAME, "Degraded")["reason"] == "SecretNotFound"
    assert cluster.get("Deployment", NAME) is None
    await cluster.patch("Secret", "redis-url", {"metadata": {"labels": {"tide.dev/secret": "true"}}})
    await wait_for(lambda: cluster.condition(NAME, "Degraded").get("status") == "False", what="recovery")
    env = pod(cluster, NAME)["containers"][0]["env"]
    assert {"name": "TIDE_REDIS_URL", "valueFrom": {"secretKeyRef": {"name": "redis-url", "key": "url"}}} in env


async def test_refused_child_is_a_condition_not_a_crash(cluster: Cluster, operator: Operator,
                                                        redis_server: LocalRedis) -> None:
    await cluster.create(tide(redis_server.url))
    await wait_for(lambda: cluster.get("Deployment", f"{NAME}-trainer"), what="children")
    cluster.kmock.refusals = frozenset({("deployments", f"{NAME}-trainer")})  # as for an immutable field
    await cluster.patch("TideDeployment", NAME, {"spec": {"training": {"gate": "always"},
                                                          "inference": {"replicas": 3}}})
    await wait_for(lambda: cluster.condition(NAME, "Degraded").get("reason") == "ChildRejected", what="Degraded")
    assert "chat-trainer" in cluster.condition(NAME, "Degraded")["message"]
    assert replicas(cluster, NAME) == 3  # the other children are still applied
    cluster.kmock.refusals = frozenset()
    await wait_for(lambda: cluster.condition(NAME, "Degraded").get("status") == "False", what="recovery")
    env = {e["name"]: e.get("value") for e in pod(cluster, f"{NAME}-trainer")["containers"][0]["env"]}
    assert env["TIDE_TRAIN_GATE"] == "always"


async def test_a_failed_model_fetch_is_a_condition_until_it_succeeds(cluster: Cluster, operator: Operator,
                                                                     redis_server: LocalRedis) -> None:
    """The example's hub-id target and draft are fetched by init containers; one that fails (a pod the test
    plays: kmock runs none, so its status is what a kubelet reports) shows as Degraded, reason ModelFetchFailed,
    with the pod, the container and the end of its log; once the fetch succeeds the condition clears."""
    await cluster.create(tide(redis_server.url))
    await wait_for(lambda: cluster.get("Deployment", f"{NAME}-trainer"), what="children")
    assert [c["name"] for c in pod(cluster, NAME)["initContainers"]] == ["fetch-target", "fetch-draft"]
    labels = cluster.get("Deployment", NAME)["spec"]["selector"]["matchLabels"]
    log = "Error: cannot fetch 'meta-llama/Llama-3.1-8B-Instruct' from the hub: 401 Client Error: Unauthorized\n"
    await cluster.create({"apiVersion": "v1", "kind": "Pod",
                          "metadata": {"name": PODS[0], "namespace": NS, "labels": labels},
                          "spec": {"containers": [{"name": "sglang", "image": "i"}]},
                          "status": {"phase": "Pending", "initContainerStatuses": [
                              {"name": "fetch-target", "state": {"waiting": {"reason": "CrashLoopBackOff"}},
                               "lastState": {"terminated": {"exitCode": 1, "reason": "Error", "message": log}}},
                              {"name": "fetch-draft", "state": {"waiting": {"reason": "PodInitializing"}}}]}})
    await wait_for(lambda: cluster.condition(NAME, "Degraded").get("reason") == "ModelFetchFailed", what="Degraded")
    assert cluster.condition(NAME, "Degraded")["message"] == (
        f"pod {PODS[0]}: init container fetch-target exited 1: " + log.strip())
    assert cluster.condition(NAME, "Ready")["status"] == "False"
    await cluster.patch("Pod", PODS[0], {"status": {"phase": "Running", "initContainerStatuses": [
        {"name": "fetch-target", "state": {"terminated": {"exitCode": 0}}},
        {"name": "fetch-draft", "state": {"terminated": {"exitCode": 0}}}]}})
    await wait_for(lambda: cluster.condition(NAME, "Degraded").get("status") == "False", what="recovery")
    assert_rbac_covers(cluster.kmock)


async def test_objects_it_does_not_own_are_left_alone(cluster: Cluster, operator: Operator,
                                                       redis_server: LocalRedis) -> None:
    """Someone's own Service named like the inference Service: never patched (its selector stays), never deleted,
    and named in the Conflict condition; every other child is still applied."""
    mine = {"apiVersion": "v1", "kind": "Service", "spec": {"selector": {"app": "web"}, "ports": [{"port": 80}]},
            "metadata": {"name": NAME, "namespace": NS, "labels": {"app": "web"}}}
    await cluster.create(mine)
    await cluster.create(tide(redis_server.url))
    await wait_for(lambda: cluster.condition(NAME, "Conflict").get("status") == "True", what="Conflict")
    assert "Service chat exists and is not this TideDeployment's" in cluster.condition(NAME, "Conflict")["message"]
    assert cluster.condition(NAME, "Degraded")["reason"] == "Conflict"
    assert cluster.get("Deployment", NAME) is not None
    assert cluster.get("Service", NAME)["spec"]["selector"] == {"app": "web"}
    await cluster.delete("TideDeployment", NAME)
    await wait_for(lambda: cluster.get("TideDeployment", NAME) is None, what="finalizer released")
    assert cluster.get("Deployment", NAME) is None
    assert cluster.get("Service", NAME)["spec"]["selector"] == {"app": "web"}
    assert_rbac_covers(cluster.kmock)


async def test_managed_redis_gets_a_generated_password_secret(cluster: Cluster, operator: Operator) -> None:
    """Created once, owned, labelled for TIDE, referenced by Redis and the pods; a later pass keeps the password.
    (kmock runs no Redis pod: the rollout waits with RedisUnavailable, which is not what this test is about.)"""
    doc = tide("redis://unused:6379/0")
    doc["spec"]["redis"] = {"managed": {"enabled": True}}
    await cluster.create(doc)
    await wait_for(lambda: cluster.get("Secret", f"{NAME}-redis"), what="password Secret")
    secret = cluster.get("Secret", f"{NAME}-redis")
    td = cluster.get("TideDeployment", NAME)
    assert secret["metadata"]["ownerReferences"][0]["uid"] == td["metadata"]["uid"]
    assert secret["metadata"]["labels"]["tide.dev/secret"] == "true"
    password = secret.get("stringData") or secret["data"]
    assert len(next(iter(password.values()))) >= 32
    await wait_for(lambda: cluster.get("StatefulSet", f"{NAME}-redis"), what="Redis")
    redis_env = cluster.get("StatefulSet", f"{NAME}-redis")["spec"]["template"]["spec"]["containers"][0]["env"]
    ref = {"secretKeyRef": {"name": f"{NAME}-redis", "key": "password"}}
    assert {"name": "REDIS_PASSWORD", "valueFrom": ref} in redis_env
    assert {"name": "TIDE_REDIS_PASSWORD", "valueFrom": ref} in pod(cluster, NAME)["containers"][0]["env"]
    await wait_for(lambda: cluster.get("NetworkPolicy", f"{NAME}-redis"), what="Redis NetworkPolicy")
    await cluster.patch("TideDeployment", NAME, {"spec": {"inference": {"replicas": 3}}})
    await wait_for(lambda: replicas(cluster, NAME) == 3, what="a later pass")
    assert cluster.get("Secret", f"{NAME}-redis") == secret
    assert_rbac_covers(cluster.kmock)


async def test_delete_cleans_up(cluster: Cluster, operator: Operator, redis_server: LocalRedis,
                                r: redis.Redis, engines: Engines) -> None:
    await canary_of_v1(cluster, redis_server, r)
    report(r, 1, 10, 5)
    engines.pods = ()  # the pods go with their Deployment
    await cluster.delete("TideDeployment", NAME)
    await wait_for(lambda: cluster.get("TideDeployment", NAME) is None, what="finalizer released")
    for kind, name in (("Deployment", NAME), ("Deployment", "chat-trainer"), ("Service", NAME),
                       ("DraftVersion", "chat-v0"), ("DraftVersion", "chat-v1")):
        assert cluster.get(kind, name) is None, (kind, name)
    assert r.keys(f"tide:{{{NS}/{NAME}}}:*") == []
    assert_rbac_covers(cluster.kmock)


def assert_rbac_covers(kmock: km.KubernetesEmulator) -> None:
    """Every API call the operator (kopf and our client) made is allowed by the generated ClusterRole."""
    verbs = {km.action.LIST: "list", km.action.WATCH: "watch", km.action.FETCH: "get",
             km.action.CREATE: "create", km.action.UPDATE: "patch", km.action.DELETE: "delete"}
    allowed = {(g, res, v) for rule in rbac_rules() for g in rule["apiGroups"] for res in rule["resources"]
               for v in rule["verbs"]}
    seen = set()
    for req in kmock:
        agent = req.headers.get("User-Agent", "")
        if req.resource is None or req.resource.plural is None or req.action is None \
                or not agent.startswith(("kopf", "tide-operator")):
            continue  # discovery (allowed to every user), or the test's own requests
        plural = req.resource.plural + (f"/{req.subresource}" if req.subresource else "")
        seen.add((req.resource.group, plural, verbs[req.action]))
    assert seen, "no operator requests recorded"
    assert seen <= allowed, seen - allowed
