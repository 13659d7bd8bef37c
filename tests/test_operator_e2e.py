"""End to end: the real kopf operator (tide_operator.handlers) against kmock and a real redis-server.

Only the Kubernetes API is emulated (kmock, see tests/operator/harness.py for what it lacks). Redis is a
real `redis-server` (LocalRedis); the tests play the trainer (XADD to the events stream) and the engines
(HINCRBY on the stats hashes, HGETALL of the control hash), exactly as the Redis contract says.
"""

import base64
import copy
import json

import kmock as km
import pytest
import redis
import yaml
from tide_operator.generate import rbac_rules

from tests.operator.crdcheck import ROOT
from tests.operator.harness import ApiServer, Cluster, Operator, cluster_fixture, operator_fixture, wait_for  # noqa: F401
from tide_sglang import keys
from tide_sglang.stream.server import LocalRedis

pytestmark = [pytest.mark.asyncio, pytest.mark.kmock(cls=ApiServer)]

NAME = "chat"
H100 = {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
A100 = {"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB"}


def tide(redis_url: str, **spec_overrides: object) -> dict:
    doc = yaml.safe_load((ROOT / "docs/examples/tidedeployment-minimal.yaml").read_text())
    doc["metadata"] = {"name": NAME, "namespace": "default"}
    doc["spec"]["redis"] = {"url": redis_url}
    doc["spec"]["inference"]["replicas"] = 2
    doc["spec"]["rollout"] = {"minTokens": 1000, "maxTokens": 100_000}
    doc["spec"].update(copy.deepcopy(spec_overrides))
    return doc


@pytest.fixture
def r(redis_server: LocalRedis) -> redis.Redis:
    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    yield client
    client.close()


def control(r: redis.Redis) -> dict[str, str]:
    return r.hgetall(keys.control("default", NAME))


def publish(r: redis.Redis, version: int, parent: int) -> None:
    """What the trainer does after DraftRegistry.publish."""
    r.xadd(keys.events("default", NAME), {"version": version, "parent": parent, "metrics": json.dumps({"acc": 0.7})})


def report(r: redis.Redis, version: int, tokens: int, accepted: int, swap_failures: int = 0) -> None:
    """What engines do for the version that drafted the tokens."""
    key = keys.stats("default", NAME, version)
    r.hincrby(key, "tokens", tokens)
    r.hincrby(key, "accepted", accepted)
    r.hincrby(key, "verify_steps", tokens // 4)
    r.hincrby(key, "swap_failures", swap_failures)


def phase(cluster: Cluster, version: int) -> str | None:
    return ((cluster.get("DraftVersion", f"{NAME}-v{version}") or {}).get("status") or {}).get("phase")


def replicas(cluster: Cluster, name: str) -> int | None:
    return ((cluster.get("Deployment", name) or {}).get("spec") or {}).get("replicas")


async def canary_of_v1(cluster: Cluster, redis_server: LocalRedis, r: redis.Redis) -> None:
    """A TideDeployment whose trainer has just published v1, now in canary."""
    await cluster.create(tide(redis_server.url))
    await wait_for(lambda: control(r) == {"stable": "0"}, what="control hash")
    publish(r, 1, 0)
    await wait_for(lambda: phase(cluster, 1) == "Canary", what="canary")


def pod(cluster: Cluster, name: str) -> dict:
    return cluster.get("Deployment", name)["spec"]["template"]["spec"]


async def test_create_puts_children_on_the_right_pools(cluster: Cluster, operator: Operator,
                                                       redis_server: LocalRedis, r: redis.Redis) -> None:
    await cluster.create(tide(redis_server.url))
    await wait_for(lambda: cluster.get("Deployment", f"{NAME}-trainer"), what="children")
    td = cluster.get("TideDeployment", NAME)
    for child in ("chat-stable", "chat-canary", "chat-trainer"):
        dep = cluster.get("Deployment", child)
        assert dep["metadata"]["ownerReferences"][0]["uid"] == td["metadata"]["uid"]
    assert pod(cluster, "chat-stable")["nodeSelector"] == H100
    assert pod(cluster, "chat-trainer")["nodeSelector"] == A100
    env = {e["name"]: e.get("value") for e in pod(cluster, "chat-canary")["containers"][0]["env"]}
    assert env["TIDE_ROLE"] == "canary" and env["TIDE_DEPLOYMENT"] == NAME and env["TIDE_REDIS_URL"] == redis_server.url
    assert (replicas(cluster, "chat-stable"), replicas(cluster, "chat-canary")) == (2, 0)
    assert cluster.get("Service", NAME)["spec"]["selector"]["tide.dev/deployment"] == NAME
    # the initial draft is version 0, stable, and announced to the engines
    await wait_for(lambda: phase(cluster, 0) == "Promoted", what="DraftVersion v0")
    await wait_for(lambda: control(r) == {"stable": "0"}, what="control hash")
    # Ready once the pods are (the test plays the Deployment controller)
    await wait_for(lambda: cluster.condition(NAME, "Ready").get("reason") == "PodsNotReady", what="not Ready")
    cluster.mark_ready("chat-stable", "chat-canary", "chat-trainer")
    await wait_for(lambda: cluster.condition(NAME, "Ready").get("status") == "True", what="Ready")
    cond = cluster.condition(NAME, "Degraded")
    assert cond["status"] == "False" and cond["observedGeneration"] == 1
    assert cluster.get("TideDeployment", NAME)["status"]["stable"] == 0


async def test_spec_change_updates_children(cluster: Cluster, operator: Operator, redis_server: LocalRedis) -> None:
    await cluster.create(tide(redis_server.url))
    await wait_for(lambda: cluster.get("Deployment", f"{NAME}-trainer"), what="children")
    l40s = {"nvidia.com/gpu.product": "NVIDIA-L40S"}
    await cluster.patch("TideDeployment", NAME, {"spec": {
        "inference": {"replicas": 5, "nodeSelector": {"nvidia.com/gpu.product": "NVIDIA-H200"}},
        "training": {"nodeSelector": l40s, "tolerations": [{"key": "pool", "operator": "Exists"}]},
        "monitoring": {"podMonitor": True}}})
    await wait_for(lambda: replicas(cluster, "chat-stable") == 5, what="replicas")
    assert pod(cluster, "chat-stable")["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H200"}
    await wait_for(lambda: pod(cluster, "chat-trainer")["nodeSelector"] == l40s, what="training pool")
    assert pod(cluster, "chat-trainer")["tolerations"] == [{"key": "pool", "operator": "Exists"}]
    await wait_for(lambda: cluster.get("PodMonitor", NAME), what="PodMonitor")
    # switching the trainer off removes it; observedGeneration follows the spec
    await cluster.patch("TideDeployment", NAME, {"spec": {"training": {"enabled": False}}})
    await wait_for(lambda: cluster.get("Deployment", f"{NAME}-trainer") is None, what="trainer deleted")
    await wait_for(lambda: cluster.condition(NAME, "Degraded").get("observedGeneration") == 3, what="generation")


async def test_published_version_is_canaried_promoted_then_rolled_back_by_pin(
        cluster: Cluster, operator: Operator, redis_server: LocalRedis, r: redis.Redis) -> None:
    await cluster.create(tide(redis_server.url))
    await wait_for(lambda: control(r) == {"stable": "0"}, what="control hash")
    report(r, 0, 50_000, 30_000)  # stable traffic before the canary: not part of the comparison
    publish(r, 1, 0)
    await wait_for(lambda: phase(cluster, 1) == "Canary", what="canary")
    assert control(r) == {"stable": "0", "canary": "1"}
    await wait_for(lambda: replicas(cluster, "chat-canary") == 1, what="canary pod")
    assert replicas(cluster, "chat-stable") == 1
    await wait_for(lambda: cluster.get("TideDeployment", NAME)["status"].get("candidate") == 1, what="status")
    report(r, 0, 2_000, 1_200)  # stable 0.60 over the window
    report(r, 1, 2_000, 1_500)  # canary 0.75
    await wait_for(lambda: phase(cluster, 1) == "Promoted", what="promotion")
    await wait_for(lambda: control(r) == {"stable": "1"}, what="control hash after promotion")
    await wait_for(lambda: replicas(cluster, "chat-canary") == 0, what="canary scaled away")
    await wait_for(lambda: cluster.get("TideDeployment", NAME)["status"]["stable"] == 1, what="status")
    assert "canary" not in cluster.get("TideDeployment", NAME)["status"]
    # manual rollback: pin version 0
    await cluster.patch("TideDeployment", NAME, {"spec": {"draft": {"version": 0}}})
    await wait_for(lambda: phase(cluster, 1) == "RolledBack", what="manual rollback")
    await wait_for(lambda: control(r) == {"stable": "0"}, what="control hash after pin")
    await wait_for(lambda: cluster.condition(NAME, "RolloutPaused").get("reason") == "Pinned", what="paused")


async def test_worse_candidate_is_rolled_back(cluster: Cluster, operator: Operator, redis_server: LocalRedis,
                                              r: redis.Redis) -> None:
    await canary_of_v1(cluster, redis_server, r)
    report(r, 0, 3_000, 2_100)  # 0.70
    report(r, 1, 3_000, 1_500)  # 0.50
    await wait_for(lambda: phase(cluster, 1) == "RolledBack", what="rollback")
    dv = cluster.get("DraftVersion", f"{NAME}-v1")
    assert dv["status"]["reason"] == "WorseAcceptance" and dv["status"]["acceptance"] == 0.5
    assert dv["spec"] == {"deployment": NAME, "version": 1, "parent": 0, "metrics": {"acc": 0.7}}
    await wait_for(lambda: control(r) == {"stable": "0"}, what="canary withdrawn")
    await wait_for(lambda: replicas(cluster, "chat-canary") == 0, what="canary scaled away")


async def test_restart_mid_rollout_continues(cluster: Cluster, operator: Operator, redis_server: LocalRedis,
                                             r: redis.Redis) -> None:
    await canary_of_v1(cluster, redis_server, r)
    await operator.stop()
    report(r, 0, 2_000, 1_000)
    report(r, 1, 2_000, 1_600)
    publish(r, 2, 1)  # published while the operator was down
    await operator.start()
    await wait_for(lambda: phase(cluster, 1) == "Promoted", what="promotion after restart")
    await wait_for(lambda: phase(cluster, 2) == "Canary", what="next canary")
    dv2 = cluster.get("DraftVersion", f"{NAME}-v2")
    assert dv2["status"]["baseline"]["version"] == 1 and dv2["status"]["baseline"]["tokens"] == 2_000
    assert len([o for o in cluster.kmock.objects if o[0].plural == "draftversions"]) == 3  # v0, v1, v2 once


async def test_wrong_spec_shows_a_condition_and_recovers(cluster: Cluster, operator: Operator,
                                                         redis_server: LocalRedis) -> None:
    doc = tide(redis_server.url, training={"nodeSelector": H100})
    doc["spec"]["redis"] = {"urlSecretRef": {"name": "redis-url", "key": "url"}}
    await cluster.create(doc)
    await wait_for(lambda: cluster.condition(NAME, "Degraded").get("status") == "True", what="Degraded")
    message = cluster.condition(NAME, "Degraded")["message"]
    assert "training.nodeSelector" in message and "'redis-url' does not exist" in message
    assert cluster.get("Deployment", f"{NAME}-stable") is None  # nothing is deployed from a wrong spec
    url = base64.b64encode(redis_server.url.encode()).decode()
    await cluster.create({"apiVersion": "v1", "kind": "Secret", "data": {"url": url},
                          "metadata": {"name": "redis-url", "namespace": "default"}})
    await cluster.patch("TideDeployment", NAME, {"spec": {"training": {"nodeSelector": A100}}})
    await wait_for(lambda: cluster.condition(NAME, "Degraded").get("status") == "False", what="recovery")
    env = pod(cluster, "chat-stable")["containers"][0]["env"]
    assert {"name": "TIDE_REDIS_URL", "valueFrom": {"secretKeyRef": {"name": "redis-url", "key": "url"}}} in env


async def test_refused_child_is_a_condition_not_a_crash(cluster: Cluster, operator: Operator,
                                                        redis_server: LocalRedis) -> None:
    await cluster.create(tide(redis_server.url))
    await wait_for(lambda: cluster.get("Deployment", f"{NAME}-trainer"), what="children")
    cluster.kmock.refusals = frozenset({("deployments", f"{NAME}-trainer")})  # as for an immutable field
    await cluster.patch("TideDeployment", NAME, {"spec": {"training": {"replicas": 2},
                                                          "inference": {"replicas": 3}}})
    await wait_for(lambda: cluster.condition(NAME, "Degraded").get("reason") == "ChildRejected", what="Degraded")
    assert "chat-trainer" in cluster.condition(NAME, "Degraded")["message"]
    assert replicas(cluster, "chat-stable") == 3  # the other children are still applied
    cluster.kmock.refusals = frozenset()
    await wait_for(lambda: cluster.condition(NAME, "Degraded").get("status") == "False", what="recovery")
    assert replicas(cluster, "chat-trainer") == 2


async def test_delete_cleans_up(cluster: Cluster, operator: Operator, redis_server: LocalRedis,
                                r: redis.Redis) -> None:
    await cluster.create(tide(redis_server.url))
    publish(r, 1, 0)
    await wait_for(lambda: phase(cluster, 1) == "Canary", what="canary")
    report(r, 1, 10, 5)
    await cluster.delete("TideDeployment", NAME)
    await wait_for(lambda: cluster.get("TideDeployment", NAME) is None, what="finalizer released")
    for kind, name in (("Deployment", "chat-stable"), ("Deployment", "chat-trainer"), ("Service", NAME),
                       ("DraftVersion", "chat-v0"), ("DraftVersion", "chat-v1")):
        assert cluster.get(kind, name) is None, (kind, name)
    assert r.keys(f"tide:{{{NAME}}}:*") == []
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
