"""CRD models: the one source of the `TideDeployment` and `DraftVersion` schemas (tide.dev/v1alpha1).

`tide_operator.crds` turns these into the CRD YAML under `charts/tide/crds/` and the reference in
`docs/crds.md`; the operator parses every object it reads with them, so the schema the API server enforces
and the one the operator assumes cannot drift apart. Field names are camelCase on the wire (Kubernetes
convention) and snake_case in Python. Every field's description is the text `kubectl explain` shows.
"""

import re
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints
from pydantic.alias_generators import to_camel

GROUP = "tide.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"

# Kubernetes name syntaxes (apimachinery validation): a DNS-1123 subdomain for most objects, a DNS-1123
# label where the name becomes part of a Service or pod host name.
DNS_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$"
DNS_LABEL = r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$"
# resource.Quantity as the API server accepts it: 4, 500m, 16Gi, 1.5, 1e3.
QUANTITY = r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+|[numkMGTPE]|[KMGTPE]i)?$"
DURATION = r"^(\d+(ms|s|m|h))+$"
_DURATION_PART = re.compile(r"(\d+)(ms|s|m|h)")
_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}

Name = Annotated[str, StringConstraints(pattern=DNS_SUBDOMAIN, max_length=253)]
Quantity = Annotated[int | Annotated[str, StringConstraints(pattern=QUANTITY)],
                     Field(json_schema_extra={"x-kubernetes-int-or-string": True})]
LabelValue = Annotated[str, StringConstraints(max_length=63)]
Version = Annotated[int, Field(ge=0, le=1_000_000_000)]


Duration = Annotated[str, StringConstraints(pattern=DURATION)]


def seconds(duration: str) -> float:
    """A `Duration` ("90s", "1h30m", "500ms") in seconds."""
    return sum(int(n) * _UNIT_S[unit] for n, unit in _DURATION_PART.findall(duration))


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", alias_generator=to_camel, populate_by_name=True)


class Resources(_Model):
    """Container resources (as in a Pod); the GPU limit is added from `gpus`."""

    requests: dict[str, Quantity] = Field(default_factory=dict, description="e.g. {cpu: 8, memory: 64Gi}")
    limits: dict[str, Quantity] = Field(default_factory=dict, description="e.g. {memory: 80Gi}")


class Toleration(_Model):
    """A Pod toleration, so pods may run on tainted GPU nodes."""

    key: str | None = Field(None, max_length=316, description="taint key; empty with Exists matches all")
    operator: Literal["Exists", "Equal"] = Field("Equal", description="Exists or Equal")
    value: str | None = Field(None, max_length=63, description="taint value (with Equal)")
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = Field(
        None, description="taint effect to tolerate; empty tolerates all effects")
    toleration_seconds: int | None = Field(None, ge=0, description="how long a NoExecute taint is tolerated")


class EnvVar(_Model):
    """A literal environment variable for the pool's containers."""

    name: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$", max_length=253, description="variable name")
    value: str = Field("", description="value")


class Placement(_Model):
    """Where a pool's pods run: GPU count and kind, and the scheduling constraints of that pool."""

    gpus: int = Field(1, ge=0, le=64, description="GPUs per pod (the limit of `gpuResource`)")
    gpu_resource: str = Field("nvidia.com/gpu", pattern=r"^[a-z0-9.-]+/[a-z0-9.-]+$",
                              description="extended resource name of the GPU: nvidia.com/gpu, amd.com/gpu")
    node_selector: dict[str, LabelValue] = Field(
        default_factory=dict,
        description="node labels selecting the GPU pool, e.g. {nvidia.com/gpu.product: NVIDIA-H100-80GB-HBM3}")
    tolerations: list[Toleration] = Field(default_factory=list, description="tolerations for the pool's taints")
    affinity: dict[str, Any] | None = Field(None, description="a Pod affinity, passed through unchanged")
    resources: Resources = Field(default_factory=Resources, description="CPU/memory requests and limits")
    env: list[EnvVar] = Field(default_factory=list, description="extra variables, e.g. other TIDE_* settings")


SECRET_LABEL = "tide.dev/secret"  # a Secret must carry it, set to "true", before the operator reads or references it


class SecretKeyRef(_Model):
    """A key of a Secret in the TideDeployment's namespace, labelled `tide.dev/secret: "true"` (the operator neither
    reads nor hands to pods a Secret that is not)."""

    name: Name = Field(description="Secret name")
    key: str = Field(min_length=1, max_length=253, description="key inside the Secret")


class ModelSpec(_Model):
    """The target model SGLang serves and the trainer reads the embedding, final norm and LM head of."""

    path: str = Field(min_length=1, max_length=1024,
                      description="the target: a path in the image or under claimName, pvc://claim/path, "
                      "s3://bucket/prefix, or a hub id org/name[@revision]; s3 and hub models are fetched once per "
                      "pod by an init container (the trainer's: only the embedding, final norm and LM head)")
    claim_name: Name | None = Field(None, description="PVC holding the model, mounted read-only at /models")
    hub_token_secret_ref: SecretKeyRef | None = Field(
        None, description="Secret key holding a Hugging Face token (HF_TOKEN) for fetching gated hub models")


class DraftSpec(_Model):
    """The draft model: where version 0 comes from and how new versions are rolled out."""

    initial_path: str = Field(min_length=1, max_length=1024,
                              description="EAGLE-3 draft SGLang starts with, imported as version 0 into an empty "
                              "registry: a path, pvc://claim/path, s3://bucket/prefix or a hub id (fetched like "
                              "model.path)")
    policy: Literal["auto", "manual"] = Field(
        "auto", description="auto: canary every published version; manual: only a pinned version is served")
    version: Version | None = Field(
        None, description="pin this version as stable (manual promotion or rollback); null resumes `policy`")
    keep_versions: int = Field(
        10, ge=1, le=1000, description="newest versions kept besides version 0, stable, canary, pinned and those "
        "still rolling out; older DraftVersions and their registry files are deleted")


class InferenceSpec(Placement):
    """The SGLang serving pool: one Deployment behind one Service; canary pods are named among its pods."""

    # SGLang's tokenizer, detokenizer and scheduler processes each hold a core, and so does TIDE's capture helper
    # process (it assembles, encodes and writes the rows: 1.1-1.7 ms of CPU per decode batch on the H200 machine,
    # docs/results/capture-bench-gpu-20261202.json); host memory holds the weights while they load, the pinned
    # capture slab (slots x slot size) and the helper. No CPU limit: throttling the scheduler stalls the GPU.
    resources: Resources = Field(
        default_factory=lambda: Resources(requests={"cpu": 5, "memory": "32Gi"}, limits={"memory": "64Gi"}),
        description="CPU/memory requests and limits (the default, as a whole, when unset)")

    replicas: int | None = Field(1, ge=1, le=1000,
                                 description="inference pods, canary pods included; null leaves the count to an "
                                 "HorizontalPodAutoscaler")
    image: str = Field(min_length=1, description="SGLang image with tide-sglang installed (the plugin)")
    sglang_args: list[str] = Field(default_factory=list, description="extra sglang.launch_server arguments")
    port: int = Field(30000, ge=1, le=65535, description="SGLang HTTP port (also serves /metrics)")


class TriggerSpec(_Model):
    """The engines' training trigger (TIDE Algorithm 1): short against long EWMA of window acceptance."""

    short_alpha: float = Field(0.2, gt=0, le=1, description="weight of a new window in the short EWMA")
    long_alpha: float = Field(0.01, gt=0, le=1, description="weight of a new window in the long EWMA")
    epsilon: float = Field(0.02, ge=0, le=1, description="smallest acceptance gap between the EWMAs that counts as "
                           "drift; each engine widens it to 2 standard deviations of its windows' noise")


class CheckpointSpec(_Model):
    """The trainer's state (draft, optimizer, replay buffer) on a PersistentVolumeClaim the operator creates
    (`<name>-trainer-checkpoint`): a restarted trainer resumes from it, and stream entries are acked only once a
    checkpoint holds them, so a trainer lost between checkpoints loses no captured data."""

    enabled: bool = Field(True, description="false: no checkpoint; entries are acked as soon as they are used, and "
                          "a restarted trainer starts from the stable version with an empty replay buffer")
    size: Annotated[str, StringConstraints(pattern=QUANTITY)] = Field(
        "20Gi", description="PVC size: a few copies of the draft and optimizer state plus the replay buffer")
    storage_class_name: Name | None = Field(None, description="StorageClass of the PVC; unset: the cluster default")


class TrainingSpec(Placement):
    """The online trainer on its own GPU pool."""

    enabled: bool = Field(True, description="run the trainer; false serves the current versions only")
    replicas: int = Field(1, ge=1, le=1, description="trainer pods: at most 1 until training across pods exists "
                          "(independent trainers would publish competing versions into one lineage); scale a "
                          "trainer with more `gpus` and torchrun in `command` instead")
    # The trainer tokenizes nothing and reads its batches from Redis: a few cores; memory holds the replay buffer.
    resources: Resources = Field(
        default_factory=lambda: Resources(requests={"cpu": 2, "memory": "16Gi"}, limits={"memory": "32Gi"}),
        description="CPU/memory requests and limits (the default, as a whole, when unset)")
    checkpoint: CheckpointSpec = Field(default_factory=CheckpointSpec, description="trainer checkpoint volume")
    image: str | None = Field(None, description="trainer image; defaults to the inference image")
    command: list[str] = Field(["tide", "train"], min_length=1,
                               description="trainer entry point")
    separate_pool: bool = Field(True, description="require a node selector different from inference's")
    gate: Literal["always", "trigger"] = Field(
        "trigger", description="trigger: train only while the engines' trigger says acceptance drifted, and scale "
        "the trainer to zero when it stays quiet (idleAfter); always: train and capture all the time")
    hold_for: Duration = Field("2m", description="gate trigger: train and collect stay on this long after the last "
                               "live pod stopped voting for training, so pods whose triggers alternate do not flap")
    idle_after: Duration = Field("10m", description="gate trigger: scale the trainer Deployment to zero once no live "
                                 "pod has voted to train for this long; the next vote scales it back to one, and it "
                                 "resumes from its checkpoint")
    min_up: Duration = Field("15m", description="gate trigger: a trainer scaled up stays up at least this long (a "
                             "start costs minutes: scheduling on a GPU node, loading the target's heads)")
    trigger: TriggerSpec = Field(default_factory=TriggerSpec, description="training trigger thresholds")


class ManagedRedis(_Model):
    """A single-node Redis StatefulSet created by the operator (a transport; no persistence by default). It requires
    a password, generated into the Secret `<name>-redis` (which the pods read through secretKeyRef), and a
    NetworkPolicy lets only this deployment's pods and the operator reach it."""

    enabled: bool = Field(False, description="create the Redis StatefulSet and Service")
    image: str = Field("redis:7.4-alpine", description="Redis image")
    max_memory: str = Field("4gb", pattern=r"^\d+(b|kb|mb|gb)$", description="Redis maxmemory")
    storage: Annotated[str, StringConstraints(pattern=QUANTITY)] | None = Field(
        None, description="PVC size for /data; unset keeps data in memory only")
    resources: Resources = Field(
        default_factory=lambda: Resources(requests={"cpu": "500m", "memory": "5Gi"}, limits={"memory": "6Gi"}),
        description="Redis container resources; the memory limit must exceed maxMemory")


class RedisSpec(_Model):
    """Where the hidden-state stream, control hash and stats live. Exactly one of url, urlSecretRef, managed."""

    url: str | None = Field(None, pattern=r"^(redis|rediss|unix)://", description="redis:// or rediss:// URL")
    url_secret_ref: SecretKeyRef | None = Field(None, description="Secret key holding the URL")
    password_secret_ref: SecretKeyRef | None = Field(None, description="Secret key holding the password (not with "
                                                     "managed: the operator generates that one)")
    cluster: bool = Field(False, description="the URL names one node of a Redis Cluster")
    managed: ManagedRedis = Field(default_factory=ManagedRedis, description="operator-managed Redis")


class RegistrySpec(_Model):
    """Where published draft versions are stored. Exactly one of claimName, url. Each TideDeployment gets its own
    lineage under `<namespace>/<name>/` of the volume or URL, so deployments may share one volume or bucket."""

    claim_name: Name | None = Field(None, description="ReadWriteMany PVC, mounted by trainer and inference "
                                    "(sub-path <namespace>/<name>)")
    url: str | None = Field(None, pattern=r"^(s3://[^/]|file:///)",
                            description="s3://bucket/prefix (an S3-compatible object store), or file:///path (a "
                            "path the operator's pod mounts as well); <namespace>/<name> is appended")
    endpoint: str | None = Field(None, pattern=r"^https?://", description="S3 endpoint URL for a store other than "
                                 "AWS S3 (SeaweedFS, MinIO, Ceph RGW, storage.googleapis.com); AWS_ENDPOINT_URL_S3")
    region: str | None = Field(None, max_length=63, description="S3 region (AWS_REGION); us-east-1 when unset")
    access_key_id_secret_ref: SecretKeyRef | None = Field(
        None, description="Secret key holding the S3 access key id (AWS_ACCESS_KEY_ID); unset: the pods' own "
        "identity (IRSA, workload identity)")
    secret_access_key_secret_ref: SecretKeyRef | None = Field(
        None, description="Secret key holding the S3 secret access key (AWS_SECRET_ACCESS_KEY)")
    mount_path: str = Field("/var/lib/tide/registry", pattern=r"^/", description="where the PVC is mounted")


class RolloutSpec(_Model):
    """How a published draft version is canaried, promoted or rolled back."""

    canary_replicas: int = Field(1, ge=1, le=100, description="pods named to load the canary, among the live "
                                 "pods; never all of them while more than one is live")
    canary_percent: int | None = Field(None, ge=1, le=50, description="canary share of the live pods, rounded up; "
                                       "overrides canaryReplicas")
    min_improvement: float = Field(0.02, ge=0, le=1,
                                   description="acceptance-rate gain over stable needed to promote")
    rollback_threshold: float = Field(0.02, ge=0, le=1, description="acceptance-rate loss that rolls back")
    min_tokens: int = Field(20000, ge=1, description="drafted tokens each side must see before deciding")
    max_tokens: int = Field(1_000_000, ge=1, description="undecided after this many canary tokens: reject")
    max_swap_failures: int = Field(0, ge=0, description="canary swap failures tolerated before rollback")
    canary_timeout: Duration = Field("1h", description="a canary still undecided after this is rejected "
                                     "(CanaryTimeout: too little traffic, or its pods never loaded it)")
    swap_timeout: Duration = Field("5m", description="pods still not serving their version this long after the "
                                   "rollout moved are named in the Swapped condition (reason SwapTimeout)")
    heartbeat_interval: Duration = Field("5s", description="how often each engine reports the version it serves "
                                         "(TIDE_HEARTBEAT_S); a pod silent for 3 intervals counts as gone")


class MonitoringSpec(_Model):
    """Prometheus Operator monitors for the inference and trainer pods."""

    pod_monitor: bool = Field(False, description="create a PodMonitor (inference and trainer pods)")
    service_monitor: bool = Field(False, description="create a ServiceMonitor (inference Service)")
    interval: str = Field("30s", pattern=DURATION, description="scrape interval")
    labels: dict[str, LabelValue] = Field(default_factory=dict, description="labels Prometheus selects on")


class NetworkPolicySpec(_Model):
    """NetworkPolicies the operator creates: the inference and trainer pods may open connections only to DNS, Redis,
    the object store and the model hub (the ports the spec implies) and accept them only on their own ports; the
    managed Redis accepts only this deployment's pods and the operator. A CNI must enforce them (Calico, Cilium)."""

    enabled: bool = Field(True, description="create the NetworkPolicies")
    extra_egress_ports: list[Annotated[int, Field(ge=1, le=65535)]] = Field(
        default_factory=list, description="more TCP ports the pods may connect to, at any address (a proxy, a hub "
        "mirror set with HF_ENDPOINT)")


class TideDeploymentSpec(_Model):
    """TIDE on SGLang: inference with a self-improving EAGLE-3 draft, a trainer, and draft rollouts."""

    model: ModelSpec = Field(description="target model")
    draft: DraftSpec = Field(description="draft model and rollout policy")
    inference: InferenceSpec = Field(description="serving pool")
    training: TrainingSpec = Field(default_factory=TrainingSpec, description="training pool")
    redis: RedisSpec = Field(default_factory=RedisSpec, description="Redis connection")
    registry: RegistrySpec = Field(default_factory=RegistrySpec, description="draft registry")
    rollout: RolloutSpec = Field(default_factory=RolloutSpec, description="canary policy")
    monitoring: MonitoringSpec = Field(default_factory=MonitoringSpec, description="Prometheus monitors")
    network_policy: NetworkPolicySpec = Field(default_factory=NetworkPolicySpec, description="NetworkPolicies")


class Condition(_Model):
    """A status condition (metav1.Condition)."""

    type: Literal["Ready", "Progressing", "Degraded", "RolloutPaused", "Swapped", "Conflict"] = Field(
        description="condition type")
    status: Literal["True", "False", "Unknown"] = Field(description="True, False or Unknown")
    reason: str = Field(pattern=r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$", description="CamelCase reason")
    message: str = Field("", max_length=32768, description="human-readable detail")
    observed_generation: int = Field(0, ge=0, description="spec generation the condition is about")
    last_transition_time: str = Field(description="when status last changed (RFC 3339)")


class TrainerState(StrEnum):
    TRAINING = "Training"  # the trainer is up and trains (control state train=1)
    IDLE = "Idle"  # up, not training; scaled to zero after idleAfter without a vote
    SCALED_DOWN = "ScaledDown"  # the trainer Deployment has 0 replicas; nothing is captured
    DISABLED = "Disabled"  # training.enabled is false: no trainer Deployment


class TrainingStatus(_Model):
    """The training gate's decision (`tide_operator.gate`): what the trainer does and why."""

    state: TrainerState = Field(description="Training, Idle, ScaledDown or Disabled")
    reason: str = Field(pattern=r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$", description="CamelCase reason")
    message: str = Field("", max_length=32768, description="human-readable detail")
    since: str = Field(description="when the state last changed (RFC 3339)")
    up_since: str | None = Field(None, description="when the trainer was last scaled up (minUp counts from it); "
                                 "unset while it is scaled down or disabled")
    last_trigger: str | None = Field(None, description="the last pass on which a live pod voted to train")


class TideDeploymentStatus(_Model):
    """What the operator observed; written only by the operator."""

    observed_generation: int = Field(0, ge=0, description="last spec generation reconciled")
    stable: Version = Field(0, description="draft version all stable pods load")
    canary: Version | None = Field(None, description="draft version the canary pods load")
    canary_pods: list[str] = Field(default_factory=list, description="pods named to load the canary")
    candidate: Version | None = Field(None, description="version under evaluation or next in line")
    acceptance: float | None = Field(None, ge=0, le=1, description="stable version's draft acceptance rate")
    events_cursor: str = Field("0-0", pattern=r"^\d+-\d+$", description="last Redis events entry consumed")
    training: TrainingStatus | None = Field(None, description="the training gate: trainer state and why")
    conditions: list[Condition] = Field(default_factory=list, description="Ready, Progressing, Degraded, "
                                        "RolloutPaused, Swapped, Conflict")


class DraftVersionSpec(_Model):
    """A draft version the trainer published (created by the operator from the events stream)."""

    deployment: Annotated[str, StringConstraints(pattern=DNS_LABEL)] = Field(description="TideDeployment name")
    version: Version = Field(description="registry version number (0 is the initial draft)")
    parent: Version | None = Field(None, description="version it was trained from")
    metrics: dict[str, float] = Field(default_factory=dict, description="trainer's held-out metrics")


class Phase(StrEnum):
    CANDIDATE = "Candidate"
    CANARY = "Canary"
    PROMOTING = "Promoting"  # routed to every pod, not yet served by all of them
    PROMOTED = "Promoted"
    ROLLING_BACK = "RollingBack"  # withdrawn, some pods still serve it
    ROLLED_BACK = "RolledBack"
    REJECTED = "Rejected"


class Counters(_Model):
    """Counts engines add to the version's stats (`tide_sglang.rollout.Stats`)."""

    tokens: int = Field(0, ge=0, description="draft tokens verified")
    accepted: int = Field(0, ge=0, description="draft tokens accepted")
    verify_steps: int = Field(0, ge=0, description="verify steps")
    swap_failures: int = Field(0, ge=0, description="failed swaps to this version")

    @property
    def acceptance(self) -> float | None:
        return self.accepted / self.tokens if self.tokens else None


class Baseline(Counters):
    """The stable version's counters when the canary started: stable is judged on the same time window."""

    version: Version = Field(0, description="stable version at canary start")


class DraftVersionStatus(_Model):
    """Where the version is in its rollout."""

    phase: Phase = Field(Phase.CANDIDATE, description="Candidate, Canary, Promoting, Promoted, RollingBack, "
                         "RolledBack or Rejected")
    reason: str = Field("Published", description="why it is in this phase")
    message: str = Field("", description="human-readable detail")
    promotion: int | None = Field(None, ge=0, description="order of promotion; the highest Promoted is stable")
    baseline: Baseline | None = Field(None, description="stable counters when the canary began")
    canary_pods: list[str] = Field(default_factory=list, description="pods named to load it while in Canary")
    canary: Counters | None = Field(None, description="canary counters at the last decision")
    acceptance: float | None = Field(None, ge=0, le=1, description="canary acceptance rate")
    stable_acceptance: float | None = Field(None, ge=0, le=1,
                                            description="stable acceptance rate over the canary window")
    last_transition_time: str | None = Field(None, description="when the phase last changed (RFC 3339)")
