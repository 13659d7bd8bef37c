"""The cluster admin's documentation says what the chart, the CRDs and the dashboards really do.

docs/quickstart.md: every step says what the user should see, and what it says is checked here against the
real `helm` output, the CRDs' printer columns, the objects the chart renders and the dashboards' titles; its
manifests validate. docs/metrics.md documents every series the dashboards read and every metric the code
creates. docs/security.md lists every RBAC rule the chart grants.
"""

import json
import re

import pytest
import yaml
from prometheus_client import CollectorRegistry
from tide_operator.metrics import families
from tide_operator.status import parse

from tests.chart_tools import CHART, ROOT, by_kind, helm, render
from tests.operator.crdcheck import errors, load_crds
from tide_sglang.control.metrics import ControlMetrics
from tide_sglang.plugin.metrics import PluginMetrics

DOCS = ROOT / "docs"
QUICKSTART = (DOCS / "quickstart.md").read_text()
# Panel titles the quickstart names in *italics*.
QUICKSTART_PANELS = set(re.findall(r"\*([A-Z][^*]+?)\*(?!\*)", QUICKSTART)) - {"No data"}
MY_DOCS = ("quickstart.md", "metrics.md", "operations.md", "security.md")


def steps() -> dict[str, str]:
    """'## N. title' -> body."""
    parts = re.split(r"^## (\d+\. .+)$", QUICKSTART, flags=re.M)
    return dict(zip(parts[1::2], parts[2::2], strict=True))


def code_blocks(lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```", QUICKSTART, flags=re.M | re.S)


def test_every_quickstart_step_says_what_to_see() -> None:
    found = steps()
    assert [t.split(".")[0] for t in found] == [str(i) for i in range(len(found))]
    assert len(found) >= 6
    for title, body in found.items():
        if title.startswith("0."):
            continue
        assert "**You should see**" in body, f"step {title!r} does not say what the user should see"
        assert "```console" in body, f"step {title!r} has no command"


def test_quickstart_manifests_validate() -> None:
    import kubernetes_validate

    docs = [yaml.safe_load(b) for b in code_blocks("yaml")]
    kinds = {d["kind"]: d for d in docs}
    assert set(kinds) == {"PersistentVolumeClaim", "TideDeployment"}
    kubernetes_validate.validate(kinds["PersistentVolumeClaim"], "1.35", strict=True)
    td = kinds["TideDeployment"]
    assert errors(load_crds()["TideDeployment"], td) == []
    spec, problems = parse(td["metadata"]["name"], td["spec"])
    assert spec is not None and problems == []
    assert td["spec"]["registry"]["claimName"] == kinds["PersistentVolumeClaim"]["metadata"]["name"]


def test_quickstart_install_output_is_what_helm_prints() -> None:
    notes = helm("install", "tide", str(CHART), "--dry-run=client", "--namespace", "serving",
                 "--set", "redis.enabled=true").stdout
    (expected,) = [b for b in code_blocks("text") if "is installed as release" in b]
    assert expected.strip() in notes
    assert "redis://tide-redis.serving.svc:6379/0" in notes and "Secret tide-redis" in notes
    td = yaml.safe_load(next(b for b in code_blocks("yaml") if "TideDeployment" in b))
    assert td["spec"]["redis"]["url"] in notes
    assert td["spec"]["redis"]["passwordSecretRef"] == {"name": "tide-redis", "key": "password"}


def test_quickstart_names_the_objects_the_chart_creates() -> None:
    objs = render(sets=["redis.enabled=true"], extra=("--include-crds",))
    names = {(o["kind"], o["metadata"]["name"]) for o in objs}
    assert {("Deployment", "tide-operator"), ("StatefulSet", "tide-redis"), ("ConfigMap", "tide-dashboards"),
            ("CustomResourceDefinition", "tidedeployments.tide.dev"),
            ("CustomResourceDefinition", "draftversions.tide.dev")} <= names
    for needle in ("tide-operator-<hash>", "tide-redis-0", "tidedeployments.tide.dev draftversions.tide.dev",
                   "ConfigMap `tide-dashboards`"):
        assert needle in QUICKSTART
    upgraded = render([ROOT / "helm/values-kube-prometheus-stack.yaml"], sets=["redis.enabled=true"])
    assert [p["metadata"]["name"] for p in by_kind(upgraded, "PodMonitor")] == ["tide", "tide-operator"]
    assert "PodMonitor `tide`" in QUICKSTART and "`podMonitor/serving/tide/0`" in QUICKSTART
    assert "PodMonitor `tide-operator`" in QUICKSTART


def test_quickstart_columns_are_the_crds_printer_columns() -> None:
    columns = load_crds()["TideDeployment"]["spec"]["versions"][0]["additionalPrinterColumns"]
    header = " ".join(["NAME", *(c["name"].upper() for c in columns)])
    assert f"`{header}`" in QUICKSTART


def test_quickstart_names_the_dashboards() -> None:
    titles = [json.loads(p.read_text())["title"] for p in sorted((CHART / "dashboards").glob("*.json"))]
    for title in titles:
        assert f"**{title}**" in QUICKSTART, title
    named = set(QUICKSTART_PANELS)
    assert len(named) >= 4
    for dashboard in (CHART / "dashboards").glob("*.json"):
        for panel in json.loads(dashboard.read_text())["panels"]:
            if panel["type"] != "row":
                named.discard(panel["title"])
    assert not named, f"quickstart names panels that do not exist: {named}"



def test_quickstart_images_are_the_ones_docker_builds() -> None:
    from tests.test_chart_images import bake_images

    built = {f"{r}:{t}" for r, t in bake_images().values()}
    td = yaml.safe_load(next(b for b in code_blocks("yaml") if "TideDeployment" in b))
    assert {td["spec"]["inference"]["image"], td["spec"]["training"]["image"]} <= built


@pytest.mark.parametrize("name", MY_DOCS)
def test_relative_links_resolve(name: str) -> None:
    text = (DOCS / name).read_text()
    links = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text)
    assert links
    for link in links:
        if not link.startswith("http"):
            assert (DOCS / link).resolve().exists(), f"{name}: broken link {link}"
    assert "crds.md" in links, f"{name} should link the CRD reference"


def documented_metrics() -> set[str]:
    return set(re.findall(r"^\| `([a-z_:]+)` \|", (DOCS / "metrics.md").read_text(), flags=re.M))


def dashboard_metrics() -> set[str]:
    names = set()
    for path in (CHART / "dashboards").glob("*.json"):
        for expr in re.findall(r'"expr": "(.*?)",?\n', path.read_text()):
            expr = json.loads(f'"{expr}"')
            names |= set(re.findall(r"\b(tide_[a-z_]+?)(?:_bucket)?\b(?=[{\[(\s)])", expr))
            names |= {f"sglang:{n}" for n in re.findall(r"sglang\[:_\]([a-z_]+)", expr)}
    return names


def test_metrics_reference_covers_the_dashboards() -> None:
    used = dashboard_metrics()
    assert len(used) > 30
    assert used - documented_metrics() == set()


def test_metrics_reference_covers_every_metric_the_code_creates() -> None:
    reg = CollectorRegistry()
    PluginMetrics("d", registry=reg)
    ControlMetrics("d", registry=reg).family  # noqa: B018 (created on first use)
    created = {m.name + ("_total" if m.type == "counter" else "") for m in reg.collect()}
    assert "tide_controller_spec_steps" in created and "tide_captured_tokens_total" in created
    assert created - documented_metrics() == set()


def test_metrics_reference_covers_the_operators_metrics() -> None:
    names = {f.name for f in families([])}
    assert "tide_draftversion_phase" in names and "tide_tidedeployment_trainer_state" in names
    assert names - documented_metrics() == set()


def test_security_lists_every_rbac_rule() -> None:
    text = (DOCS / "security.md").read_text()
    rules = yaml.safe_load((CHART / "files/operator-rbac-rules.yaml").read_text())
    for rule in rules:
        for resource in rule["resources"]:
            plural = resource.split("/")[0]
            sub = resource.split("/")[1] if "/" in resource else None
            assert f"`{plural}" in text or f"`{resource}`" in text, resource
            if sub:
                assert f"`{resource}`" in text, resource
            row = next(line for line in text.splitlines()
                       if line.startswith("|") and (f"`{resource}`" in line or f"`{resource}." in line
                                                    or (not sub and f"`{plural}`" in line)))
            for verb in rule["verbs"]:
                assert verb in row, f"{resource}: {verb} missing from {row}"


def test_operations_documents_the_crd_upgrade() -> None:
    text = (DOCS / "operations.md").read_text()
    assert "kubectl apply --server-side --force-conflicts -f charts/tide/crds/" in text
    for word in ("Pause", "pin", "roll back", "Redis unreachable", "operator down"):
        assert word in text, word
