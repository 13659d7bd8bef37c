"""Child manifests of a TideDeployment, as plain dicts (pure: no API calls).

Inference runs as one Deployment behind one Service, both named like the TideDeployment. A pod knows its name and
namespace from the downward API; the draft version it loads comes from the Redis control state, which names
the canary pods, so a canary, promotion or rollback changes no pod template and restarts nothing.
The trainer Deployment runs on the training pool, selected by its own GPU node labels.
"""

from typing import Any
from urllib.parse import urlsplit

from tide_operator.models import (
    API_VERSION,
    SECRET_LABEL,
    DraftVersionSpec,
    Placement,
    RegistrySpec,
    Resources,
    SecretKeyRef,
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
                          "AWS_REGION", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "TIDE_TRAIN_CHECKPOINT_DIR",
                          "TIDE_TRAIN_CONSUMER", "TIDE_TRAIN_METRICS_PORT"})
MODEL_MOUNT = "/models"
FETCH_PREFIX = "fetch-"  # init containers fetching a model: fetch-target, fetch-draft
IMPORT_DRAFT = "import-draft"  # the trainer's init container importing the served draft as version 0
PVC_MODELS = "/var/lib/tide/models"  # pvc://claim/path sources: each claim mounted read-only at PVC_MODELS/claim
CHECKPOINT_MOUNT = "/var/lib/tide/checkpoint"  # training.checkpoint's PVC: TIDE_TRAIN_CHECKPOINT_DIR
# The root filesystem is read-only: HOME (Hugging Face, Triton, FlashInfer and torch caches under ~/.cache and
# ~/.triton) and /tmp are emptyDirs. USER names the uid for getpass (torch's inductor cache), which an image
# without a passwd entry for it could not.
HOME = "/home/tide"
RUN_AS = 65532  # the uid and gid docker/'s images run as (USER); any image whose files are world-readable works
REDIS_UID = 999  # the official redis image's redis user
REDIS_PASSWORD_KEY = "password"
OPERATOR_LABEL = "tide.dev/operator"  # on the operator's pods (the chart sets it): the managed Redis admits them
HUB_PORT = 443  # the Hugging Face hub (and AWS S3) over HTTPS


def labels(name: str, component: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": "tide", "app.kubernetes.io/instance": name,
            "app.kubernetes.io/component": component, "app.kubernetes.io/managed-by": "tide-operator",
            "tide.dev/deployment": name}


def _meta(name: str, namespace: str, owner: str, component: str) -> Manifest:
    return {"name": name, "namespace": namespace, "labels": labels(owner, component)}


def owns(owner: Manifest, obj: Manifest) -> bool:
    """Whether `obj` belongs to the TideDeployment `owner`, so the operator may patch or delete it: an
    ownerReference to it, or, when no other object controls it, the labels the operator gives its children. An
    object of the same name that someone else made is left alone (the Conflict condition)."""
    meta = obj.get("metadata") or {}
    refs = meta.get("ownerReferences") or []
    if any(ref.get("uid") == owner["metadata"]["uid"] for ref in refs):
        return True
    if any(ref.get("controller") for ref in refs):
        return False
    theirs = meta.get("labels") or {}
    return all(theirs.get(k) == v for k, v in labels(owner["metadata"]["name"], "").items()
               if k != "app.kubernetes.io/component")


def _secret_env(var: str, ref: SecretKeyRef) -> Manifest:
    """A credential as a Secret reference: the pod spec never holds its value."""
    return {"name": var, "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}}}


def redis_url_env(name: str, namespace: str, spec: TideDeploymentSpec) -> Manifest:
    """TIDE_REDIS_URL as a literal, a Secret reference, or the managed Redis Service."""
    if spec.redis.url_secret_ref is not None:
        return _secret_env("TIDE_REDIS_URL", spec.redis.url_secret_ref)
    return {"name": "TIDE_REDIS_URL", "value": spec.redis.url or managed_redis_url(name, namespace)}


def managed_redis_url(name: str, namespace: str) -> str:
    return f"redis://{name}-redis.{namespace}.svc:{REDIS_PORT}/0"


def redis_password_ref(name: str, spec: TideDeploymentSpec) -> SecretKeyRef | None:
    """The Redis password: the managed Redis's generated Secret, else `redis.passwordSecretRef`."""
    if spec.redis.managed.enabled:
        return SecretKeyRef(name=f"{name}-redis", key=REDIS_PASSWORD_KEY)
    return spec.redis.password_secret_ref


def redis_secret(name: str, namespace: str, password: str) -> Manifest:
    """The managed Redis's password Secret. Created once with a random password and never patched (the password
    would otherwise travel in the last-applied annotation); labelled so that the operator may read it."""
    meta = _meta(f"{name}-redis", namespace, name, "redis")
    meta["labels"][SECRET_LABEL] = "true"
    return {"apiVersion": "v1", "kind": "Secret", "metadata": meta, "type": "Opaque",
            "stringData": {REDIS_PASSWORD_KEY: password}}


def tide_env(name: str, namespace: str, spec: TideDeploymentSpec) -> list[Manifest]:
    """The `TIDE_*` variables every TIDE pod gets (read by tide_sglang.settings.TideSettings)."""
    trig = spec.training.trigger
    env: list[Manifest] = [
        {"name": "TIDE_DEPLOYMENT", "value": name},
        _field_env("TIDE_NAMESPACE", "metadata.namespace"),
        redis_url_env(name, namespace, spec),
        {"name": "TIDE_REDIS_CLUSTER", "value": str(spec.redis.cluster).lower()},
        {"name": "TIDE_TARGET", "value": local_model(spec, "target")},
        {"name": "TIDE_TRIGGER_SHORT_ALPHA", "value": str(trig.short_alpha)},
        {"name": "TIDE_TRIGGER_LONG_ALPHA", "value": str(trig.long_alpha)},
        {"name": "TIDE_TRIGGER_EPSILON", "value": str(trig.epsilon)},
    ]
    if (ref := redis_password_ref(name, spec)) is not None:
        env.append(_secret_env("TIDE_REDIS_PASSWORD", ref))
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
            env.append(_secret_env(var, ref))
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
    volumes: list[Manifest] = [{"name": "tmp", "emptyDir": {}}, {"name": "home", "emptyDir": {}}]
    mounts: list[Manifest] = [{"name": "tmp", "mountPath": "/tmp"}, {"name": "home", "mountPath": HOME}]
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


def _process_env() -> list[Manifest]:
    """First in every container's env, so a pool's `env` may still override them."""
    return [{"name": "HOME", "value": HOME}, {"name": "USER", "value": "tide"}]


CONTAINER_SECURITY: Manifest = {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                                "capabilities": {"drop": ["ALL"]}}


def _secured(pod: Manifest, uid: int) -> Manifest:
    """The Pod Security Standard "restricted" profile on a pod spec (tests/pss.py checks its rules): non-root with a
    fixed uid (fsGroup makes the volumes writable to it), RuntimeDefault seccomp, and in every container no
    privilege escalation, no capabilities and a read-only root filesystem. No service account token either: only
    the operator talks to the Kubernetes API."""
    for c in [*pod.get("initContainers", []), *pod["containers"]]:
        c["securityContext"] = dict(CONTAINER_SECURITY)
    security = {"runAsNonRoot": True, "runAsUser": uid, "runAsGroup": uid, "fsGroup": uid,
                "seccompProfile": {"type": "RuntimeDefault"}}
    return {**pod, "automountServiceAccountToken": False, "securityContext": security}


def _fetch_env(namespace: str, name: str, spec: TideDeploymentSpec, pool: Placement) -> list[Manifest]:
    """What `tide fetch` needs: the hub cache on the model-cache volume (so the fetched directory's links resolve
    in every container), the hub token from its Secret, the registry's S3 variables (an s3:// model uses the
    same store settings), and the pool's own variables (HF_HUB_OFFLINE, HF_ENDPOINT, proxies)."""
    env: list[Manifest] = [{"name": "HF_HUB_CACHE", "value": f"{MODEL_CACHE}/hub"}]
    if (ref := spec.model.hub_token_secret_ref) is not None:
        env.append(_secret_env("HF_TOKEN", ref))
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
                        "env": [*_process_env(), *_fetch_env(namespace, name, spec, pool)],
                        "resources": _plain(pool.resources), "volumeMounts": mounts,
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


def _deployment(meta: Manifest, replicas: int | None, pod_labels: dict[str, str], pod_spec: Manifest,
                **extra: Any) -> Manifest:
    """`replicas` None leaves the count to whoever scales the Deployment (an HorizontalPodAutoscaler)."""
    count = {} if replicas is None else {"replicas": replicas}
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": meta,
            "spec": {**count, **extra, "selector": {"matchLabels": pod_labels},
                     "template": {"metadata": {"labels": pod_labels}, "spec": _secured(pod_spec, RUN_AS)}}}


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
    probe = {"httpGet": {"path": "/health", "port": "http"}, "periodSeconds": 10, "timeoutSeconds": 10}
    container = {
        "name": "sglang", "image": inf.image,
        "command": ["tide", "serve"], "args": sglang_args(spec),
        "ports": [{"name": "http", "containerPort": inf.port}],
        "env": [*_process_env(), *tide_env(name, namespace, spec), _field_env("TIDE_POD_NAME", "metadata.name"),
                {"name": "TIDE_HEARTBEAT_S", "value": f"{seconds(spec.rollout.heartbeat_interval):g}"},
                *_user_env(inf)],
        "resources": _resources(inf), "volumeMounts": mounts,
        # Loading a large target takes minutes: the startup probe allows 30 min before liveness applies. Liveness
        # restarts a server that stopped answering for a minute (a hung scheduler keeps the pod Running otherwise).
        "startupProbe": {**probe, "failureThreshold": 180}, "readinessProbe": probe,
        "livenessProbe": {**probe, "periodSeconds": 20, "failureThreshold": 3},
    }
    fetch = _fetch_containers(namespace, name, spec, inf, inf.image, mounts, heads_only=set())
    pod = {**({"initContainers": fetch} if fetch else {}), "containers": [container], "volumes": volumes,
           **_pod_placement(inf)}
    pod_labels = labels(name, "inference")
    return _deployment(_meta(name, namespace, name, "inference"), inf.replicas, pod_labels, pod)


def checkpoint_claim(name: str, namespace: str, spec: TideDeploymentSpec) -> Manifest:
    """The trainer's checkpoint volume (`training.checkpoint`): ReadWriteOnce, one trainer at a time."""
    ck = spec.training.checkpoint
    pvc: Manifest = {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": ck.size}}}
    if ck.storage_class_name:
        pvc["storageClassName"] = ck.storage_class_name
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
            "metadata": _meta(f"{name}-trainer-checkpoint", namespace, name, "trainer"), "spec": pvc}


def trainer_deployment(name: str, namespace: str, spec: TideDeploymentSpec, replicas: int = 1) -> Manifest:
    """`replicas` 0 while the training gate has scaled the trainer down (`tide_operator.gate`)."""
    tr = spec.training
    volumes, mounts = _volumes(namespace, name, spec, registry_read_only=False)
    volumes.append({"name": "dshm", "emptyDir": {"medium": "Memory"}})  # torchrun's ranks and NCCL use /dev/shm
    mounts.append({"name": "dshm", "mountPath": "/dev/shm"})
    # A stable consumer name: a restarted trainer resumes its own pending entries (acked only after a checkpoint).
    env = [*_process_env(), *tide_env(name, namespace, spec), {"name": "TIDE_TRAIN_GATE", "value": tr.gate},
           {"name": "TIDE_TRAIN_CONSUMER", "value": f"{name}-trainer"},
           {"name": "TIDE_TRAIN_METRICS_PORT", "value": str(TRAINER_METRICS_PORT)}]
    if tr.checkpoint.enabled:
        volumes.append({"name": "checkpoint",
                        "persistentVolumeClaim": {"claimName": checkpoint_claim(name, namespace, spec)["metadata"]
                                                  ["name"]}})
        mounts.append({"name": "checkpoint", "mountPath": CHECKPOINT_MOUNT})
        env.append({"name": "TIDE_TRAIN_CHECKPOINT_DIR", "value": CHECKPOINT_MOUNT})
    # tide train serves Prometheus metrics (any path) once it has loaded the target's heads and reached Redis.
    probe = {"httpGet": {"path": "/metrics", "port": "metrics"}, "periodSeconds": 10, "timeoutSeconds": 5}
    container = {
        "name": "trainer", "image": tr.image or spec.inference.image, "command": list(tr.command),
        "env": [*env, *_user_env(tr)], "resources": _resources(tr), "volumeMounts": mounts,
        "ports": [{"name": "metrics", "containerPort": TRAINER_METRICS_PORT}],
        "startupProbe": {**probe, "failureThreshold": 60}, "readinessProbe": probe,
        "livenessProbe": {**probe, "periodSeconds": 20, "failureThreshold": 3},
    }
    image = tr.image or spec.inference.image
    # The lineage starts from the draft SGLang serves: imported as version 0 into an empty registry.
    start = {"name": IMPORT_DRAFT, "image": image,
             "command": ["tide", "import", local_model(spec, "draft"), "--if-empty"],
             "env": container["env"], "resources": _plain(tr.resources), "volumeMounts": mounts,
             "terminationMessagePolicy": "FallbackToLogsOnError"}
    init = [*_fetch_containers(namespace, name, spec, tr, image, mounts, heads_only={"target"}), start]
    pod = {"initContainers": init, "containers": [container], "volumes": volumes, **_pod_placement(tr)}
    pod_labels = labels(name, "trainer")
    # Recreate: never two trainers at once (a ReadWriteOnce checkpoint, and one publisher per lineage).
    return _deployment(_meta(f"{name}-trainer", namespace, name, "trainer"), min(tr.replicas, replicas), pod_labels,
                       pod, strategy={"type": "Recreate"})


def inference_service(name: str, namespace: str, spec: TideDeploymentSpec) -> Manifest:
    """Every inference pod, canary pods included: traffic splits by pod count."""
    selector = {"tide.dev/deployment": name, "app.kubernetes.io/component": "inference"}
    return {"apiVersion": "v1", "kind": "Service", "metadata": _meta(name, namespace, name, "inference"),
            "spec": {"selector": selector,
                     "ports": [{"name": "http", "port": spec.inference.port, "targetPort": "http"}]}}


def redis_statefulset(name: str, namespace: str, spec: TideDeploymentSpec) -> Manifest:
    m = spec.redis.managed
    # noeviction: evicting stream entries or the control hash silently would lose data; the writers trim
    # the stream themselves (MAXLEN ~) and see a clear OOM error instead. A password always (the stream holds data
    # derived from user prompts), read from the generated Secret; protected mode stays on.
    args = ["--save", "", "--appendonly", "no", "--maxmemory", m.max_memory,
            "--maxmemory-policy", "noeviction", "--requirepass", "$(REDIS_PASSWORD)"]
    ref = redis_password_ref(name, spec)
    assert ref is not None
    container: Manifest = {"name": "redis", "image": m.image, "args": args,
                           "env": [_secret_env("REDIS_PASSWORD", ref),
                                   _secret_env("REDISCLI_AUTH", ref)],  # redis-cli (the probe) reads it
                           "ports": [{"name": "redis", "containerPort": REDIS_PORT}],
                           "resources": _plain(m.resources), "volumeMounts": [{"name": "data", "mountPath": "/data"}],
                           "readinessProbe": {"exec": {"command": ["redis-cli", "ping"]}, "periodSeconds": 5},
                           "livenessProbe": {"tcpSocket": {"port": "redis"}, "periodSeconds": 20}}
    pod: Manifest = {"containers": [container]}
    sts_spec: Manifest = {"serviceName": f"{name}-redis", "replicas": 1,
                          "selector": {"matchLabels": labels(name, "redis")},
                          "template": {"metadata": {"labels": labels(name, "redis")}}}
    if m.storage:
        args[1:2] = ["3600 1"]  # with a volume, snapshot hourly so stats and control survive a restart
        sts_spec["volumeClaimTemplates"] = [{"metadata": {"name": "data"}, "spec": {
            "accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": m.storage}}}}]
    else:
        pod["volumes"] = [{"name": "data", "emptyDir": {}}]  # the root filesystem is read-only
    sts_spec["template"]["spec"] = _secured(pod, REDIS_UID)
    return {"apiVersion": "apps/v1", "kind": "StatefulSet",
            "metadata": _meta(f"{name}-redis", namespace, name, "redis"), "spec": sts_spec}


def redis_service(name: str, namespace: str) -> Manifest:
    return {"apiVersion": "v1", "kind": "Service", "metadata": _meta(f"{name}-redis", namespace, name, "redis"),
            "spec": {"selector": labels(name, "redis"),
                     "ports": [{"name": "redis", "port": REDIS_PORT, "targetPort": "redis"}]}}


def _tide_pods(name: str) -> Manifest:
    """Selects this deployment's inference and trainer pods."""
    return {"matchLabels": {"tide.dev/deployment": name},
            "matchExpressions": [{"key": "app.kubernetes.io/component", "operator": "In",
                                  "values": ["inference", "trainer"]}]}


def redis_network_policy(name: str, namespace: str, operator_namespace: str | None) -> Manifest:
    """The managed Redis admits this deployment's pods and the operator's (in its namespace, when known), on the
    Redis port only, and opens no connection itself."""
    operator: Manifest = {"podSelector": {"matchLabels": {OPERATOR_LABEL: "true"}}, "namespaceSelector": (
        {"matchLabels": {"kubernetes.io/metadata.name": operator_namespace}} if operator_namespace else {})}
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": _meta(f"{name}-redis", namespace, name, "redis"),
            "spec": {"podSelector": {"matchLabels": labels(name, "redis")}, "policyTypes": ["Ingress", "Egress"],
                     "ingress": [{"from": [{"podSelector": _tide_pods(name)}, operator],
                                  "ports": [{"protocol": "TCP", "port": REDIS_PORT}]}]}}


def _url_port(url: str, default: int) -> int:
    parts = urlsplit(url)
    return parts.port or (443 if parts.scheme == "https" else default)


def egress_ports(spec: TideDeploymentSpec, redis_url: str | None) -> list[int]:
    """TCP ports the pods connect to at any address: an external Redis (`redis_url`, resolved from its Secret by
    the caller), the object store, the hub for fetched models, and `networkPolicy.extraEgressPorts`."""
    ports = set(spec.network_policy.extra_egress_ports)
    if not spec.redis.managed.enabled:
        ports.add(_url_port(redis_url or "", REDIS_PORT) if redis_url and redis_url.startswith("redis") else
                  REDIS_PORT)
    store = [spec.registry.url or ""] + [s.location for s in sources(spec).values() if s.kind == "s3"]
    if any(u.startswith("s3://") for u in store):
        ports.add(_url_port(spec.registry.endpoint, HUB_PORT) if spec.registry.endpoint else HUB_PORT)
    if any(s.kind == "hub" for s in sources(spec).values()):
        ports.add(HUB_PORT)
    return sorted(ports)


def pods_network_policy(name: str, namespace: str, spec: TideDeploymentSpec, redis_url: str | None) -> Manifest:
    """The inference and trainer pods accept connections on their own ports (the Service, Prometheus) and open them
    only to DNS, the managed Redis, and the `egress_ports` of what the spec names."""
    tcp = [{"protocol": "TCP", "port": p} for p in egress_ports(spec, redis_url)]
    egress: list[Manifest] = [{"ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}]}]
    if spec.redis.managed.enabled:
        egress.append({"to": [{"podSelector": {"matchLabels": labels(name, "redis")}}],
                       "ports": [{"protocol": "TCP", "port": REDIS_PORT}]})
    if tcp:
        egress.append({"ports": tcp})
    ingress = [{"ports": [{"protocol": "TCP", "port": spec.inference.port},
                          {"protocol": "TCP", "port": TRAINER_METRICS_PORT}]}]
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": _meta(name, namespace, name, "network"),
            "spec": {"podSelector": _tide_pods(name), "policyTypes": ["Ingress", "Egress"],
                     "ingress": ingress, "egress": egress}}


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


def children(name: str, namespace: str, spec: TideDeploymentSpec, *, redis_url: str | None = None,
             operator_namespace: str | None = None, trainer_replicas: int = 1) -> list[Manifest]:
    """Every child this spec wants; `possible_children` minus these are deleted. `redis_url` is the Redis URL as
    resolved (from `redis.urlSecretRef` too), `operator_namespace` where the operator runs (both for the
    NetworkPolicies), `trainer_replicas` the training gate's. The managed Redis's password Secret is not among them:
    it is created once (`redis_secret`)."""
    out = [inference_deployment(name, namespace, spec), inference_service(name, namespace, spec)]
    if spec.training.enabled:
        if spec.training.checkpoint.enabled:
            out.append(checkpoint_claim(name, namespace, spec))
        out.append(trainer_deployment(name, namespace, spec, trainer_replicas))
    if spec.redis.managed.enabled:
        out += [redis_statefulset(name, namespace, spec), redis_service(name, namespace)]
    if spec.network_policy.enabled:
        out.append(pods_network_policy(name, namespace, spec, redis_url or spec.redis.url))
        if spec.redis.managed.enabled:
            out.append(redis_network_policy(name, namespace, operator_namespace))
    if spec.monitoring.pod_monitor:
        out.append(pod_monitor(name, namespace, spec))
    if spec.monitoring.service_monitor:
        out.append(service_monitor(name, namespace, spec))
    return out


def possible_children(name: str) -> list[tuple[str, str]]:
    """(kind, name) of every child any spec could want: names are fixed, so no label query is needed."""
    return [("Deployment", name), ("Service", name), ("PersistentVolumeClaim", f"{name}-trainer-checkpoint"),
            ("Deployment", f"{name}-trainer"), ("StatefulSet", f"{name}-redis"), ("Service", f"{name}-redis"),
            ("Secret", f"{name}-redis"), ("NetworkPolicy", name), ("NetworkPolicy", f"{name}-redis"),
            ("PodMonitor", name), ("ServiceMonitor", name)]


def draft_version(name: str, namespace: str, version: int, parent: int | None,
                  metrics: dict[str, float]) -> Manifest:
    """The DraftVersion of a published version (its status is written separately: a subresource)."""
    return {"apiVersion": API_VERSION, "kind": "DraftVersion",
            "metadata": _meta(f"{name}-v{version}", namespace, name, "draft"),
            "spec": DraftVersionSpec(deployment=name, version=version, parent=parent, metrics=metrics)
            .model_dump(by_alias=True, exclude_none=True)}
