"""Child manifests of a TideDeployment, as plain dicts (pure: no API calls).

Inference runs as one Deployment behind one Service, both named like the TideDeployment. A pod knows its name and
namespace from the downward API; the draft version it loads comes from the Redis control state, which names
the canary pods, so a canary, promotion or rollback changes no pod template and restarts nothing.
The trainer Deployment runs on the training pool, selected by its own GPU node labels.
"""

from typing import Any

from tide_operator.models import (
    API_VERSION,
    DraftVersionSpec,
    Placement,
    RedisSpec,
    RegistrySpec,
    Resources,
    TideDeploymentSpec,
    seconds,
)
from tide_sglang.sources import MODEL_CACHE, ModelSource, cache_path, parse_model_source

Manifest = dict[str, Any]

REDIS_PORT = 6379
TRAINER_METRICS_PORT = 9400  # TideSettings.train_metrics_port default
# Variables the operator sets itself; a pool's `env` may not override them (status.check says so).
RESERVED_ENV = frozenset({"TIDE_DEPLOYMENT", "TIDE_NAMESPACE", "TIDE_POD_NAME", "TIDE_HEARTBEAT_S",
                          "TIDE_REDIS_URL", "TIDE_REDIS_PASSWORD", "TIDE_REDIS_CLUSTER", "TIDE_TARGET",
                          "TIDE_REGISTRY_DIR", "TIDE_REGISTRY_URL", "TIDE_TRIGGER_SHORT_ALPHA",
                          "TIDE_TRIGGER_LONG_ALPHA", "TIDE_TRIGGER_EPSILON", "TIDE_TRAIN_GATE", "AWS_ENDPOINT_URL_S3",
                          "AWS_REGION", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"})
MODEL_MOUNT = "/models"
FETCH_PREFIX = "fetch-"  # init containers fetching a model: fetch-target, fetch-draft
IMPORT_DRAFT = "import-draft"  # the trainer's init container importing the served draft as version 0
PVC_MODELS = "/var/lib/tide/models"  # pvc://claim/path sources: each claim mounted read-only at PVC_MODELS/claim


def labels(name: str, component: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": "tide", "app.kubernetes.io/instance": name,
            "app.kubernetes.io/component": component, "app.kubernetes.io/managed-by": "tide-operator",
            "tide.dev/deployment": name}


def _meta(name: str, namespace: str, owner: str, component: str) -> Manifest:
    return {"name": name, "namespace": namespace, "labels": labels(owner, component)}


def redis_url_env(name: str, namespace: str, redis: RedisSpec) -> Manifest:
    """TIDE_REDIS_URL as a literal, a Secret reference, or the managed Redis Service."""
    if redis.url_secret_ref is not None:
        ref = redis.url_secret_ref
        return {"name": "TIDE_REDIS_URL", "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}}}
    return {"name": "TIDE_REDIS_URL", "value": redis.url or managed_redis_url(name, namespace)}


def managed_redis_url(name: str, namespace: str) -> str:
    return f"redis://{name}-redis.{namespace}.svc:{REDIS_PORT}/0"


def tide_env(name: str, namespace: str, spec: TideDeploymentSpec) -> list[Manifest]:
    """The `TIDE_*` variables every TIDE pod gets (read by tide_sglang.settings.TideSettings)."""
    trig = spec.training.trigger
    env: list[Manifest] = [
        {"name": "TIDE_DEPLOYMENT", "value": name},
        _field_env("TIDE_NAMESPACE", "metadata.namespace"),
        redis_url_env(name, namespace, spec.redis),
        {"name": "TIDE_REDIS_CLUSTER", "value": str(spec.redis.cluster).lower()},
        {"name": "TIDE_TARGET", "value": local_model(spec, "target")},
        {"name": "TIDE_TRIGGER_SHORT_ALPHA", "value": str(trig.short_alpha)},
        {"name": "TIDE_TRIGGER_LONG_ALPHA", "value": str(trig.long_alpha)},
        {"name": "TIDE_TRIGGER_EPSILON", "value": str(trig.epsilon)},
    ]
    if spec.redis.password_secret_ref is not None:
        ref = spec.redis.password_secret_ref
        env.append({"name": "TIDE_REDIS_PASSWORD",
                    "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}}})
    return env + registry_env(namespace, name, spec.registry)


def registry_url(namespace: str, name: str, reg: RegistrySpec) -> str | None:
    """This deployment's own lineage under `registry.url` (None with a PVC, which is mounted at its sub-path)."""
    return None if reg.url is None else f"{reg.url.rstrip('/')}/{namespace}/{name}"


def registry_env(namespace: str, name: str, reg: RegistrySpec) -> list[Manifest]:
    """TIDE_REGISTRY_DIR (the PVC mount) or TIDE_REGISTRY_URL, and for S3 boto3's own endpoint and key variables."""
    url = registry_url(namespace, name, reg)
    if url is None:
        return [{"name": "TIDE_REGISTRY_DIR", "value": reg.mount_path}]
    env: list[Manifest] = [{"name": "TIDE_REGISTRY_URL", "value": url}]
    if reg.endpoint:
        env.append({"name": "AWS_ENDPOINT_URL_S3", "value": reg.endpoint})
    if reg.region:
        env.append({"name": "AWS_REGION", "value": reg.region})
    for var, ref in (("AWS_ACCESS_KEY_ID", reg.access_key_id_secret_ref),
                     ("AWS_SECRET_ACCESS_KEY", reg.secret_access_key_secret_ref)):
        if ref is not None:
            env.append({"name": var, "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}}})
    return env


def _field_env(var: str, path: str) -> Manifest:
    """A variable from the downward API."""
    return {"name": var, "valueFrom": {"fieldRef": {"fieldPath": path}}}


def _user_env(pool: Placement) -> list[Manifest]:
    return [{"name": e.name, "value": e.value} for e in pool.env]


def model_path(spec: TideDeploymentSpec) -> str:
    """With a model PVC, a relative path is inside the mount; otherwise the path is a model source as is."""
    path = spec.model.path
    if spec.model.claim_name and not path.startswith("/"):
        return f"{MODEL_MOUNT}/{path}"
    return path


def sources(spec: TideDeploymentSpec) -> dict[str, ModelSource]:
    """The target and the initial draft, parsed as every TIDE process parses them (tide_sglang.sources)."""
    return {"target": parse_model_source(model_path(spec)), "draft": parse_model_source(spec.draft.initial_path)}


def local_model(spec: TideDeploymentSpec, name: str) -> str:
    """Where the pods find model `name` (target, draft) on local disk: a path as given, inside its PVC's mount,
    or where the init container fetched it."""
    source = sources(spec)[name]
    if source.kind == "pvc":
        return f"{PVC_MODELS}/{source.claim}/{source.location}".rstrip("/")
    return cache_path(name) if source.fetched else source.location


def _volumes(namespace: str, name: str, spec: TideDeploymentSpec,
             registry_read_only: bool) -> tuple[list[Manifest], list[Manifest]]:
    volumes: list[Manifest] = []
    mounts: list[Manifest] = []
    if spec.model.claim_name:
        volumes.append({"name": "model", "persistentVolumeClaim": {"claimName": spec.model.claim_name,
                                                                     "readOnly": True}})
        mounts.append({"name": "model", "mountPath": MODEL_MOUNT, "readOnly": True})
    claims = sorted({s.claim for s in sources(spec).values() if s.claim is not None})
    for i, claim in enumerate(claims):
        volumes.append({"name": f"model-pvc-{i}", "persistentVolumeClaim": {"claimName": claim, "readOnly": True}})
        mounts.append({"name": f"model-pvc-{i}", "mountPath": f"{PVC_MODELS}/{claim}", "readOnly": True})
    if any(s.fetched for s in sources(spec).values()):
        volumes.append({"name": "model-cache", "emptyDir": {}})
        mounts.append({"name": "model-cache", "mountPath": MODEL_CACHE})
    if spec.registry.claim_name:
        volumes.append({"name": "registry", "persistentVolumeClaim": {"claimName": spec.registry.claim_name}})
        # The deployment's own lineage: the kubelet creates the sub-path directory on first mount.
        mounts.append({"name": "registry", "mountPath": spec.registry.mount_path, "subPath": f"{namespace}/{name}",
                       "readOnly": registry_read_only})
    return volumes, mounts


def _fetch_env(namespace: str, name: str, spec: TideDeploymentSpec, pool: Placement) -> list[Manifest]:
    """What `tide fetch` needs: the hub cache on the model-cache volume (so the fetched directory's links resolve
    in every container), the hub token from its Secret, the registry's S3 variables (an s3:// model uses the
    same store settings), and the pool's own variables (HF_HUB_OFFLINE, HF_ENDPOINT, proxies)."""
    env: list[Manifest] = [{"name": "HF_HUB_CACHE", "value": f"{MODEL_CACHE}/hub"}]
    if (ref := spec.model.hub_token_secret_ref) is not None:
        env.append({"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}}})
    return env + [e for e in registry_env(namespace, name, spec.registry) if e["name"].startswith("AWS_")] + \
        _user_env(pool)


def _fetch_containers(namespace: str, name: str, spec: TideDeploymentSpec, pool: Placement, image: str,
                      mounts: list[Manifest], heads_only: set[str]) -> list[Manifest]:
    """One init container per model that must be fetched (`heads_only`: names of which the pod reads only the
    embedding, final norm and LM head)."""
    out = []
    for model, source in sources(spec).items():
        if source.fetched:
            text = model_path(spec) if model == "target" else spec.draft.initial_path
            out.append({"name": f"{FETCH_PREFIX}{model}", "image": image,
                        "command": ["tide", "fetch", text, cache_path(model),
                                    *(["--heads-only"] if model in heads_only else [])],
                        "env": _fetch_env(namespace, name, spec, pool), "volumeMounts": mounts,
                        "terminationMessagePolicy": "FallbackToLogsOnError"})  # the error is the condition's text
    return out


def _plain(res: Resources) -> Manifest:
    return {k: dict(v) for k, v in res.model_dump().items() if v}


def _resources(pool: Placement) -> Manifest:
    out = _plain(pool.resources)
    if pool.gpus:  # extended resources are set as limits only; the request defaults to the limit
        out.setdefault("limits", {})[pool.gpu_resource] = pool.gpus
    return out


def _pod_placement(pool: Placement) -> Manifest:
    out: Manifest = {}
    if pool.node_selector:
        out["nodeSelector"] = dict(pool.node_selector)
    if pool.tolerations:
        out["tolerations"] = [t.model_dump(by_alias=True, exclude_none=True) for t in pool.tolerations]
    if pool.affinity:
        out["affinity"] = pool.affinity
    return out


def _deployment(meta: Manifest, replicas: int | None, pod_labels: dict[str, str], pod_spec: Manifest) -> Manifest:
    """`replicas` None leaves the count to whoever scales the Deployment (an HorizontalPodAutoscaler)."""
    count = {} if replicas is None else {"replicas": replicas}
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": meta,
            "spec": {**count, "selector": {"matchLabels": pod_labels},
                     "template": {"metadata": {"labels": pod_labels}, "spec": pod_spec}}}


def sglang_args(spec: TideDeploymentSpec) -> list[str]:
    """`tide serve` arguments: base server flags, then the user's (argparse keeps the last value, so user flags
    win). `tide serve` itself adds EAGLE-3, adaptive speculation with 0 steps allowed, and metrics."""
    inf = spec.inference
    return ["--model-path", local_model(spec, "target"), "--host", "0.0.0.0", "--port", str(inf.port),
            "--tp-size", str(max(inf.gpus, 1)), "--speculative-draft-model-path", local_model(spec, "draft"),
            *inf.sglang_args]


def inference_deployment(name: str, namespace: str, spec: TideDeploymentSpec) -> Manifest:
    inf = spec.inference
    volumes, mounts = _volumes(namespace, name, spec, registry_read_only=True)
    # SGLang's tensor-parallel workers share memory through /dev/shm; the container default is 64 MiB.
    volumes.append({"name": "dshm", "emptyDir": {"medium": "Memory"}})
    mounts.append({"name": "dshm", "mountPath": "/dev/shm"})
    probe = {"httpGet": {"path": "/health", "port": "http"}, "periodSeconds": 10}
    container = {
        "name": "sglang", "image": inf.image,
        "command": ["tide", "serve"], "args": sglang_args(spec),
        "ports": [{"name": "http", "containerPort": inf.port}],
        "env": [*tide_env(name, namespace, spec), _field_env("TIDE_POD_NAME", "metadata.name"),
                {"name": "TIDE_HEARTBEAT_S", "value": f"{seconds(spec.rollout.heartbeat_interval):g}"},
                *_user_env(inf)],
        "resources": _resources(inf), "volumeMounts": mounts,
        # Loading a large target takes minutes: the startup probe allows 30 min before liveness applies.
        "startupProbe": {**probe, "failureThreshold": 180}, "readinessProbe": probe,
    }
    fetch = _fetch_containers(namespace, name, spec, inf, inf.image, mounts, heads_only=set())
    pod = {**({"initContainers": fetch} if fetch else {}), "containers": [container], "volumes": volumes,
           **_pod_placement(inf)}
    pod_labels = labels(name, "inference")
    return _deployment(_meta(name, namespace, name, "inference"), inf.replicas, pod_labels, pod)


def trainer_deployment(name: str, namespace: str, spec: TideDeploymentSpec) -> Manifest:
    tr = spec.training
    volumes, mounts = _volumes(namespace, name, spec, registry_read_only=False)
    container = {
        "name": "trainer", "image": tr.image or spec.inference.image, "command": list(tr.command),
        "env": [*tide_env(name, namespace, spec), {"name": "TIDE_TRAIN_GATE", "value": tr.gate},
                *_user_env(tr)],
        "resources": _resources(tr), "volumeMounts": mounts,
        "ports": [{"name": "metrics", "containerPort": TRAINER_METRICS_PORT}],  # tide train's Prometheus port
    }
    image = tr.image or spec.inference.image
    # The lineage starts from the draft SGLang serves: imported as version 0 into an empty registry.
    start = {"name": IMPORT_DRAFT, "image": image,
             "command": ["tide", "import", local_model(spec, "draft"), "--if-empty"],
             "env": container["env"], "volumeMounts": mounts, "terminationMessagePolicy": "FallbackToLogsOnError"}
    init = [*_fetch_containers(namespace, name, spec, tr, image, mounts, heads_only={"target"}), start]
    pod = {"initContainers": init, "containers": [container], "volumes": volumes, **_pod_placement(tr)}
    pod_labels = labels(name, "trainer")
    return _deployment(_meta(f"{name}-trainer", namespace, name, "trainer"), tr.replicas, pod_labels, pod)


def inference_service(name: str, namespace: str, spec: TideDeploymentSpec) -> Manifest:
    """Every inference pod, canary pods included: traffic splits by pod count."""
    selector = {"tide.dev/deployment": name, "app.kubernetes.io/component": "inference"}
    return {"apiVersion": "v1", "kind": "Service", "metadata": _meta(name, namespace, name, "inference"),
            "spec": {"selector": selector,
                     "ports": [{"name": "http", "port": spec.inference.port, "targetPort": "http"}]}}


def redis_statefulset(name: str, namespace: str, spec: TideDeploymentSpec) -> Manifest:
    m = spec.redis.managed
    # noeviction: evicting stream entries or the control hash silently would lose data; the writers trim
    # the stream themselves (MAXLEN ~) and see a clear OOM error instead.
    args = ["--save", "", "--appendonly", "no", "--maxmemory", m.max_memory,
            "--maxmemory-policy", "noeviction", "--protected-mode", "no"]
    container: Manifest = {"name": "redis", "image": m.image, "args": args,
                           "ports": [{"name": "redis", "containerPort": REDIS_PORT}],
                           "resources": _plain(m.resources),
                           "readinessProbe": {"exec": {"command": ["redis-cli", "ping"]}, "periodSeconds": 5}}
    sts_spec: Manifest = {"serviceName": f"{name}-redis", "replicas": 1,
                          "selector": {"matchLabels": labels(name, "redis")},
                          "template": {"metadata": {"labels": labels(name, "redis")},
                                       "spec": {"containers": [container]}}}
    if m.storage:
        container["volumeMounts"] = [{"name": "data", "mountPath": "/data"}]
        args[1:2] = ["3600 1"]  # with a volume, snapshot hourly so stats and control survive a restart
        sts_spec["volumeClaimTemplates"] = [{"metadata": {"name": "data"}, "spec": {
            "accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": m.storage}}}}]
    return {"apiVersion": "apps/v1", "kind": "StatefulSet",
            "metadata": _meta(f"{name}-redis", namespace, name, "redis"), "spec": sts_spec}


def redis_service(name: str, namespace: str) -> Manifest:
    return {"apiVersion": "v1", "kind": "Service", "metadata": _meta(f"{name}-redis", namespace, name, "redis"),
            "spec": {"selector": labels(name, "redis"),
                     "ports": [{"name": "redis", "port": REDIS_PORT, "targetPort": "redis"}]}}


def pod_monitor(name: str, namespace: str, spec: TideDeploymentSpec) -> Manifest:
    mon = spec.monitoring
    # Inference pods export SGLang's and the plugin's metrics on `http`; the trainer its own on `metrics`.
    endpoints = [{"port": port, "path": "/metrics", "interval": mon.interval} for port in ("http", "metrics")]
    meta = _meta(name, namespace, name, "monitoring")
    meta["labels"] |= mon.labels
    selector = {"matchLabels": {"tide.dev/deployment": name},
                "matchExpressions": [{"key": "app.kubernetes.io/component", "operator": "In",
                                      "values": ["inference", "trainer"]}]}
    return {"apiVersion": "monitoring.coreos.com/v1", "kind": "PodMonitor", "metadata": meta,
            "spec": {"selector": selector, "podMetricsEndpoints": endpoints}}


def service_monitor(name: str, namespace: str, spec: TideDeploymentSpec) -> Manifest:
    mon = spec.monitoring
    meta = _meta(name, namespace, name, "monitoring")
    meta["labels"] |= mon.labels
    return {"apiVersion": "monitoring.coreos.com/v1", "kind": "ServiceMonitor", "metadata": meta,
            "spec": {"selector": {"matchLabels": labels(name, "inference")},
                     "endpoints": [{"port": "http", "path": "/metrics", "interval": mon.interval}]}}


def children(name: str, namespace: str, spec: TideDeploymentSpec) -> list[Manifest]:
    """Every child this spec wants; `possible_children` minus these are deleted."""
    out = [inference_deployment(name, namespace, spec), inference_service(name, namespace, spec)]
    if spec.training.enabled:
        out.append(trainer_deployment(name, namespace, spec))
    if spec.redis.managed.enabled:
        out += [redis_statefulset(name, namespace, spec), redis_service(name, namespace)]
    if spec.monitoring.pod_monitor:
        out.append(pod_monitor(name, namespace, spec))
    if spec.monitoring.service_monitor:
        out.append(service_monitor(name, namespace, spec))
    return out


def possible_children(name: str) -> list[tuple[str, str]]:
    """(kind, name) of every child any spec could want: names are fixed, so no label query is needed."""
    return [("Deployment", name), ("Service", name),
            ("Deployment", f"{name}-trainer"), ("StatefulSet", f"{name}-redis"), ("Service", f"{name}-redis"),
            ("PodMonitor", name), ("ServiceMonitor", name)]


def draft_version(name: str, namespace: str, version: int, parent: int | None,
                  metrics: dict[str, float]) -> Manifest:
    """The DraftVersion of a published version (its status is written separately: a subresource)."""
    return {"apiVersion": API_VERSION, "kind": "DraftVersion",
            "metadata": _meta(f"{name}-v{version}", namespace, name, "draft"),
            "spec": DraftVersionSpec(deployment=name, version=version, parent=parent, metrics=metrics)
            .model_dump(by_alias=True, exclude_none=True)}
