"""The generated CRDs: up to date with the models, structural, and accepting exactly the valid objects.

No cluster: instances are validated with jsonschema over each CRD's openAPIV3Schema (tests/operator/crdcheck.py).
"""

import copy
from pathlib import Path

import jsonschema
import pytest
import yaml
from tide_operator import generate
from tide_operator.crds import DRAFT_VERSION, TIDE_DEPLOYMENT, crd
from tide_operator.models import DraftVersionSpec, DraftVersionStatus, TideDeploymentSpec

from tests.operator.crdcheck import ROOT, errors, json_schema, load_crds, structural_errors

EXAMPLES = sorted((ROOT / "docs/examples").glob("*.yaml"))


def test_generated_files_are_up_to_date() -> None:
    for rel, text in generate.render().items():
        path = ROOT / rel
        assert path.exists() and path.read_text() == text, f"{rel} is stale: run `python -m tide_operator.generate`"


def test_check_mode_reports_stale_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(generate, "ROOT", tmp_path)
    assert generate.main(["--check"]) == 1
    assert generate.main([]) == 0
    assert generate.main(["--check"]) == 0


@pytest.mark.parametrize("kind", ["TideDeployment", "DraftVersion"])
def test_crd_is_structural(kind: str) -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    kubernetes_validate.validate(load_crds()[kind], "1.30", strict=True)  # a valid apiextensions/v1 object
    version = load_crds()[kind]["spec"]["versions"][0]
    assert structural_errors(version["schema"]["openAPIV3Schema"]) == []
    assert version["subresources"] == {"status": {}}


def _defaults(node: object, path: str = "$") -> list[tuple[str, dict, object]]:
    if not isinstance(node, dict):
        return []
    out = [(path, node, node["default"])] if "default" in node else []
    for key, sub in (node.get("properties") or {}).items():
        out += _defaults(sub, f"{path}.{key}")
    if isinstance(node.get("items"), dict):
        out += _defaults(node["items"], f"{path}[]")
    return out


def test_every_default_validates_against_its_own_schema() -> None:
    schema = crd(TIDE_DEPLOYMENT)["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    found = _defaults(schema)
    assert len(found) > 20
    for path, node, default in found:
        sub = json_schema({k: v for k, v in node.items() if k != "default"})
        assert not list(jsonschema.Draft7Validator(sub).iter_errors(default)), path


def test_names_columns_and_short_names() -> None:
    crds = load_crds()
    td, dv = crds["TideDeployment"]["spec"], crds["DraftVersion"]["spec"]
    assert td["group"] == dv["group"] == "tide.dev"
    assert td["names"]["shortNames"] == ["tided"] and dv["names"]["shortNames"] == ["dv"]
    columns = [c["name"] for c in td["versions"][0]["additionalPrinterColumns"]]
    assert columns == ["Ready", "Draft", "Candidate", "Acceptance", "Trainer", "Trainer Reason", "Age"]
    schema = td["versions"][0]["schema"]["openAPIV3Schema"]
    for column in td["versions"][0]["additionalPrinterColumns"]:  # a dotted status path exists in the schema
        if column["jsonPath"].startswith(".status.") and "[" not in column["jsonPath"]:
            node = schema
            for key in column["jsonPath"].split(".")[1:]:
                node = node["properties"][key]
            assert node["type"] == column["type"], column
    assert td["versions"][0]["name"] == "v1alpha1"


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_examples_validate_against_generated_crds(path: Path) -> None:
    crds = load_crds()
    for doc in yaml.safe_load_all(path.read_text()):
        assert errors(crds[doc["kind"]], doc) == []
        model = TideDeploymentSpec if doc["kind"] == "TideDeployment" else DraftVersionSpec
        model.model_validate(doc["spec"])  # what the schema accepts, the operator can parse
        if doc["kind"] == "DraftVersion":
            DraftVersionStatus.model_validate(doc["status"])


def _minimal() -> dict:
    return yaml.safe_load((ROOT / "docs/examples/tidedeployment-minimal.yaml").read_text())


def _set(obj: dict, dotted: str, value: object) -> dict:
    obj = copy.deepcopy(obj)
    *parents, last = dotted.split(".")
    node = obj
    for key in parents:
        node = node.setdefault(key, {})
    if value is _DELETE:
        del node[last]
    else:
        node[last] = value
    return obj


_DELETE = object()


@pytest.mark.parametrize(("field", "value", "complaint"), [
    ("spec.draft.policy", "sometimes", "is not one of"),
    ("spec.inference.replicas", 0, "less than the minimum"),
    ("spec.rollout.minImprovement", 1.5, "greater than the maximum"),
    ("spec.rollout.canaryPercent", 90, "greater than the maximum"),
    ("spec.redis.url", "http://redis:6379", "does not match"),
    ("spec.inference.resources", {"limits": {"memory": "lots"}}, "does not match"),
    ("spec.inference.tolerations", [{"key": "k", "effect": "Sometimes"}], "is not one of"),
    ("spec.monitoring.interval", "30 seconds", "does not match"),
    ("spec.inference.imagePullPolicy", "Always", "Additional properties"),
    ("spec.model", _DELETE, "'model' is a required property"),
    ("spec.draft.version", -1, "less than the minimum"),
    ("spec.training.trigger", {"shortAlpha": 0}, "less than or equal to the minimum"),  # exclusive bound
])
def test_schema_rejects_malformed_objects(field: str, value: object, complaint: str) -> None:
    found = errors(load_crds()["TideDeployment"], _set(_minimal(), field, value))
    assert any(complaint in e for e in found), found


def test_schema_accepts_quantities_as_numbers_and_strings_and_null_pin() -> None:
    obj = _set(_minimal(), "spec.inference.resources", {"requests": {"cpu": 4, "memory": "16Gi"},
                                                        "limits": {"cpu": "500m"}})
    obj = _set(obj, "spec.draft.version", None)
    assert errors(load_crds()["TideDeployment"], obj) == []


def test_draftversion_phase_enum() -> None:
    dv = yaml.safe_load((ROOT / "docs/examples/draftversion.yaml").read_text())
    dv["status"]["phase"] = "Deployed"
    assert any("is not one of" in e for e in errors(crd(DRAFT_VERSION), dv))
