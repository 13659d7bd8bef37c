"""Manifest builders, three-way patches, validation and conditions (pure functions: no cluster)."""

import pytest
import yaml
from tide_operator import builders
from tide_operator.kube import merge_patch
from tide_operator.models import Condition, SecretKeyRef, TideDeploymentSpec
from tide_operator.rollout import Routing
from tide_operator.status import Pods, Problem, check_pin, check_secret, conditions, parse

from tests.operator.crdcheck import ROOT

H100 = {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
L40S = {"nvidia.com/gpu.product": "NVIDIA-L40S"}


def example(name: str) -> TideDeploymentSpec:
    doc = yaml.safe_load((ROOT / "docs/examples" / name).read_text())
    return TideDeploymentSpec.model_validate(doc["spec"])


def env_of(dep: dict) -> dict[str, object]:
    env = dep["spec"]["template"]["spec"]["containers"][0]["env"]
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in env}


def by_name(objs: list[dict]) -> dict[tuple[str, str], dict]:
    return {(o["kind"], o["metadata"]["name"]): o for o in objs}


def test_pools_placement_for_inference_and_training() -> None:
    spec = example("tidedeployment-full.yaml")
    kids = by_name(builders.children("qwen", "ns", spec, canary_active=False))
    for role in ("stable", "canary"):
        pod = kids["Deployment", f"qwen-{role}"]["spec"]["template"]["spec"]
        assert pod["nodeSelector"] == H100
        assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
        assert pod["affinity"]["podAntiAffinity"]
        assert pod["containers"][0]["resources"] == {"requests": {"cpu": 16, "memory": "128Gi"},
                                                      "limits": {"memory": "160Gi", "nvidia.com/gpu": 2}}
    trainer = kids["Deployment", "qwen-trainer"]["spec"]["template"]["spec"]
    assert trainer["nodeSelector"] == L40S
    assert trainer["tolerations"] == [{"key": "pool", "operator": "Equal", "value": "training",
                                       "effect": "NoSchedule"}]
    assert "affinity" not in trainer
    assert trainer["containers"][0]["resources"] == {"requests": {"cpu": 8, "memory": "64Gi"},
                                                     "limits": {"nvidia.com/gpu": 1}}
    assert trainer["containers"][0]["image"] == "ghcr.io/example/tide-trainer:0.1.0"


def test_amd_training_pool_uses_its_gpu_resource() -> None:
    spec = example("tidedeployment-amd-pinned.yaml")
    trainer = builders.trainer_deployment("m", "ns", spec)["spec"]["template"]["spec"]
    assert trainer["containers"][0]["resources"]["limits"] == {"amd.com/gpu": 1}
    assert trainer["nodeSelector"] == {"amd.com/gpu.product-name": "AMD-Instinct-MI250X"}


def test_env_wiring() -> None:
    spec = example("tidedeployment-minimal.yaml")
    stable = env_of(builders.inference_deployment("llama", "serving", spec, "stable", 3))
    canary = env_of(builders.inference_deployment("llama", "serving", spec, "canary", 1))
    trainer = env_of(builders.trainer_deployment("llama", "serving", spec))
    assert stable["TIDE_ROLE"] == "stable" and canary["TIDE_ROLE"] == "canary" and "TIDE_ROLE" not in trainer
    for env in (stable, canary, trainer):
        assert env["TIDE_DEPLOYMENT"] == "llama"
        assert env["TIDE_REDIS_URL"] == "redis://redis.tide-system.svc:6379/0"
        assert env["TIDE_REGISTRY_DIR"] == "/var/lib/tide/registry"
        assert env["TIDE_TARGET"] == "meta-llama/Llama-3.1-8B-Instruct"
        assert env["TIDE_TRIGGER_EPSILON"] == "0.02"
        assert set(env) <= builders.RESERVED_ENV
    assert trainer["TIDE_TRAIN_GATE"] == "trigger"


def test_env_wiring_from_secrets_and_managed_redis() -> None:
    env = env_of(builders.inference_deployment("m", "ns", example("tidedeployment-amd-pinned.yaml"), "stable", 1))
    assert env["TIDE_REDIS_URL"] == {"secretKeyRef": {"name": "tide-redis", "key": "url"}}
    assert env["TIDE_REDIS_PASSWORD"] == {"secretKeyRef": {"name": "tide-redis", "key": "password"}}
    assert env["TIDE_REDIS_CLUSTER"] == "true"
    env = env_of(builders.trainer_deployment("q", "ns", example("tidedeployment-full.yaml")))
    assert env["TIDE_REDIS_URL"] == "redis://q-redis.ns.svc:6379/0"
    assert env["TIDE_REGISTRY_URL"] == "s3://tide-drafts/qwen-coder"


def test_sglang_args_end_with_user_args_and_model_on_pvc() -> None:
    spec = example("tidedeployment-full.yaml")
    pod = builders.inference_deployment("q", "ns", spec, "stable", 1)["spec"]["template"]["spec"]
    args = pod["containers"][0]["args"]
    assert args[args.index("--model-path") + 1] == "/models/Qwen2.5-Coder-32B-Instruct"
    assert args[args.index("--speculative-draft-model-path") + 1] == "/models/qwen-coder-eagle3"
    assert pod["containers"][0]["command"] == ["tide", "serve"]
    assert pod["containers"][0]["env"][-1] == {"name": "TIDE_CONTROL_MAX_STEPS", "value": "4"}
    assert args[args.index("--tp-size") + 1] == "2"
    assert args[-4:] == ["--mem-fraction-static", "0.85", "--speculative-num-steps", "3"]


@pytest.mark.parametrize(("replicas", "percent", "count", "active", "expected"), [
    (4, None, 1, False, (4, 0)),
    (4, None, 1, True, (3, 1)),
    (8, 25, 1, True, (6, 2)),
    (3, 10, 1, True, (2, 1)),  # a percentage rounds up to at least one pod
    (1, None, 1, True, (1, 1)),  # one replica: the canary is a surge pod, stable keeps serving
    (2, None, 5, True, (1, 5)),
])
def test_replica_split(replicas: int, percent: int | None, count: int, active: bool, expected: tuple) -> None:
    spec = example("tidedeployment-minimal.yaml").model_copy(deep=True)
    spec.inference.replicas = replicas
    spec.rollout.canary_percent, spec.rollout.canary_replicas = percent, count
    assert builders.replica_split(spec, active) == expected


def test_children_set_follows_spec() -> None:
    minimal = by_name(builders.children("a", "ns", example("tidedeployment-minimal.yaml"), False))
    assert set(minimal) == {("Deployment", "a-stable"), ("Deployment", "a-canary"), ("Service", "a"),
                            ("Deployment", "a-trainer")}
    full = by_name(builders.children("a", "ns", example("tidedeployment-full.yaml"), True))
    assert set(full) - set(minimal) == {("StatefulSet", "a-redis"), ("Service", "a-redis"),
                                        ("PodMonitor", "a"), ("ServiceMonitor", "a")}
    assert set(full) <= set(builders.possible_children("a"))
    assert full["PodMonitor", "a"]["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    sts = full["StatefulSet", "a-redis"]["spec"]
    assert sts["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"] == "20Gi"
    assert full["Service", "a"]["spec"]["selector"] == {"tide.dev/deployment": "a",
                                                        "app.kubernetes.io/component": "inference"}


def test_promotion_changes_no_pod_template() -> None:
    """Versions come from Redis: a canary starting or ending only moves replicas, so no pod restarts."""
    spec = example("tidedeployment-minimal.yaml")
    idle = by_name(builders.children("a", "ns", spec, False))
    busy = by_name(builders.children("a", "ns", spec, True))
    for key in idle:
        if idle[key]["kind"] == "Deployment":
            assert idle[key]["spec"]["template"] == busy[key]["spec"]["template"]


@pytest.mark.parametrize(("old", "new", "patch"), [
    ({"a": 1}, {"a": 1}, {}),
    ({"a": 1, "b": 2}, {"a": 1}, {"b": None}),
    ({"s": {"x": "1", "y": "2"}}, {"s": {"x": "1"}}, {"s": {"y": None}}),  # a removed nodeSelector label
    ({"l": [1, 2]}, {"l": [2]}, {"l": [2]}),  # lists are replaced whole
    ({}, {"n": {"k": 1}}, {"n": {"k": 1}}),
])
def test_merge_patch(old: dict, new: dict, patch: dict) -> None:
    assert merge_patch(old, new) == patch


def test_semantic_problems() -> None:
    good = yaml.safe_load((ROOT / "docs/examples/tidedeployment-minimal.yaml").read_text())["spec"]
    assert parse("llama", good)[1] == []
    same = {**good, "training": {"nodeSelector": good["inference"]["nodeSelector"]}}
    assert [p.reason for p in parse("llama", same)[1]] == ["SamePool"]
    allowed = {**good, "training": {"nodeSelector": good["inference"]["nodeSelector"], "separatePool": False}}
    assert parse("llama", allowed)[1] == []
    two_redis = {**good, "redis": {"url": "redis://a:6379", "managed": {"enabled": True}}}
    assert [p.reason for p in parse("llama", two_redis)[1]] == ["InvalidRedis"]
    assert [p.reason for p in parse("llama", {**good, "registry": {}})[1]] == ["InvalidRegistry"]
    assert [p.reason for p in parse("Bad.Name", good)[1]] == ["InvalidName"]
    reserved = {**good, "inference": {**good["inference"], "env": [{"name": "TIDE_ROLE", "value": "canary"}]}}
    assert [p.reason for p in parse("llama", reserved)[1]] == ["ReservedEnv"]
    spec, problems = parse("llama", {**good, "inference": {"replicas": "many"}})
    assert spec is None and problems[0].reason == "InvalidSpec" and "spec.inference" in problems[0].message


def test_secret_and_pin_checks() -> None:
    ref = SecretKeyRef(name="s", key="url")
    assert check_secret("redis.urlSecretRef", ref, None).reason == "SecretNotFound"
    assert check_secret("redis.urlSecretRef", ref, {"data": {"other": "eA=="}}).reason == "SecretKeyNotFound"
    assert check_secret("redis.urlSecretRef", ref, {"data": {"url": "eA=="}}) is None
    spec = example("tidedeployment-amd-pinned.yaml")
    assert check_pin(spec, {0, 3}) == []
    assert check_pin(spec, {0, 1})[0].reason == "UnknownVersion"


def _conds(problems: list[Problem], pods: dict, route: Routing, old: list[Condition] = (),
           now: str = "t1") -> dict[str, Condition]:
    spec = example("tidedeployment-minimal.yaml")
    return {c.type: c for c in conditions(3, problems, pods, route, spec, list(old), now)}


@pytest.mark.parametrize(("problems", "pods", "route", "expected"), [
    ([], {"a-stable": Pods(2, 2)}, Routing(0, None),
     {"Ready": ("True", "AllPodsReady"), "Progressing": ("False", "Stable"), "Degraded": ("False", "AsExpected"),
      "RolloutPaused": ("False", "Automatic")}),
    ([], {"a-stable": Pods(2, 1)}, Routing(0, None),
     {"Ready": ("False", "PodsNotReady"), "Progressing": ("True", "PodsStarting")}),
    ([], {"a-stable": Pods(2, 2)}, Routing(1, 2), {"Progressing": ("True", "Canary")}),
    ([Problem("SamePool", "x"), Problem("SecretNotFound", "y")], {}, Routing(0, None),
     {"Ready": ("False", "Degraded"), "Degraded": ("True", "SamePool"), "RolloutPaused": ("True", "Degraded")}),
])
def test_conditions(problems: list, pods: dict, route: Routing, expected: dict) -> None:
    got = _conds(problems, pods, route)
    assert {k: (got[k].status, got[k].reason) for k in expected} == expected
    assert all(c.observed_generation == 3 for c in got.values())


def test_conditions_keep_transition_time_while_status_holds() -> None:
    first = _conds([], {"a-stable": Pods(1, 0)}, Routing(0, None), now="t1")
    second = _conds([], {"a-stable": Pods(1, 1)}, Routing(0, None), old=list(first.values()), now="t2")
    assert second["Degraded"].last_transition_time == "t1"
    assert second["Ready"].last_transition_time == "t2"


@pytest.mark.parametrize("name", ["tidedeployment-minimal.yaml", "tidedeployment-full.yaml",
                                  "tidedeployment-amd-pinned.yaml"])
def test_built_in_children_validate_against_kubernetes_schemas(name: str) -> None:
    """Deployments, Services and StatefulSets checked with the API's own OpenAPI schemas (strict: unknown
    fields fail); PodMonitor/ServiceMonitor are CRDs of the Prometheus Operator and not covered."""
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    built_in = {"Deployment", "Service", "StatefulSet"}
    kids = [c for c in builders.children("a", "ns", example(name), True) if c["kind"] in built_in]
    assert kids
    for child in kids:
        kubernetes_validate.validate(child, "1.30", strict=True)
