"""Fixtures running the real kopf operator against kmock (an emulated Kubernetes API) and a real redis-server.

Only the cluster is emulated. kmock 0.8 stores objects verbatim, so `ApiServer` adds what the operator and
kopf rely on from a real API server: uid, resourceVersion, generation (bumped on spec changes),
creationTimestamp, 422 on a failed JSON-patch `test`, the status subresource (status is ignored on
create and on the main endpoint, and only status is taken from `/status`), and validation of every stored
TideDeployment and DraftVersion against the generated CRDs (what a real server would refuse or prune fails
the test). Still missing, and handled in the tests: garbage collection through ownerReferences, label
selectors, defaulting from the schema, and controllers (the tests mark Deployments ready themselves).
"""

import asyncio
import datetime
import itertools
import json
import os
import socket
import threading
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import kmock as km
import kopf
import kubernetes
import pytest
import pytest_asyncio

# kopf fixes a timer's interval when the handler module is imported: make the rollout loop fast here.
os.environ.setdefault("TIDE_OPERATOR_INTERVAL_S", "0.3")
# The operator's metrics port, also read at import: a free one, so that test sessions side by side do not collide.
with socket.socket() as _s:
    _s.bind(("127.0.0.1", 0))
    os.environ.setdefault("TIDE_OPERATOR_METRICS_PORT", str(_s.getsockname()[1]))

from tide_operator.crds import KINDS
from tide_operator.kube import RESOURCES

from tests.operator.crdcheck import errors, load_crds

NAMESPACE = "default"
_RV = itertools.count(1000)
_STATUS_KINDS = {k.plural for k in KINDS} | {"deployments", "statefulsets"}
CRDS = load_crds()


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
        response = await super()._handle(request)
        self._check_schema(request)
        return response

    def _check_schema(self, request: km.Request) -> None:
        """A real server validates (and prunes) custom resources against the CRD: record what it would
        refuse or silently drop, so the operator fixture fails on it."""
        if request.resource is None or request.resource.group != "tide.dev" \
                or request.action not in (km.action.CREATE, km.action.UPDATE):
            return
        name = request.name or (request.data or {}).get("metadata", {}).get("name")
        key = (request.resource, request.namespace, name)
        if key in self.objects and not self.objects[key].deleted:
            obj = json.loads(json.dumps(dict(self.objects[key].raw)))
            kind = obj.get("kind") or next(k.kind for k in KINDS if k.plural == request.resource.plural)
            self.schema_errors += [f"{kind} {name}: {e}" for e in errors(CRDS[kind], {**obj, "kind": kind})]

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


def register_resources(kmock: km.KubernetesEmulator) -> None:
    kmock.resources.load_bundled()  # core, apps, events...: without them kopf's discovery waits forever
    for kind in KINDS:
        kmock.resources[f"tide.dev/v1alpha1/{kind.plural}"] = km.ResourceInfo(
            kind=kind.kind, singular=kind.singular, namespaced=True, shortnames=set(kind.short_names),
            subresources={"status"}, verbs={"get", "list", "watch", "create", "patch", "update", "delete"})
    for kind in ("PodMonitor", "ServiceMonitor"):  # the Prometheus Operator's CRDs, installed
        res = RESOURCES[kind]
        kmock.resources[f"{res.api_version}/{res.plural}"] = km.ResourceInfo(
            kind=kind, singular=kind.lower(), namespaced=True,
            verbs={"get", "list", "watch", "create", "patch", "update", "delete"})


def write_kubeconfig(url: str, path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = {"apiVersion": "v1", "kind": "Config", "current-context": "kmock",
           "clusters": [{"name": "kmock", "cluster": {"server": url}}],
           "users": [{"name": "u", "user": {"token": "test"}}],
           "contexts": [{"name": "kmock", "context": {"cluster": "kmock", "user": "u", "namespace": NAMESPACE}}]}
    path.write_text(json.dumps(cfg))
    monkeypatch.setenv("KUBECONFIG", str(path))
    # The kubernetes package reads $KUBECONFIG at import; kopf's login and the operator use this default.
    monkeypatch.setattr(kubernetes.config.kube_config, "KUBE_CONFIG_DEFAULT_LOCATION", str(path))


class Operator:
    """The real operator (tide_operator.handlers) in its own thread and event loop: kopf cancels every task
    of its loop on exit, which must not include kmock's or pytest-asyncio's."""

    def __init__(self, kmock: km.KubernetesEmulator) -> None:
        self.kmock = kmock
        self.thread: threading.Thread | None = None
        self.stop_flag = threading.Event()
        self.errors: list[BaseException] = []

    async def start(self) -> None:
        import tide_operator.handlers  # noqa: F401  registers the handlers in kopf's default registry

        self.stop_flag, ready = threading.Event(), threading.Event()
        watches = len(self.kmock[km.action.WATCH, km.resource("tide.dev/v1alpha1/tidedeployments")])
        self.thread = threading.Thread(target=self._run, args=(ready,), daemon=True)
        self.thread.start()
        assert await asyncio.to_thread(ready.wait, 20), "kopf did not start"
        # Objects created before the watch opens may be missed by kmock's bus: wait for the new watch.
        await wait_for(lambda: len(self.kmock[km.action.WATCH,
                                              km.resource("tide.dev/v1alpha1/tidedeployments")]) > watches)
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
            assert not self.thread.is_alive(), "kopf did not stop"
        assert not self.errors, self.errors


@pytest_asyncio.fixture(name="operator")
async def operator_fixture(kmock: km.KubernetesEmulator, tmp_path: Path,
                   monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Operator]:
    register_resources(kmock)
    write_kubeconfig(str(kmock.url).rstrip("/"), tmp_path / "kubeconfig", monkeypatch)
    kmock.schema_errors = []
    op = Operator(kmock)
    await op.start()
    yield op
    await op.stop()
    assert not kmock.schema_errors, kmock.schema_errors[:5]


async def wait_for(predicate: Callable[[], Any], timeout: float = 20.0, what: str = "") -> Any:
    """Poll for an outcome instead of sleeping a fixed time."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}")
        await asyncio.sleep(0.05)


class Cluster:
    """Reads objects straight from kmock's store; writes through its HTTP API as kubectl would."""

    def __init__(self, kmock: km.KubernetesEmulator) -> None:
        self.kmock = kmock

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
        assert resp.status in (200, 201), await resp.text()

    async def patch(self, kind: str, name: str, patch: dict[str, Any]) -> None:
        resp = await self.kmock.patch(RESOURCES[kind].path(NAMESPACE, name), json=patch,
                                      headers={"Content-Type": "application/merge-patch+json"})
        assert resp.status == 200, await resp.text()

    async def delete(self, kind: str, name: str) -> None:
        resp = await self.kmock.delete(RESOURCES[kind].path(NAMESPACE, name))
        assert resp.status == 200, await resp.text()

    def mark_ready(self, *names: str) -> None:
        """Play the Deployment controller: every replica of these Deployments is ready."""
        for name in names:
            obj = self.kmock.objects[self._key("Deployment", name)]
            obj.patch({"status": {"readyReplicas": obj["spec"]["replicas"]}})

    def condition(self, name: str, kind: str) -> dict[str, Any]:
        conds = ((self.get("TideDeployment", name) or {}).get("status") or {}).get("conditions") or []
        return next((c for c in conds if c["type"] == kind), {})


@pytest.fixture(name="cluster")
def cluster_fixture(kmock: km.KubernetesEmulator) -> Cluster:
    return Cluster(kmock)
