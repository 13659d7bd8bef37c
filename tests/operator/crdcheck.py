"""Offline checks of custom resources against the generated CRDs (the API server is not available).

`validator` turns a CRD's openAPIV3Schema into a JSON Schema that also does what the API server adds on
top: `nullable` fields accept null, and unknown fields are errors (kubectl's strict field validation).
`structural_errors` checks the rules of a structural schema that the API server enforces on the CRD itself.
"""

import copy
from pathlib import Path
from typing import Any

import jsonschema
import yaml

ROOT = Path(__file__).resolve().parents[2]
CRD_DIR = ROOT / "charts/tide/crds"


def load_crds() -> dict[str, dict[str, Any]]:
    """kind -> CRD, read from the generated YAML files (what the chart installs)."""
    out = {}
    for path in sorted(CRD_DIR.glob("*.yaml")):
        crd = yaml.safe_load(path.read_text())
        out[crd["spec"]["names"]["kind"]] = crd
    return out


def json_schema(node: Any) -> Any:
    """A CRD schema node as JSON Schema draft 7, with the API server's strictness (see module docstring)."""
    if not isinstance(node, dict):
        return node
    node = {k: json_schema(v) if k not in ("properties", "default", "enum") else v for k, v in node.items()}
    if "properties" in node:
        node["properties"] = {k: json_schema(v) for k, v in node["properties"].items()}
        if not node.get("x-kubernetes-preserve-unknown-fields"):
            node["additionalProperties"] = False
    for bound, limit in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        if node.get(bound) is True:  # OpenAPI 3.0's flag form, as JSON Schema draft 7 writes it
            node[bound] = node.pop(limit)
    if node.pop("nullable", False) and "type" in node:
        node["type"] = [node["type"], "null"]
    return node


def validator(crd: dict[str, Any]) -> jsonschema.Draft7Validator:
    schema = copy.deepcopy(crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"])
    schema = json_schema(schema)
    # apiVersion, kind and metadata are every object's, whatever the schema says; the API server checks them itself
    schema["properties"] |= {"apiVersion": {"type": "string"}, "kind": {"type": "string"},
                             "metadata": {"type": "object"}}
    return jsonschema.Draft7Validator(schema)


def errors(crd: dict[str, Any], obj: dict[str, Any]) -> list[str]:
    return [f"{'.'.join(map(str, e.path))}: {e.message}" for e in validator(crd).iter_errors(obj)]


def structural_errors(node: Any, path: str = "$") -> list[str]:
    """Every node typed (or int-or-string / preserve-unknown-fields), no $ref, no properties together with
    additionalProperties, a default only where the node is typed, anyOf only for int-or-string."""
    if not isinstance(node, dict):
        return []
    out = []
    special = node.get("x-kubernetes-int-or-string") or node.get("x-kubernetes-preserve-unknown-fields")
    if "type" not in node and not special:
        out.append(f"{path}: missing type")
    if "$ref" in node or "title" in node:
        out.append(f"{path}: $ref/title are not allowed")
    if "properties" in node and "additionalProperties" in node:
        out.append(f"{path}: properties and additionalProperties are mutually exclusive")
    if "anyOf" in node and not node.get("x-kubernetes-int-or-string"):
        out.append(f"{path}: anyOf is only allowed for int-or-string")
    for key, sub in (node.get("properties") or {}).items():
        out += structural_errors(sub, f"{path}.{key}")
    for key in ("items", "additionalProperties"):
        if isinstance(node.get(key), dict):
            out += structural_errors(node[key], f"{path}.{key}")
    return out
