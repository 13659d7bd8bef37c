"""CustomResourceDefinitions generated from `tide_operator.models`.

Pydantic's JSON Schema is close to a Kubernetes structural schema but not equal: it uses `$ref`, `anyOf`
with `null` for optional fields, `additionalProperties: false` for `extra="forbid"`, and titles. `structural`
rewrites it into the form the API server accepts (every node typed, refs inlined, `nullable`,
`x-kubernetes-int-or-string`, `x-kubernetes-preserve-unknown-fields` for pass-through objects) and adds
`default: {}` to optional sub-objects so the server fills their nested defaults.
"""

from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from tide_operator.models import (
    GROUP,
    VERSION,
    DraftVersionSpec,
    DraftVersionStatus,
    TideDeploymentSpec,
    TideDeploymentStatus,
)

Schema = dict[str, Any]


@dataclass(frozen=True)
class Kind:
    kind: str
    plural: str
    short_names: tuple[str, ...]
    spec: type[BaseModel]
    status: type[BaseModel]
    columns: tuple[tuple[str, str, str], ...]  # (name, type, jsonPath)

    @property
    def singular(self) -> str:
        return self.kind.lower()

    @property
    def crd_name(self) -> str:
        return f"{self.plural}.{GROUP}"


_AGE = ("Age", "date", ".metadata.creationTimestamp")
TIDE_DEPLOYMENT = Kind(
    "TideDeployment", "tidedeployments", ("tided",), TideDeploymentSpec, TideDeploymentStatus,
    (("Ready", "string", '.status.conditions[?(@.type=="Ready")].status'),
     ("Draft", "integer", ".status.stable"),
     ("Candidate", "integer", ".status.candidate"),
     ("Acceptance", "number", ".status.acceptance"),
     ("Trainer", "string", ".status.training.state"),
     ("Trainer Reason", "string", ".status.training.reason"),
     _AGE))
DRAFT_VERSION = Kind(
    "DraftVersion", "draftversions", ("dv",), DraftVersionSpec, DraftVersionStatus,
    (("Deployment", "string", ".spec.deployment"),
     ("Version", "integer", ".spec.version"),
     ("Phase", "string", ".status.phase"),
     ("Acceptance", "number", ".status.acceptance"),
     _AGE))
KINDS = (TIDE_DEPLOYMENT, DRAFT_VERSION)


def structural(node: Schema, defs: dict[str, Schema]) -> Schema:
    """One pydantic JSON Schema node as a Kubernetes structural schema node."""
    if "$ref" in node:  # siblings of a $ref (description, default) override the target's
        target = defs[node["$ref"].rsplit("/", 1)[-1]]
        node = {**target, **{k: v for k, v in node.items() if k != "$ref"}}
    node = {k: v for k, v in node.items() if k != "title"}
    for bound, limit in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        if bound in node and not isinstance(node[bound], bool):  # OpenAPI 3.0 form: a flag on the limit
            node[limit], node[bound] = node.pop(bound), True
    if "anyOf" in node:
        return _union(node, defs)
    if node.get("type") == "object":
        node = _object(node, defs)
    if node.get("type") == "array":
        node["items"] = structural(node["items"], defs)
    return node


def _union(node: Schema, defs: dict[str, Schema]) -> Schema:
    """`X | None` as X with `nullable`, or int-or-string; no other union is expressible."""
    union = node.pop("anyOf")
    branches = [b for b in union if b.get("type") != "null"]
    if "default" in node and node["default"] is None:  # "unset" is absence, not a null default
        del node["default"]
    if node.get("x-kubernetes-int-or-string"):
        # The one anyOf the API server allows: integer or string; the pattern applies to strings only.
        pattern = next((b["pattern"] for b in branches if "pattern" in b), None)
        node["anyOf"] = [{"type": "integer"}, {"type": "string"}]
        return {**node, "pattern": pattern} if pattern else node
    if len(branches) != 1:
        raise ValueError(f"unsupported union in CRD schema: {branches}")
    merged = {**structural(branches[0], defs), **node}
    return merged | {"nullable": True} if len(branches) < len(union) else merged


def _object(node: Schema, defs: dict[str, Schema]) -> Schema:
    extra = node.pop("additionalProperties", None)
    if "properties" in node:
        required = set(node.get("required", ()))
        props = {}
        for name, sub in node["properties"].items():
            sub = structural(sub, defs)
            if name not in required and sub.get("type") == "object" and "properties" in sub \
                    and not sub.get("required") and "default" not in sub and not sub.get("nullable"):
                sub["default"] = {}  # so the API server applies the nested defaults
            props[name] = sub
        node["properties"] = props
    elif extra is True or extra is None:  # a free-form object (affinity): keep it as written
        node["x-kubernetes-preserve-unknown-fields"] = True
    elif isinstance(extra, dict):
        node["additionalProperties"] = structural(extra, defs)
    return node


def model_schema(model: type[BaseModel]) -> Schema:
    raw = model.model_json_schema(by_alias=True)
    return structural(raw, raw.pop("$defs", {}))


def open_api_schema(kind: Kind) -> Schema:
    return {
        "type": "object",
        "description": kind.spec.__doc__.strip() if kind.spec.__doc__ else "",
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": {"type": "object"},
            "spec": model_schema(kind.spec),
            "status": model_schema(kind.status),
        },
    }


def crd(kind: Kind) -> dict[str, Any]:
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": kind.crd_name, "labels": {"app.kubernetes.io/name": "tide"}},
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {"kind": kind.kind, "plural": kind.plural, "singular": kind.singular,
                      "shortNames": list(kind.short_names), "categories": ["tide"]},
            "versions": [{
                "name": VERSION, "served": True, "storage": True,
                "subresources": {"status": {}},
                "additionalPrinterColumns": [{"name": n, "type": t, "jsonPath": p} for n, t, p in kind.columns],
                "schema": {"openAPIV3Schema": open_api_schema(kind)},
            }],
        },
    }


def kopf_peering_crds() -> list[dict[str, Any]]:
    """kopf's own peering CRDs (kopf.dev/v1, as kopf's docs ship them): the operator's replicas agree through a
    ClusterKopfPeering (all namespaces) or a KopfPeering per namespace which one of them acts."""
    out = []
    for kind, scope in (("ClusterKopfPeering", "Cluster"), ("KopfPeering", "Namespaced")):
        plural = f"{kind.lower()}s"
        out.append({
            "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
            "metadata": {"name": f"{plural}.kopf.dev", "labels": {"app.kubernetes.io/name": "tide"}},
            "spec": {"scope": scope, "group": "kopf.dev",
                     "names": {"kind": kind, "plural": plural, "singular": kind.lower()},
                     "versions": [{"name": "v1", "served": True, "storage": True, "schema": {"openAPIV3Schema": {
                         "type": "object", "properties": {"status": {
                             "type": "object", "x-kubernetes-preserve-unknown-fields": True}}}}}]}})
    return out
