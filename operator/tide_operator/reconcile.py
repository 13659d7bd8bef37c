"""One reconcile pass of a TideDeployment: read, decide with the pure functions, write.

Every kopf handler ends here, so there is one path and it is level-based: it reads the object, its
DraftVersions and Redis afresh each time, and writes only differences. That makes it idempotent across
operator restarts, and a per-object lock keeps the timer and the change handlers from interleaving.
"""

import base64
import datetime
import logging
import secrets as random_secrets
import threading
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import kopf
from pydantic import ValidationError

from tide_operator import builders, gate, redis_io, registry_io, rollout, status
from tide_operator.config import OperatorSettings
from tide_operator.kube import ApiError, Kube, Obj, merge_patch
from tide_operator.metrics import Snapshots
from tide_operator.models import (
    SECRET_LABEL,
    Baseline,
    Counters,
    DraftVersionStatus,
    Phase,
    TideDeploymentSpec,
    TideDeploymentStatus,
    TrainingStatus,
    seconds,
)
from tide_operator.status import Pods, Problem

log = logging.getLogger(__name__)
Versions = dict[int, DraftVersionStatus]
Secrets = dict[str, Obj]  # the namespace's Secrets labelled tide.dev/secret=true, by name


class Foreign(Exception):
    """An object the operator would write exists and is not this TideDeployment's (`builders.owns`)."""

    def __init__(self, kind: str, name: str) -> None:
        super().__init__(f"{kind} {name} exists and is not this TideDeployment's (no ownerReference to it, no "
                         "tide-operator labels for it): left unchanged; delete or rename it")


def now() -> str:
    return rollout.stamp(datetime.datetime.now(datetime.UTC))


@dataclass
class Observed:
    """What one pass read from Redis: the events cursor, the stats judged, the pods' versions and the training
    gate's decision (None: unread)."""

    cursor: str
    stats: dict[int, Counters] = field(default_factory=dict)
    fleet: rollout.Fleet | None = None
    problems: list[Problem] = field(default_factory=list)
    training: TrainingStatus | None = None


def _dump(model: Any) -> Obj:
    return model.model_dump(by_alias=True, exclude_none=True, mode="json")


class Reconciler:
    def __init__(self, kube: Kube, config: OperatorSettings, snapshots: Snapshots | None = None) -> None:
        """`snapshots`: where each pass records the statuses it wrote, for the operator's metrics."""
        self.kube = kube
        self.config = config
        self.snapshots = snapshots
        self._locks: defaultdict[tuple[str, str], threading.Lock] = defaultdict(threading.Lock)
        self._redis: dict[tuple[str, str | None, bool], redis_io.Client] = {}

    def reconcile(self, namespace: str, name: str, *, prune: bool = True) -> None:
        """One pass. `prune` also deletes children the spec no longer wants: needed after a spec change only,
        so the timer skips it rather than sending a DELETE for every absent optional child each time."""
        with self._locks[namespace, name]:
            td = self.kube.get("TideDeployment", namespace, name)
            if td is not None and not td["metadata"].get("deletionTimestamp"):
                self._reconcile(td, prune)

    def _reconcile(self, td: Obj, prune: bool) -> None:
        name, ns = td["metadata"]["name"], td["metadata"]["namespace"]
        old = _old_status(td)
        spec, problems = status.parse(name, td.get("spec") or {})
        versions = self._versions(td)
        seen, pods, secrets = Observed(old.events_cursor), {}, self._secrets(ns)
        if spec is not None:
            problems += [p for f, ref in status.secret_refs(spec)
                         if (p := status.check_secret(f, ref, secrets.get(ref.name))) is not None]
        if spec is not None and not problems:  # a wrong spec changes nothing until it is fixed
            pods, rejected = self._apply_children(td, spec, prune, secrets, gate.replicas(old.training))
            seen = self._rollout(td, spec, versions, old, pods.get(name, Pods(0, 0)).ready, secrets)
            if gate.replicas(seen.training or old.training) != gate.replicas(old.training):
                # the gate scaled the trainer: apply it in this pass rather than on the next one
                pods, rejected = self._apply_children(td, spec, False, secrets, gate.replicas(seen.training))
            problems += rejected + seen.problems
            self._retain(td, spec, versions)
        route = rollout.routing(versions)
        pending = next((s.phase.value for s in versions.values() if s.phase in rollout.PENDING), None)
        generation = td["metadata"].get("generation", 0)
        new = TideDeploymentStatus(
            observed_generation=generation, stable=route.stable, canary=route.canary,
            canary_pods=list(route.canary_pods),
            candidate=route.canary if route.canary is not None else _waiting(versions),
            acceptance=rollout.rounded(seen.stats.get(route.stable, Counters()).acceptance),
            events_cursor=seen.cursor, training=seen.training or old.training,
            conditions=status.conditions(generation, problems, pods, route, pending, seen.fleet, spec,
                                         old.conditions, now()))
        self._write_status(td, new)
        if self.snapshots is not None:
            self.snapshots.record(ns, name, new, versions)

    def _rollout(self, td: Obj, spec: TideDeploymentSpec, versions: Versions, old: TideDeploymentStatus,
                 ready: int, secrets: Secrets) -> "Observed":
        """Ingest published versions, take one rollout step, decide the training gate, publish the control state.
        Mutates `versions`."""
        name, ns, cursor = td["metadata"]["name"], td["metadata"]["namespace"], old.events_cursor
        try:
            client = self._client(td, spec, secrets)
            cursor = self._ingest(client, td, versions, cursor)
            problems = status.check_pin(spec, set(versions))
            stats = redis_io.read_stats(client, ns, name, _judged(versions))
            beats = redis_io.read_heartbeats(client, ns, name, seconds(spec.rollout.heartbeat_interval))
            fleet = rollout.Fleet({pod: beat.version for pod, beat in beats.items()}, ready)
            when = datetime.datetime.now(datetime.UTC)
            changed = {} if problems else rollout.step(spec.draft, spec.rollout, versions, stats, fleet, when)
            # Engines first, then the DraftVersions: a version reads Canary or Promoting only once the control
            # state routes it (Redis down: neither changes, and the next pass decides again).
            route = rollout.routing({**versions, **changed})
            votes = gate.votes(beats)
            training = gate.decide(spec.training, old.training, votes, when)
            redis_io.write_control(client, ns, name, gate.control_state(route, training, votes))
            for v, st in changed.items():
                self._set_version_status(td, v, versions.get(v), st)
                versions[v] = st
            return Observed(cursor, stats, fleet, problems, training)
        except redis_io.Malformed as e:
            return Observed(cursor, problems=[Problem("InvalidRolloutData", str(e))])
        except Foreign as e:
            return Observed(cursor, problems=[Problem("Conflict", str(e))])
        except redis_io.Unavailable as e:
            self._redis.clear()
            return Observed(cursor, problems=[Problem("RedisUnavailable", f"Redis: {e}")])

    def _ingest(self, client: redis_io.Client, td: Obj, versions: Versions, cursor: str) -> str:
        """DraftVersions for the initial draft and for every published version after `cursor`."""
        if 0 not in versions:
            versions[0] = self._create_version(td, 0, None, {}, DraftVersionStatus(
                phase=Phase.PROMOTED, reason="Initial", message="the imported initial draft", promotion=0,
                last_transition_time=now()))
        events, cursor = redis_io.read_events(client, td["metadata"]["namespace"], td["metadata"]["name"], cursor,
                                              self.config.events_batch)
        for event in events:
            if event.version not in versions:
                versions[event.version] = self._create_version(td, event.version, event.parent, event.metrics,
                                                               DraftVersionStatus(last_transition_time=now()))
        return cursor

    def _retain(self, td: Obj, spec: TideDeploymentSpec, versions: Versions) -> None:
        """Delete retired DraftVersions, then the registry files no DraftVersion names (when the operator can
        reach the registry). Mutates `versions`."""
        name, ns = td["metadata"]["name"], td["metadata"]["namespace"]
        for v in rollout.retired(spec.draft, versions):
            self.kube.delete("DraftVersion", ns, f"{name}-v{v}")  # listed as this deployment's: owned
            del versions[v]
        registry = registry_io.open_registry(ns, name, spec.registry)
        if registry is not None:
            registry_io.delete_unnamed(registry, set(versions))

    def _create_version(self, td: Obj, version: int, parent: int | None, metrics: dict[str, float],
                        initial: DraftVersionStatus) -> DraftVersionStatus:
        name, ns = td["metadata"]["name"], td["metadata"]["namespace"]
        body = builders.draft_version(name, ns, version, parent, metrics)
        kopf.adopt(body, owner=td)
        try:
            self.kube.create(body)
        except ApiError as e:
            # 409: it exists but was not listed: a race (it starts from `initial` too), or someone else's (Conflict)
            if e.status != 409:
                raise
            live = self.kube.get("DraftVersion", ns, body["metadata"]["name"])
            if live is not None and not builders.owns(td, live):
                raise Foreign("DraftVersion", body["metadata"]["name"]) from None
        self._set_version_status(td, version, None, initial)
        return initial

    def _set_version_status(self, td: Obj, version: int, old: DraftVersionStatus | None,
                            new: DraftVersionStatus) -> None:
        patch = merge_patch(_dump(old) if old else {}, _dump(new))
        name, ns = td["metadata"]["name"], td["metadata"]["namespace"]
        self.kube.patch("DraftVersion", ns, f"{name}-v{version}", {"status": patch}, status=True)

    def _versions(self, td: Obj) -> Versions:
        """This deployment's DraftVersions (its own only: labelled, naming it, and owned)."""
        name, ns = td["metadata"]["name"], td["metadata"]["namespace"]
        out: Versions = {}
        for dv in self.kube.list("DraftVersion", ns, {"tide.dev/deployment": name}):
            if (dv.get("spec") or {}).get("deployment") != name or not builders.owns(td, dv):
                continue
            try:
                out[int(dv["spec"]["version"])] = DraftVersionStatus.model_validate(dv.get("status") or {})
            except (ValidationError, KeyError, ValueError) as e:
                log.warning("ignoring DraftVersion %s: %s", dv["metadata"]["name"], e)
        return out

    def _apply_children(self, td: Obj, spec: TideDeploymentSpec, prune: bool, secrets: Secrets,
                        trainer_replicas: int) -> tuple[dict[str, Pods], list[Problem]]:
        """Apply every wanted child, delete unwanted ones, touching only objects this TideDeployment owns (another
        one of the same name is a Conflict problem). A child the API server refuses (an immutable field changed,
        a CRD not installed) becomes a problem; the other children are still applied. `trainer_replicas` is the
        training gate's (0 while it has scaled the trainer down)."""
        name, ns = td["metadata"]["name"], td["metadata"]["namespace"]
        desired = builders.children(name, ns, spec, redis_url=self._redis_url(td, spec, secrets),
                                    operator_namespace=self.config.namespace, trainer_replicas=trainer_replicas)
        wanted = {(c["kind"], c["metadata"]["name"]) for c in desired}
        kopf.adopt(desired, owner=td)
        pods, rejected = {}, []
        if spec.redis.managed.enabled:
            wanted.add(("Secret", f"{name}-redis"))
            rejected += self._ensure_redis_secret(td, secrets)
        for child in desired:
            live = self.kube.get(child["kind"], ns, child["metadata"]["name"])
            if live is not None and not builders.owns(td, live):
                rejected.append(Problem("Conflict", str(Foreign(child["kind"], child["metadata"]["name"]))))
                continue
            try:
                live = self.kube.apply(child, live)
            except ApiError as e:
                if e.status not in (400, 404, 409, 422):
                    raise
                rejected.append(Problem("ChildRejected", f"{child['kind']} {child['metadata']['name']}: {e}"))
                continue
            if child["kind"] in ("Deployment", "StatefulSet"):  # the live count: an autoscaler may set it
                ready = (live.get("status") or {}).get("readyReplicas") or 0
                count = (live.get("spec") or {}).get("replicas", 1)
                pods[child["metadata"]["name"]] = Pods(count, ready)
                if ready < count and child["spec"]["template"]["spec"].get("initContainers"):
                    selector = child["spec"]["selector"]["matchLabels"]
                    rejected += status.init_failures(self.kube.list("Pod", ns, selector))
        for kind, child_name in builders.possible_children(name) if prune else ():
            if (kind, child_name) not in wanted:
                self._delete_owned(td, kind, child_name, secrets)
        return pods, rejected

    def _ensure_redis_secret(self, td: Obj, secrets: Secrets) -> list[Problem]:
        """The managed Redis's password Secret: created once with a random password, never rewritten."""
        name, ns = td["metadata"]["name"], td["metadata"]["namespace"]
        if f"{name}-redis" in secrets:
            if builders.owns(td, secrets[f"{name}-redis"]):
                return []
            return [Problem("Conflict", str(Foreign("Secret", f"{name}-redis")))]
        body = builders.redis_secret(name, ns, random_secrets.token_urlsafe(32))
        kopf.adopt(body, owner=td)
        try:
            live = self.kube.create(body)
        except ApiError as e:
            if e.status != 409:
                raise
            return [Problem("Conflict", str(Foreign("Secret", f"{name}-redis")))]  # unlabelled: not ours
        secrets[f"{name}-redis"] = live or body
        return []

    def _delete_owned(self, td: Obj, kind: str, name: str, secrets: Secrets) -> None:
        """Delete a child, unless it is someone else's (then it stays, unread and unwritten)."""
        ns = td["metadata"]["namespace"]
        live = secrets.get(name) if kind == "Secret" else self.kube.get(kind, ns, name)
        if live is not None and builders.owns(td, live):
            self.kube.delete(kind, ns, name)

    def _secrets(self, ns: str) -> Secrets:
        """The only Secrets the operator reads: those labelled tide.dev/secret=true (selected by the API server)."""
        return {s["metadata"]["name"]: s for s in self.kube.list("Secret", ns, {SECRET_LABEL: "true"})}

    @staticmethod
    def _secret_value(secrets: Secrets, ref: Any) -> str | None:
        if ref is None:
            return None
        secret = secrets[ref.name]  # checked by status.check_secret first
        if ref.key in (secret.get("stringData") or {}):
            return secret["stringData"][ref.key]
        return base64.b64decode(secret["data"][ref.key]).decode()

    def _redis_url(self, td: Obj, spec: TideDeploymentSpec, secrets: Secrets) -> str:
        name, ns = td["metadata"]["name"], td["metadata"]["namespace"]
        r = spec.redis
        return r.url or self._secret_value(secrets, r.url_secret_ref) or builders.managed_redis_url(name, ns)

    def _client(self, td: Obj, spec: TideDeploymentSpec, secrets: Secrets) -> redis_io.Client:
        url = self._redis_url(td, spec, secrets)
        password = self._secret_value(secrets, builders.redis_password_ref(td["metadata"]["name"], spec))
        key = (url, password, spec.redis.cluster)
        if key not in self._redis:
            self._redis[key] = redis_io.client_for(td["metadata"]["name"], url, password, spec.redis.cluster,
                                                   self.config.redis_timeout_s)
        return self._redis[key]

    def _write_status(self, td: Obj, new: TideDeploymentStatus) -> None:
        old = td.get("status") or {}
        patch = merge_patch(old, _dump(new))
        if patch:
            meta = td["metadata"]
            self.kube.patch("TideDeployment", meta["namespace"], meta["name"], {"status": patch}, status=True)

    def cleanup(self, namespace: str, name: str) -> None:
        """Delete children, DraftVersions and Redis keys. In a cluster, ownerReferences would garbage-collect
        the objects too; deleting them here frees the GPUs at once and works where GC is absent."""
        with self._locks[namespace, name]:
            td = self.kube.get("TideDeployment", namespace, name)
            if td is None:
                return
            secrets = self._secrets(namespace)
            spec, _ = status.parse(name, td.get("spec") or {})
            if spec is not None:  # the keys first: the managed Redis and its password go with the children
                try:
                    redis_io.forget(self._client(td, spec, secrets), namespace, name)
                except (*redis_io.Unavailable, KeyError) as e:
                    log.warning("left the Redis keys of %s/%s in place: %s", namespace, name, e)
            for kind, child in builders.possible_children(name):
                self._delete_owned(td, kind, child, secrets)
            for v in self._versions(td):
                self.kube.delete("DraftVersion", namespace, f"{name}-v{v}")
        if self.snapshots is not None:
            self.snapshots.forget(namespace, name)
        self._locks.pop((namespace, name), None)


def _old_status(td: Obj) -> TideDeploymentStatus:
    try:
        return TideDeploymentStatus.model_validate(td.get("status") or {})
    except ValidationError:
        return TideDeploymentStatus()  # written by someone else: rebuilt from DraftVersions on this pass


def _judged(versions: Versions) -> set[int]:
    """Versions whose stats a pass reads: stable, and during a canary the canary and its baseline's version."""
    route = rollout.routing(versions)
    if route.canary is None:
        return {route.stable}
    return {route.stable, route.canary, (versions[route.canary].baseline or Baseline()).version}


def _waiting(versions: Versions) -> int | None:
    waiting = [v for v, s in versions.items() if s.phase == Phase.CANDIDATE]
    return max(waiting) if waiting else None
