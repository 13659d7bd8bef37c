"""The Kubernetes adapter: raw JSON over the official client's authenticated connection.

The typed `kubernetes` API classes validate bodies against their own models and would drop fields of
custom resources; the operator works on plain dicts (as the builders make them), so it calls the REST
paths directly. `RESOURCES` lists every kind the operator touches and the verbs it uses on each: the RBAC
rules (`tide_operator.rbac`) are generated from it, so the two cannot drift apart.
"""

import json
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import kubernetes

from tide_operator.models import API_VERSION

Obj = dict[str, Any]
LAST_APPLIED = "tide.dev/last-applied"


@dataclass(frozen=True)
class Resource:
    api_version: str
    plural: str
    verbs: tuple[str, ...]
    status_verbs: tuple[str, ...] = ()

    @property
    def group(self) -> str:
        return self.api_version.rpartition("/")[0]

    def path(self, namespace: str, name: str | None = None, status: bool = False) -> str:
        root = f"/apis/{self.api_version}" if self.group else f"/api/{self.api_version}"
        out = f"{root}/namespaces/{quote(namespace)}/{self.plural}"
        return out + (f"/{quote(name)}" if name else "") + ("/status" if status else "")


_CHILD = ("get", "create", "patch", "delete")
RESOURCES: dict[str, Resource] = {
    # kopf lists, watches and patches (finalizer, progress annotations) TideDeployments itself.
    "TideDeployment": Resource(API_VERSION, "tidedeployments", ("get", "list", "watch", "patch"), ("patch",)),
    "DraftVersion": Resource(API_VERSION, "draftversions", ("list", "create", "delete"), ("patch",)),
    "Deployment": Resource("apps/v1", "deployments", _CHILD),
    "StatefulSet": Resource("apps/v1", "statefulsets", _CHILD),
    "Service": Resource("v1", "services", _CHILD),
    "PersistentVolumeClaim": Resource("v1", "persistentvolumeclaims", _CHILD),  # the trainer's checkpoint volume
    "NetworkPolicy": Resource("networking.k8s.io/v1", "networkpolicies", _CHILD),
    "PodMonitor": Resource("monitoring.coreos.com/v1", "podmonitors", _CHILD),
    "ServiceMonitor": Resource("monitoring.coreos.com/v1", "servicemonitors", _CHILD),
    # Secrets are read only through a label selector (tide.dev/secret=true), so the API server never hands the
    # operator one that nobody labelled for TIDE; create and delete: the managed Redis's own password Secret.
    "Secret": Resource("v1", "secrets", ("list", "create", "delete")),
    "Pod": Resource("v1", "pods", ("list",)),  # read only: why a child's pods are not ready (an init container)
    "Event": Resource("v1", "events", ("create",)),  # kopf posts handler outcomes as Events
    # kopf's peering (two operator replicas, one active): namespaced with -n, the cluster-wide kind with -A. Only
    # kopf requests these; the paths are not used here (ClusterKopfPeering is not namespaced).
    "KopfPeering": Resource("kopf.dev/v1", "kopfpeerings", ("get", "list", "watch", "patch")),
    "ClusterKopfPeering": Resource("kopf.dev/v1", "clusterkopfpeerings", ("get", "list", "watch", "patch")),
}


class ApiError(RuntimeError):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status


def merge_patch(old: Any, new: Any) -> Any:
    """RFC 7386 merge patch turning `old` into `new`: keys that disappeared become null."""
    if not isinstance(old, dict) or not isinstance(new, dict):
        return new
    out = {k: None for k in old if k not in new}
    for k, v in new.items():
        if k not in old:
            out[k] = v
        elif old[k] != v:
            out[k] = merge_patch(old[k], v)
    return out


class Kube:
    """Get/create/patch/delete/list on plain dicts; 404 is a value (None/False), other errors raise."""

    def __init__(self, client: kubernetes.client.ApiClient | None = None) -> None:
        self.client = client or kubernetes.client.ApiClient()
        self.client.user_agent = "tide-operator"

    def _call(self, method: str, path: str, body: Any = None, content_type: str = "application/json",
              query: dict[str, str] | None = None) -> Obj | None:
        headers = {"Accept": "application/json", "Content-Type": content_type}
        request = self.client.param_serialize(method, path, query_params=query or None, header_params=headers,
                                              body=body, auth_settings=["BearerToken"])
        try:
            response = self.client.call_api(*request, _request_timeout=30)
        except kubernetes.client.ApiException as e:  # raised by the REST layer for non-2xx answers
            if e.status == 404:
                return None
            raise ApiError(e.status or 0, str(e.body or e.reason)) from None
        response.read()
        if response.status == 404:
            return None
        if response.status >= 400:
            raise ApiError(response.status, response.data.decode(errors="replace")[:2000])
        return json.loads(response.data) if response.data else {}

    def get(self, kind: str, namespace: str, name: str) -> Obj | None:
        return self._call("GET", RESOURCES[kind].path(namespace, name))

    def create(self, obj: Obj) -> Obj:
        res = RESOURCES[obj["kind"]]
        out = self._call("POST", res.path(obj["metadata"]["namespace"]), obj)
        if out is None:
            raise ApiError(404, f"{obj['kind']} is not served by this cluster (is its CRD installed?)")
        return out

    def patch(self, kind: str, namespace: str, name: str, patch: Obj, status: bool = False) -> Obj | None:
        path = RESOURCES[kind].path(namespace, name, status=status)
        return self._call("PATCH", path, patch, content_type="application/merge-patch+json")

    def delete(self, kind: str, namespace: str, name: str) -> bool:
        return self._call("DELETE", RESOURCES[kind].path(namespace, name)) is not None

    def list(self, kind: str, namespace: str, labels: dict[str, str]) -> list[Obj]:
        """Objects carrying `labels`; filtered here too, for API servers that ignore the selector."""
        selector = ",".join(f"{k}={v}" for k, v in labels.items())
        out = self._call("GET", RESOURCES[kind].path(namespace), query={"labelSelector": selector}) or {}
        items = out.get("items") or []
        return [o for o in items if labels.items() <= (o["metadata"].get("labels") or {}).items()]

    def apply(self, desired: Obj, live: Obj | None) -> Obj:
        """Create (`live` None) or three-way patch a child (like `kubectl apply`): fields this operator set before
        and no longer wants are removed; fields others set are kept. Returns the object as the server has it."""
        meta = desired["metadata"]
        text = json.dumps(desired, sort_keys=True)
        if live is None:
            annotations = {**meta.get("annotations", {}), LAST_APPLIED: text}
            return self.create({**desired, "metadata": {**meta, "annotations": annotations}})
        last_text = (live["metadata"].get("annotations") or {}).get(LAST_APPLIED, "{}")
        if last_text == text:
            return live
        patch = merge_patch(json.loads(last_text), desired)
        patch.setdefault("metadata", {}).setdefault("annotations", {})[LAST_APPLIED] = text
        return self.patch(desired["kind"], meta["namespace"], meta["name"], patch) or live
