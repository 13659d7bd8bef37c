"""A stand-in cluster for running the real operator (tide_operator.handlers) on the CPU: kmock (an emulated
Kubernetes API) and inference pods that play the rollout protocol through Redis. Used by the operator's tests
(tests/operator/harness.py wraps it in pytest fixtures) and by `tide bench faults` (the operator-restarted drill).
Never imported by the operator itself: kmock is a development dependency (the `[dev]` extra), not in its image.

kmock 0.8 stores objects verbatim, so `ApiServer` adds what the operator and kopf rely on from a real API server:
uid, resourceVersion, generation (bumped on spec changes), creationTimestamp, 422 on a failed JSON-patch `test`,
and the status subresource (status is ignored on create and on the main endpoint, and only status is taken from
`/status`). Still missing, and played by the callers: garbage collection through ownerReferences, label
selectors, defaulting from the schema, and controllers (`Cluster.mark_ready` plays the Deployment controller).
"""

import asyncio
import contextlib
import datetime
import itertools
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import kmock as km
import kopf
import kubernetes
import redis

from tide_operator.crds import KINDS
from tide_operator.kube import RESOURCES
from tide_sglang.rollout import ControlState, Heartbeat, read_control, write_heartbeat

NAMESPACE = "default"
_RV = itertools.count(1000)
_STATUS_KINDS = {k.plural for k in KINDS} | {"deployments", "statefulsets"}
_VERBS = {"get", "list", "watch", "create", "patch", "update", "delete"}


def _stamp_create(data: dict[str, Any], has_status: bool) -> None:
    md = data.setdefault("metadata", {})
    md.setdefault("uid", str(uuid.uuid4()))
    md.setdefault("creationTimestamp", datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"))
    md["resourceVersion"] = str(next(_RV))
    md["generation"] = 1
    if has_status:
        data.pop("status", None)


class ApiServer(km.KubernetesEmulator):
    """kmock's emulator plus the API-server bookkeeping listed in the module docstring."""

    # (plural, name) whose updates are refused with 422, as a real server refuses an immutable field.
    refusals: frozenset[tuple[str, str]] = frozenset()

    async def _handle(self, request: km.Request) -> Any:
        data = request.data
        if request.action == km.action.UPDATE and request.resource is not None \
                and (request.resource.plural, request.name) in self.refusals:
            raise km.KubernetesError(status=422, reason="Invalid", message="spec.selector: field is immutable")
        if request.resource is not None and isinstance(data, dict | list):
            has_status = request.resource.plural in _STATUS_KINDS
            if request.action == km.action.CREATE and isinstance(data, dict):
                _stamp_create(data, has_status)
            elif request.action == km.action.UPDATE and request.name is not None:
                self._stamp_update(request, data, has_status)
        return await super()._handle(request)

    def _stamp_update(self, request: km.Request, data: Any, has_status: bool) -> None:
        key = (request.resource, request.namespace, request.name)
        # kmock's ObjectsArray has no .get(): look the key up explicitly.
        current = self.objects[key] if key in self.objects else None  # noqa: SIM401
        cur_md = (current.get("metadata") or {}) if current is not None else {}
        rv = str(next(_RV))
        if isinstance(data, list):  # RFC 6902 JSON patch, as kopf writes finalizers
            for op in data:
                if op.get("op") == "test" and op.get("path") == "/metadata/resourceVersion" \
                        and op.get("value") != cur_md.get("resourceVersion"):
                    raise km.KubernetesError(status=422, reason="Invalid", message="resourceVersion test failed")
            data.append({"op": "add", "path": "/metadata/resourceVersion", "value": rv})
            return
        if has_status and request.subresource == "status":
            for key_ in [k for k in data if k != "status"]:
                del data[key_]
        elif has_status:
            data.pop("status", None)
        md = data.get("metadata") or {}
        data["metadata"] = md
        md["resourceVersion"] = rv
        if "spec" in data and current is not None and data["spec"] != {}:
            md["generation"] = int(cur_md.get("generation", 1)) + 1


def register_resources(api: km.KubernetesEmulator) -> None:
    api.resources.load_bundled()  # core, apps, events...: without them kopf's discovery waits forever
    for kind in KINDS:
        api.resources[f"tide.dev/v1alpha1/{kind.plural}"] = km.ResourceInfo(
            kind=kind.kind, singular=kind.singular, namespaced=True, shortnames=set(kind.short_names),
            subresources={"status"}, verbs=_VERBS)
    for kind in ("PodMonitor", "ServiceMonitor"):  # the Prometheus Operator's CRDs, installed
        res = RESOURCES[kind]
        api.resources[f"{res.api_version}/{res.plural}"] = km.ResourceInfo(
            kind=kind, singular=kind.lower(), namespaced=True, verbs=_VERBS)


@contextlib.contextmanager
def kubeconfig(url: str, path: Path) -> Iterator[None]:
    """Point this process (and what it starts) at the emulated API through a kubeconfig at `path`; restored on
    exit. The kubernetes package reads $KUBECONFIG at import, so its default location is set as well: kopf's
    login and the operator's use it."""
    cfg = {"apiVersion": "v1", "kind": "Config", "current-context": "kmock",
           "clusters": [{"name": "kmock", "cluster": {"server": url}}],
           "users": [{"name": "u", "user": {"token": "test"}}],
           "contexts": [{"name": "kmock", "context": {"cluster": "kmock", "user": "u", "namespace": NAMESPACE}}]}
    path.write_text(json.dumps(cfg))
    module = kubernetes.config.kube_config
    before_env, before_default = os.environ.get("KUBECONFIG"), module.KUBE_CONFIG_DEFAULT_LOCATION
    os.environ["KUBECONFIG"], module.KUBE_CONFIG_DEFAULT_LOCATION = str(path), str(path)
    try:
        yield
    finally:
        module.KUBE_CONFIG_DEFAULT_LOCATION = before_default
        if before_env is None:
            os.environ.pop("KUBECONFIG", None)
        else:
            os.environ["KUBECONFIG"] = before_env


class Operator:
    """The real operator (tide_operator.handlers) in its own thread and event loop: kopf cancels every task
    of its loop on exit, which must not include kmock's or the caller's. `start` and `stop` may alternate any
    number of times (a restart); what escaped kopf is in `errors`."""

    def __init__(self, api: km.KubernetesEmulator, interval_s: float = 0.3) -> None:
        self.api = api
        self.interval_s = interval_s
        self.thread: threading.Thread | None = None
        self.stop_flag = threading.Event()
        self.errors: list[BaseException] = []

    async def start(self) -> None:
        # kopf fixes a timer's interval when the handler module is imported: make the rollout loop fast.
        os.environ.setdefault("TIDE_OPERATOR_INTERVAL_S", str(self.interval_s))
        # The operator's metrics port, also read at import: a free one, so that runs side by side do not collide.
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ.setdefault("TIDE_OPERATOR_METRICS_PORT", str(s.getsockname()[1]))
        import tide_operator.handlers  # noqa: F401  registers the handlers in kopf's default registry

        self.stop_flag, ready = threading.Event(), threading.Event()
        watched = km.resource("tide.dev/v1alpha1/tidedeployments")
        watches = len(self.api[km.action.WATCH, watched])
        self.thread = threading.Thread(target=self._run, args=(ready,), daemon=True)
        self.thread.start()
        if not await asyncio.to_thread(ready.wait, 20):
            raise TimeoutError("kopf did not start")
        # Objects created before the watch opens may be missed by kmock's bus: wait for the new watch.
        await wait_for(lambda: len(self.api[km.action.WATCH, watched]) > watches, what="kopf's watch")
        await asyncio.sleep(0.2)

    def _run(self, ready: threading.Event) -> None:
        try:
            asyncio.run(kopf.operator(standalone=True, namespaces=[NAMESPACE], stop_flag=self.stop_flag,
                                      ready_flag=ready))
        except BaseException as e:
            self.errors.append(e)

    async def stop(self) -> None:
        self.stop_flag.set()
        if self.thread is not None:
            await asyncio.to_thread(self.thread.join, 20)  # off the loop: kmock keeps serving meanwhile
            if self.thread.is_alive():
                raise TimeoutError("kopf did not stop")


@contextlib.asynccontextmanager
async def running_operator(api: km.KubernetesEmulator, workdir: Path) -> AsyncIterator[Operator]:
    """The operator started against `api` (its resources registered, a kubeconfig in `workdir`), stopped on exit."""
    register_resources(api)
    with kubeconfig(str(api.url).rstrip("/"), workdir / "kubeconfig"):
        op = Operator(api)
        await op.start()
        try:
            yield op
        finally:
            await op.stop()


async def wait_for(predicate: Callable[[], Any], timeout: float = 20.0, what: str = "") -> Any:
    """Poll for an outcome instead of sleeping a fixed time."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if loop.time() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what or predicate}")
        await asyncio.sleep(0.05)


class Cluster:
    """Reads objects straight from kmock's store; writes through its HTTP API as kubectl would."""

    def __init__(self, api: km.KubernetesEmulator) -> None:
        self.kmock = api

    def _key(self, kind: str, name: str) -> tuple[Any, str, str]:
        res = RESOURCES[kind]
        return km.resource(f"{res.api_version}/{res.plural}"), NAMESPACE, name

    def get(self, kind: str, name: str) -> dict[str, Any] | None:
        key = self._key(kind, name)
        if key not in self.kmock.objects or self.kmock.objects[key].deleted:
            return None
        return json.loads(json.dumps(dict(self.kmock.objects[key].raw)))

    async def create(self, obj: dict[str, Any]) -> None:
        resp = await self.kmock.post(RESOURCES[obj["kind"]].path(NAMESPACE), json=obj)
        if resp.status not in (200, 201):
            raise RuntimeError(await resp.text())

    async def patch(self, kind: str, name: str, patch: dict[str, Any]) -> None:
        resp = await self.kmock.patch(RESOURCES[kind].path(NAMESPACE, name), json=patch,
                                      headers={"Content-Type": "application/merge-patch+json"})
        if resp.status != 200:
            raise RuntimeError(await resp.text())

    async def delete(self, kind: str, name: str) -> None:
        resp = await self.kmock.delete(RESOURCES[kind].path(NAMESPACE, name))
        if resp.status != 200:
            raise RuntimeError(await resp.text())

    def mark_ready(self, *names: str) -> None:
        """Play the Deployment controller: every replica of these Deployments is ready."""
        for name in names:
            obj = self.kmock.objects[self._key("Deployment", name)]
            obj.patch({"status": {"readyReplicas": obj["spec"]["replicas"]}})

    def condition(self, name: str, kind: str) -> dict[str, Any]:
        conds = ((self.get("TideDeployment", name) or {}).get("status") or {}).get("conditions") or []
        return next((c for c in conds if c["type"] == kind), {})

    def phase(self, deployment: str, version: int) -> str | None:
        """The phase of a DraftVersion the operator made for `deployment`'s version."""
        return ((self.get("DraftVersion", f"{deployment}-v{version}") or {}).get("status") or {}).get("phase")


class Engines:
    """Plays the inference pods: each loads the version the control state gives it and heartbeats it, as the
    engines do (through tide_sglang.rollout); a pod in `stuck` keeps serving what it has (a swap that never
    happens)."""

    def __init__(self, client: redis.Redis, namespace: str, deployment: str, pods: tuple[str, ...]) -> None:
        self.client, self.namespace, self.deployment, self.pods = client, namespace, deployment, pods
        self.loaded = dict.fromkeys(pods, 0)
        self.stuck: set[str] = set()
        self.trigger: dict[str, float | bool | str] = {}  # what every pod's training trigger reports

    def tick(self) -> ControlState | None:
        ctl = read_control(self.client, self.namespace, self.deployment)
        for pod in self.pods:
            if ctl is not None and pod not in self.stuck:
                self.loaded[pod] = ctl.version_for(pod)
            role = ctl.role_of(pod) if ctl is not None else "stable"
            write_heartbeat(self.client, self.namespace, self.deployment,
                            Heartbeat(pod=pod, role=role, version=self.loaded[pod], trigger=self.trigger,
                                      time=time.time()))
        return ctl

    async def run(self) -> None:
        while True:
            self.tick()
            await asyncio.sleep(0.1)

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator["Engines"]:
        task = asyncio.create_task(self.run())
        try:
            yield self
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
