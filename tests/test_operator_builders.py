"""Manifest builders, three-way patches, validation and conditions (pure functions: no cluster)."""

import pytest
import yaml
from tide_operator import builders
from tide_operator.kube import merge_patch
from tide_operator.models import Condition, SecretKeyRef, TideDeploymentSpec
from tide_operator.rollout import Fleet, Routing
from tide_operator.status import Pods, Problem, check_pin, check_secret, conditions, init_failures, parse

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
    kids = by_name(builders.children("qwen", "ns", spec))
    for pod in [kids["Deployment", "qwen"]["spec"]["template"]["spec"]]:
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
    assert trainer["containers"][0]["image"] == "ghcr.io/tide-sglang/tide-trainer:0.1.0"


def test_amd_training_pool_uses_its_gpu_resource() -> None:
    spec = example("tidedeployment-amd-pinned.yaml")
    trainer = builders.trainer_deployment("m", "ns", spec)["spec"]["template"]["spec"]
    # the pool's default memory limit (no resources in the example), and its GPU resource
    assert trainer["containers"][0]["resources"]["limits"] == {"memory": "32Gi", "amd.com/gpu": 1}
    assert trainer["nodeSelector"] == {"amd.com/gpu.product-name": "AMD-Instinct-MI250X"}


def test_env_wiring() -> None:
    spec = example("tidedeployment-minimal.yaml")
    inference = env_of(builders.inference_deployment("llama", "serving", spec))
    trainer = env_of(builders.trainer_deployment("llama", "serving", spec))
    # pods know their own name (the operator names canary pods by it) and namespace from the downward API
    assert inference["TIDE_POD_NAME"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    assert inference["TIDE_HEARTBEAT_S"] == "5" and "TIDE_POD_NAME" not in trainer
    for env in (inference, trainer):
        assert env["TIDE_NAMESPACE"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}
        assert env["TIDE_DEPLOYMENT"] == "llama"
        assert env["TIDE_REDIS_URL"] == "redis://redis.tide-system.svc:6379/0"
        assert env["TIDE_REGISTRY_DIR"] == "/var/lib/tide/registry"
        assert env["TIDE_TARGET"] == "/var/cache/tide/models/target"  # the hub id, fetched by an init container
        assert env["TIDE_TRIGGER_EPSILON"] == "0.02"
        assert set(env) - {"HOME", "USER"} <= builders.RESERVED_ENV
    assert trainer["TIDE_TRAIN_GATE"] == "trigger"


def test_env_wiring_from_secrets_and_managed_redis() -> None:
    env = env_of(builders.inference_deployment("m", "ns", example("tidedeployment-amd-pinned.yaml")))
    assert env["TIDE_REDIS_URL"] == {"secretKeyRef": {"name": "tide-redis", "key": "url"}}
    assert env["TIDE_REDIS_PASSWORD"] == {"secretKeyRef": {"name": "tide-redis", "key": "password"}}
    assert env["TIDE_REDIS_CLUSTER"] == "true"
    env = env_of(builders.trainer_deployment("q", "ns", example("tidedeployment-full.yaml")))
    assert env["TIDE_REDIS_URL"] == "redis://q-redis.ns.svc:6379/0"
    assert env["TIDE_REGISTRY_URL"] == "s3://tide-drafts/qwen-coder/ns/q"  # the deployment's own lineage


def test_each_deployment_has_its_own_registry_lineage() -> None:
    """A PVC is mounted at the deployment's sub-path; an S3 URL gets <namespace>/<name> appended, and its
    endpoint and keys reach boto3 through its own variables, the keys from Secrets only."""
    spec = example("tidedeployment-minimal.yaml")
    for dep in (builders.inference_deployment("llama", "serving", spec),
                builders.trainer_deployment("llama", "serving", spec)):
        mount = next(m for m in dep["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]
                     if m["name"] == "registry")
        assert (mount["mountPath"], mount["subPath"]) == ("/var/lib/tide/registry", "serving/llama")
    ref = {"name": "drafts-s3", "key": "secret"}
    s3 = spec.model_copy(update={"registry": spec.registry.model_validate({
        "url": "s3://drafts/team/", "endpoint": "http://weed.storage.svc:8333", "region": "eu-west-1",
        "accessKeyIdSecretRef": {"name": "drafts-s3", "key": "id"}, "secretAccessKeySecretRef": ref})})
    env = env_of(builders.trainer_deployment("chat", "serving", s3))
    assert env["TIDE_REGISTRY_URL"] == "s3://drafts/team/serving/chat" and "TIDE_REGISTRY_DIR" not in env
    assert (env["AWS_ENDPOINT_URL_S3"], env["AWS_REGION"]) == ("http://weed.storage.svc:8333", "eu-west-1")
    assert env["AWS_ACCESS_KEY_ID"] == {"secretKeyRef": {"name": "drafts-s3", "key": "id"}}
    assert env["AWS_SECRET_ACCESS_KEY"] == {"secretKeyRef": ref}
    assert set(env) - {"HOME", "USER"} <= builders.RESERVED_ENV
    pod = builders.trainer_deployment("chat", "serving", s3)["spec"]["template"]["spec"]
    assert all(v["name"] != "registry" for v in pod["volumes"])


def _init(dep: dict) -> dict[str, dict]:
    return {c["name"]: c for c in dep["spec"]["template"]["spec"].get("initContainers", [])}


def test_hub_models_are_fetched_once_per_pod_and_the_draft_starts_the_lineage() -> None:
    """Hub ids (the quickstart's) become local directories on the model-cache volume: SGLang gets paths, so hot
    swap can compare the served checkpoint; the trainer fetches only the target's heads and imports the draft as
    v0 into an empty registry. The hub token comes from a Secret only."""
    doc = example("tidedeployment-minimal.yaml").model_dump(by_alias=True)
    doc["model"]["hubTokenSecretRef"] = {"name": "hf", "key": "token"}
    doc["inference"]["env"] = [{"name": "HF_HUB_OFFLINE", "value": "1"}]
    spec = TideDeploymentSpec.model_validate(doc)
    inf = builders.inference_deployment("llama", "serving", spec)
    args = inf["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--model-path") + 1] == "/var/cache/tide/models/target"
    assert args[args.index("--speculative-draft-model-path") + 1] == "/var/cache/tide/models/draft"
    init = _init(inf)
    assert init["fetch-target"]["command"] == ["tide", "fetch", "meta-llama/Llama-3.1-8B-Instruct",
                                               "/var/cache/tide/models/target"]
    assert init["fetch-draft"]["command"][2] == spec.draft.initial_path
    env = {e["name"]: e.get("value", e.get("valueFrom")) for e in init["fetch-target"]["env"]}
    assert env["HF_TOKEN"] == {"secretKeyRef": {"name": "hf", "key": "token"}} and env["HF_HUB_OFFLINE"] == "1"
    assert env["HF_HUB_CACHE"] == "/var/cache/tide/models/hub"
    pod = inf["spec"]["template"]["spec"]
    assert {"name": "model-cache", "emptyDir": {}} in pod["volumes"]
    assert {"name": "model-cache", "mountPath": "/var/cache/tide/models"} in pod["containers"][0]["volumeMounts"]

    trainer = _init(builders.trainer_deployment("llama", "serving", spec))
    assert list(trainer) == ["fetch-target", "fetch-draft", "import-draft"]
    assert trainer["fetch-target"]["command"][-1] == "--heads-only"
    assert trainer["import-draft"]["command"] == ["tide", "import", "/var/cache/tide/models/draft", "--if-empty"]
    assert any(m["name"] == "registry" for m in trainer["import-draft"]["volumeMounts"])


def test_pvc_and_s3_model_sources() -> None:
    spec = example("tidedeployment-minimal.yaml")
    spec = spec.model_copy(update={"model": spec.model.model_copy(update={"path": "pvc://weights/llama/8b"}),
                                   "draft": spec.draft.model_copy(update={"initial_path": "s3://drafts/eagle"})})
    inf = builders.inference_deployment("llama", "serving", spec)
    pod = inf["spec"]["template"]["spec"]
    args = pod["containers"][0]["args"]
    assert args[args.index("--model-path") + 1] == "/var/lib/tide/models/weights/llama/8b"
    assert {"name": "model-pvc-0", "persistentVolumeClaim": {"claimName": "weights", "readOnly": True}} in \
        pod["volumes"]
    assert list(_init(inf)) == ["fetch-draft"]
    assert [p.reason for p in parse("llama", {**yaml.safe_load((ROOT / "docs/examples/tidedeployment-minimal.yaml")
                                                                .read_text())["spec"],
                                              "model": {"path": "http://example.com/m"}})[1]] == ["InvalidModel"]


def _pod(name: str, *statuses: dict) -> dict:
    return {"metadata": {"name": name}, "status": {"initContainerStatuses": list(statuses)}}


def test_failed_init_containers_become_problems() -> None:
    """What a kubelet reports for a failed fetch (Init:Error, then Init:CrashLoopBackOff with the failure in
    lastState), a fetch retrying, a fetch that failed once and then succeeded, and the draft import."""
    log = "Downloading...\nError: cannot fetch 'meta-llama/Llama-3.1-8B-Instruct' from the hub: 401 Unauthorized\n"
    failed = {"terminated": {"exitCode": 1, "reason": "Error", "message": log}}
    pods = [
        _pod("chat-1", {"name": "fetch-target", "state": failed},
             {"name": "fetch-draft", "state": {"waiting": {"reason": "PodInitializing"}}}),
        _pod("chat-2", {"name": "fetch-target", "state": {"waiting": {"reason": "CrashLoopBackOff"}},
                        "lastState": failed}),
        _pod("chat-3", {"name": "fetch-target", "state": {"terminated": {"exitCode": 0}}, "lastState": failed},
             {"name": "fetch-draft", "state": {"running": {}}}),
        _pod("chat-trainer-1", {"name": "import-draft", "state": {"terminated": {"exitCode": 2, "reason": "Error"}}}),
        _pod("chat-4"), {"metadata": {"name": "chat-5"}},
    ]
    problems = init_failures(pods)
    assert [p.reason for p in problems] == ["ModelFetchFailed", "DraftImportFailed"]
    assert problems[0].message == ("pod chat-1: init container fetch-target exited 1: Error: cannot fetch "
                                   "'meta-llama/Llama-3.1-8B-Instruct' from the hub: 401 Unauthorized")
    assert problems[1].message == "pod chat-trainer-1: init container import-draft exited 2: Error"
    assert init_failures(pods[2:3]) == [] and init_failures(pods[1:2])[0].reason == "ModelFetchFailed"
    for dep in (builders.inference_deployment("llama", "serving", example("tidedeployment-minimal.yaml")),
                builders.trainer_deployment("llama", "serving", example("tidedeployment-minimal.yaml"))):
        for c in _init(dep).values():  # the end of the log becomes the termination message read above
            assert c["terminationMessagePolicy"] == "FallbackToLogsOnError"


def test_sglang_args_end_with_user_args_and_model_on_pvc() -> None:
    spec = example("tidedeployment-full.yaml")
    pod = builders.inference_deployment("q", "ns", spec)["spec"]["template"]["spec"]
    args = pod["containers"][0]["args"]
    assert args[args.index("--model-path") + 1] == "/models/Qwen2.5-Coder-32B-Instruct"
    assert args[args.index("--speculative-draft-model-path") + 1] == "/models/qwen-coder-eagle3"
    assert pod["containers"][0]["command"] == ["tide", "serve"]
    assert pod["containers"][0]["env"][-1] == {"name": "TIDE_CONTROL_MAX_STEPS", "value": "4"}
    assert args[args.index("--tp-size") + 1] == "2"
    assert args[-4:] == ["--mem-fraction-static", "0.85", "--speculative-num-steps", "3"]


@pytest.mark.parametrize(("replicas", "expected"), [(3, {"replicas": 3}), (None, {})])
def test_one_inference_deployment_whose_count_an_autoscaler_may_own(replicas: int | None, expected: dict) -> None:
    spec = example("tidedeployment-minimal.yaml").model_copy(deep=True)
    spec.inference.replicas = replicas
    dep = builders.inference_deployment("a", "ns", spec)
    assert {k: v for k, v in dep["spec"].items() if k == "replicas"} == expected
    assert dep["spec"]["template"]["metadata"]["labels"] == builders.labels("a", "inference")


def test_children_set_follows_spec() -> None:
    minimal = by_name(builders.children("a", "ns", example("tidedeployment-minimal.yaml")))
    assert set(minimal) == {("Deployment", "a"), ("Service", "a"), ("Deployment", "a-trainer"),
                            ("PersistentVolumeClaim", "a-trainer-checkpoint"), ("NetworkPolicy", "a")}
    full = by_name(builders.children("a", "ns", example("tidedeployment-full.yaml")))
    assert set(full) - set(minimal) == {("StatefulSet", "a-redis"), ("Service", "a-redis"),
                                        ("NetworkPolicy", "a-redis"), ("PodMonitor", "a"), ("ServiceMonitor", "a")}
    assert set(full) <= set(builders.possible_children("a"))
    assert full["PodMonitor", "a"]["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    sts = full["StatefulSet", "a-redis"]["spec"]
    assert sts["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"] == "20Gi"
    assert full["Service", "a"]["spec"]["selector"] == {"tide.dev/deployment": "a",
                                                        "app.kubernetes.io/component": "inference"}


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
    s3_fields_on_a_pvc = {**good, "registry": {"claimName": "drafts", "endpoint": "http://weed:8333"}}
    assert [p.reason for p in parse("llama", s3_fields_on_a_pvc)[1]] == ["InvalidRegistry"]
    half_keys = {**good, "registry": {"url": "s3://b/p", "accessKeyIdSecretRef": {"name": "s3", "key": "id"}}}
    assert [p.reason for p in parse("llama", half_keys)[1]] == ["InvalidRegistry"]
    assert parse("llama", {**good, "registry": {"url": "file:///srv/drafts"}})[1] == []
    for unsupported in ("gs://b/p", "https://example.com/drafts", "s3:///p", "file://host/p"):
        spec, problems = parse("llama", {**good, "registry": {"url": unsupported}})
        assert spec is None and problems[0].reason == "InvalidSpec", unsupported
    assert [p.reason for p in parse("Bad.Name", good)[1]] == ["InvalidName"]
    reserved = {**good, "inference": {**good["inference"], "env": [{"name": "TIDE_POD_NAME", "value": "x"}]}}
    assert [p.reason for p in parse("llama", reserved)[1]] == ["ReservedEnv"]
    silent = {**good, "rollout": {"heartbeatInterval": "0s"}}
    assert [p.reason for p in parse("llama", silent)[1]] == ["InvalidRollout"]
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


T1, T2, LATE = "2026-11-25T18:00:00Z", "2026-11-25T18:01:00Z", "2026-11-25T18:05:00Z"  # swapTimeout 5m


def _conds(problems: list[Problem], pods: dict, route: Routing, fleet: Fleet | None = None,
           pending: str | None = None, old: list[Condition] = (), now: str = T1) -> dict[str, Condition]:
    spec = example("tidedeployment-minimal.yaml")
    fleet = Fleet({"a-1": route.stable, "a-2": route.stable}, 2) if fleet is None else fleet
    return {c.type: c for c in conditions(3, problems, pods, route, pending, fleet, spec, list(old), now)}


@pytest.mark.parametrize(("problems", "pods", "route", "expected"), [
    ([], {"a": Pods(2, 2)}, Routing(0),
     {"Ready": ("True", "AllPodsReady"), "Progressing": ("False", "Stable"), "Degraded": ("False", "AsExpected"),
      "RolloutPaused": ("False", "Automatic"), "Swapped": ("True", "AllPodsSwapped")}),
    ([], {"a": Pods(2, 1)}, Routing(0),
     {"Ready": ("False", "PodsNotReady"), "Progressing": ("True", "PodsStarting")}),
    ([], {"a": Pods(2, 2)}, Routing(1, 2, ("a-1",)), {"Progressing": ("True", "Canary"),
                                                        "Swapped": ("False", "Swapping")}),
    ([Problem("SamePool", "x"), Problem("SecretNotFound", "y")], {}, Routing(0),
     {"Ready": ("False", "Degraded"), "Degraded": ("True", "SamePool"), "RolloutPaused": ("True", "Degraded")}),
])
def test_conditions(problems: list, pods: dict, route: Routing, expected: dict) -> None:
    got = _conds(problems, pods, route)
    assert {k: (got[k].status, got[k].reason) for k in expected} == expected
    assert all(c.observed_generation == 3 for c in got.values())


def test_conditions_keep_transition_time_while_status_holds() -> None:
    first = _conds([], {"a": Pods(1, 0)}, Routing(0), now=T1)
    second = _conds([], {"a": Pods(1, 1)}, Routing(0), old=list(first.values()), now=T2)
    assert second["Degraded"].last_transition_time == T1
    assert second["Ready"].last_transition_time == T2


@pytest.mark.parametrize(("fleet", "expected"), [
    (Fleet({"a-1": 2, "a-2": 2, "a-3": 2}, 3), ("True", "AllPodsSwapped", "3 pod(s) serve stable v2")),
    (Fleet({"a-1": 2, "a-2": 1}, 3), ("False", "Swapping", "a-2 serves v1, not v2; 1 ready pod(s) not reporting")),
    (Fleet({}, 0), ("Unknown", "NoLivePods", "no inference pod is ready or reporting")),
    (None, ("Unknown", "NoHeartbeats", "the pods' heartbeats could not be read")),
])
def test_swapped_condition_names_the_pods_that_lag(fleet: Fleet | None, expected: tuple) -> None:
    spec = example("tidedeployment-minimal.yaml")
    got = {c.type: c for c in conditions(1, [], {}, Routing(2), "Promoting", fleet, spec, [], T1)}
    assert (got["Swapped"].status, got["Swapped"].reason, got["Swapped"].message) == expected
    assert (got["Progressing"].status, got["Progressing"].reason) == ("True", "Promoting")


def test_swap_timeout_after_rollout_swap_timeout_of_lag() -> None:
    lagging = Fleet({"a-1": 2, "a-2": 1}, 2)
    first = _conds([], {}, Routing(2), lagging, "Promoting", now=T1)
    assert first["Swapped"].reason == "Swapping"
    still = _conds([], {}, Routing(2), lagging, "Promoting", old=list(first.values()), now=T2)
    assert (still["Swapped"].reason, still["Swapped"].last_transition_time) == ("Swapping", T1)
    late = _conds([], {}, Routing(2), lagging, "Promoting", old=list(still.values()), now=LATE)
    assert (late["Swapped"].reason, late["Swapped"].message) == ("SwapTimeout", "a-2 serves v1, not v2")


@pytest.mark.parametrize("name", ["tidedeployment-minimal.yaml", "tidedeployment-full.yaml",
                                  "tidedeployment-amd-pinned.yaml"])
def test_built_in_children_validate_against_kubernetes_schemas(name: str) -> None:
    """Deployments, Services and StatefulSets checked with the API's own OpenAPI schemas (strict: unknown
    fields fail); PodMonitor/ServiceMonitor are CRDs of the Prometheus Operator and not covered."""
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    built_in = {"Deployment", "Service", "StatefulSet"}
    kids = [c for c in builders.children("a", "ns", example(name)) if c["kind"] in built_in]
    assert kids
    for child in kids:
        kubernetes_validate.validate(child, "1.30", strict=True)


def _owner(name: str = "a", uid: str = "u-1") -> dict:
    return {"metadata": {"name": name, "uid": uid}}


@pytest.mark.parametrize(("meta", "owned"), [
    ({"ownerReferences": [{"uid": "u-1", "controller": True}]}, True),
    ({"labels": builders.labels("a", "inference")}, True),  # made by the operator for a TideDeployment of this name
    ({"labels": builders.labels("b", "inference")}, False),  # another deployment's
    ({}, False),  # someone's own Service of the same name
    ({"labels": {"app": "web"}, "ownerReferences": [{"uid": "x", "controller": False}]}, False),
    ({"labels": builders.labels("a", "inference"), "ownerReferences": [{"uid": "u-0", "controller": True}]}, False),
])
def test_owns_by_owner_reference_or_the_operator_labels(meta: dict, owned: bool) -> None:
    assert builders.owns(_owner(), {"metadata": meta}) is owned


def test_default_resources_probes_and_checkpoint_volume() -> None:
    """A spec that sets none of them still gets CPU/memory requests and memory limits, probes on every long-running
    container, and the trainer's state on its own ReadWriteOnce PVC (TIDE_TRAIN_CHECKPOINT_DIR), one trainer at a
    time (Recreate)."""
    kids = by_name(builders.children("a", "ns", example("tidedeployment-minimal.yaml")))
    inf = kids["Deployment", "a"]["spec"]["template"]["spec"]["containers"][0]
    assert inf["resources"] == {"requests": {"cpu": 5, "memory": "32Gi"}, "limits": {"memory": "64Gi",
                                                                                     "nvidia.com/gpu": 1}}
    assert {"startupProbe", "readinessProbe", "livenessProbe"} <= set(inf)
    assert inf["livenessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    trainer = kids["Deployment", "a-trainer"]
    assert trainer["spec"]["strategy"] == {"type": "Recreate"} and trainer["spec"]["replicas"] == 1
    c = trainer["spec"]["template"]["spec"]["containers"][0]
    assert c["resources"] == {"requests": {"cpu": 2, "memory": "16Gi"}, "limits": {"memory": "32Gi",
                                                                                   "nvidia.com/gpu": 1}}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["httpGet"] == {"path": "/metrics", "port": "metrics"}  # tide train's Prometheus server
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["TIDE_TRAIN_METRICS_PORT"] == str(builders.TRAINER_METRICS_PORT)
    assert env["TIDE_TRAIN_CONSUMER"] == "a-trainer"  # stable: a restarted trainer resumes its pending entries
    assert env["TIDE_TRAIN_CHECKPOINT_DIR"] == builders.CHECKPOINT_MOUNT
    mount = next(m for m in c["volumeMounts"] if m["mountPath"] == builders.CHECKPOINT_MOUNT)
    volume = next(v for v in trainer["spec"]["template"]["spec"]["volumes"] if v["name"] == mount["name"])
    pvc = kids["PersistentVolumeClaim", "a-trainer-checkpoint"]
    assert volume["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
    assert pvc["spec"] == {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "20Gi"}}}
    off = example("tidedeployment-minimal.yaml").model_dump(by_alias=True)
    off["training"]["checkpoint"] = {"enabled": False}
    kids = by_name(builders.children("a", "ns", TideDeploymentSpec.model_validate(off)))
    assert ("PersistentVolumeClaim", "a-trainer-checkpoint") not in kids
    assert "TIDE_TRAIN_CHECKPOINT_DIR" not in env_of(kids["Deployment", "a-trainer"])


def test_training_replicas_is_at_most_one() -> None:
    good = yaml.safe_load((ROOT / "docs/examples/tidedeployment-minimal.yaml").read_text())["spec"]
    spec, problems = parse("a", {**good, "training": {**good["training"], "replicas": 2}})
    assert spec is None and "training.replicas" in problems[0].message


def test_managed_redis_has_a_password_protected_mode_and_a_network_policy() -> None:
    """The managed Redis requires the password of its generated Secret (read by every pod through secretKeyRef,
    never copied), keeps protected mode, and admits only this deployment's pods and the operator."""
    kids = by_name(builders.children("q", "ns", example("tidedeployment-full.yaml"), operator_namespace="tide-system"))
    redis = kids["StatefulSet", "q-redis"]["spec"]["template"]["spec"]["containers"][0]
    assert redis["args"][-2:] == ["--requirepass", "$(REDIS_PASSWORD)"] and "--protected-mode" not in redis["args"]
    ref = {"secretKeyRef": {"name": "q-redis", "key": "password"}}
    assert {e["name"]: e["valueFrom"] for e in redis["env"]} == {"REDIS_PASSWORD": ref, "REDISCLI_AUTH": ref}
    for dep in ("q", "q-trainer"):
        assert env_of(kids["Deployment", dep])["TIDE_REDIS_PASSWORD"] == ref
    secret = builders.redis_secret("q", "ns", "pw")
    assert secret["metadata"]["name"] == "q-redis" and secret["metadata"]["labels"]["tide.dev/secret"] == "true"
    policy = kids["NetworkPolicy", "q-redis"]["spec"]
    assert policy["podSelector"]["matchLabels"] == builders.labels("q", "redis")
    assert policy["policyTypes"] == ["Ingress", "Egress"] and "egress" not in policy  # it opens no connection
    (rule,) = policy["ingress"]
    assert rule["ports"] == [{"protocol": "TCP", "port": 6379}]
    tide_pods, operator = rule["from"]
    assert tide_pods["podSelector"]["matchLabels"] == {"tide.dev/deployment": "q"}
    assert operator == {"podSelector": {"matchLabels": {"tide.dev/operator": "true"}},
                        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "tide-system"}}}
    doc = example("tidedeployment-full.yaml").model_dump(by_alias=True)
    doc["redis"]["passwordSecretRef"] = {"name": "mine", "key": "pw"}
    assert [p.reason for p in parse("q", doc)[1]] == ["InvalidRedis"]


@pytest.mark.parametrize(("example_name", "redis_url", "ports", "to_redis_pods"), [
    ("tidedeployment-minimal.yaml", None, [443, 6379], False),  # hub models, Redis at redis.url
    ("tidedeployment-amd-pinned.yaml", "rediss://r.example.com:6380/0", [443, 6380], False),  # URL from its Secret
    ("tidedeployment-full.yaml", None, [443], True),  # managed Redis (by pod selector), S3 registry
])
def test_pods_network_policy_allows_what_the_spec_needs(example_name: str, redis_url: str | None, ports: list[int],
                                                         to_redis_pods: bool) -> None:
    kids = by_name(builders.children("a", "ns", example(example_name), redis_url=redis_url))
    policy = kids["NetworkPolicy", "a"]["spec"]
    assert policy["podSelector"]["matchExpressions"][0]["values"] == ["inference", "trainer"]
    dns, *rest = policy["egress"]
    assert dns == {"ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}]}
    anywhere = [r for r in rest if "to" not in r]
    assert [p["port"] for r in anywhere for p in r["ports"]] == ports
    assert any(r.get("to") == [{"podSelector": {"matchLabels": builders.labels("a", "redis")}}] for r in rest) \
        is to_redis_pods
    assert [p["port"] for p in policy["ingress"][0]["ports"]] == [example(example_name).inference.port, 9400]
    off = example(example_name).model_dump(by_alias=True)
    off["networkPolicy"] = {"enabled": False}
    assert not [k for k in builders.children("a", "ns", TideDeploymentSpec.model_validate(off))
                if k["kind"] == "NetworkPolicy"]
    more = example(example_name).model_dump(by_alias=True)
    more["networkPolicy"] = {"extraEgressPorts": [3128]}
    assert 3128 in builders.egress_ports(TideDeploymentSpec.model_validate(more), redis_url)
