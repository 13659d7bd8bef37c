"""The Helm chart with the real helm v4 binary: lint, render every values file, validate what it renders.

No cluster (the only thing absent): built-in objects are validated with kubernetes-validate (the API's own
OpenAPI schemas, strict), TideDeployments with jsonschema over the CRD's openAPIV3Schema and with the operator's
own parser, and the Prometheus Operator's kinds against what the operator's builders produce.
"""

import base64
import json
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml
from tide_operator import builders
from tide_operator.status import check_secret, parse

from tests.chart_tools import (
    CHART,
    MONITORING_APIS,
    NAMESPACE,
    ROOT,
    VALUES_FILES,
    by_kind,
    helm,
    kubectl,
    render,
    render_error,
)
from tests.operator.crdcheck import errors, load_crds
from tide_sglang.settings import TideSettings

BUILT_IN = {"ServiceAccount", "ClusterRole", "ClusterRoleBinding", "RoleBinding", "Deployment", "StatefulSet",
            "Service", "Secret", "ConfigMap", "CustomResourceDefinition", "PodDisruptionBudget", "NetworkPolicy"}
KUBE_VERSIONS = ("1.27", "1.35")  # the chart's kubeVersion floor, and the kubectl that ensure-helm.sh installs


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict[str, Any]]]:
    """Every values file (and the defaults), rendered once with the CRDs included."""
    out = {"defaults": render(extra=("--include-crds",))}
    for path in VALUES_FILES:
        out[path.name] = render([path], extra=("--include-crds",))
    return out


def test_values_files_exist() -> None:
    names = {p.name for p in VALUES_FILES}
    assert {"values-heterogeneous.yaml", "values-external-redis-tls.yaml", "values-kube-prometheus-stack.yaml",
            "default-values.yaml"} <= names


@pytest.mark.parametrize("values", [None, *VALUES_FILES], ids=lambda p: p.name if p else "defaults")
def test_helm_lint(values: Path | None) -> None:
    args = ["lint", str(CHART), "--strict", "--namespace", NAMESPACE]
    if values is not None:
        args += ["-f", str(values)]
    out = helm(*args).stdout
    assert "0 chart(s) failed" in out


def test_built_in_objects_validate_against_kubernetes_schemas(rendered: dict[str, list[dict]]) -> None:
    import kubernetes_validate

    seen = set()
    for name, objs in rendered.items():
        for obj in objs:
            if obj["kind"] not in BUILT_IN:
                continue
            seen.add(obj["kind"])
            for version in KUBE_VERSIONS:
                try:
                    kubernetes_validate.validate(obj, version, strict=True)
                except kubernetes_validate.ValidationError as e:
                    raise AssertionError(f"{name}: {obj['kind']}/{obj['metadata']['name']} ({version}): {e}") from e
    assert {"Deployment", "StatefulSet", "Secret", "RoleBinding", "ClusterRoleBinding", "ConfigMap",
            "CustomResourceDefinition"} <= seen


def test_kubernetes_validate_rejects_a_broken_object() -> None:
    """The validator used above does fail: an unknown field in a rendered Deployment."""
    import kubernetes_validate

    dep = by_kind(render(), "Deployment")[0]
    dep["spec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(dep, KUBE_VERSIONS[-1], strict=True)


def test_tide_deployments_validate_against_the_crd(rendered: dict[str, list[dict]]) -> None:
    crd = load_crds()["TideDeployment"]
    count = 0
    for name, objs in rendered.items():
        for td in by_kind(objs, "TideDeployment"):
            count += 1
            assert errors(crd, td) == [], f"{name}: {td['metadata']['name']}"
            _, problems = parse(td["metadata"]["name"], td["spec"])
            assert problems == [], f"{name}: the operator would mark {td['metadata']['name']} Degraded: {problems}"
    assert count >= 4


def _under(path: str, mounts: list[dict[str, Any]]) -> bool:
    return any(path == m["mountPath"] or path.startswith(m["mountPath"].rstrip("/") + "/") for m in mounts)


def test_rendered_deployments_find_their_models_and_keep_their_own_lineage(rendered: dict[str, list[dict]]) -> None:
    """Every TideDeployment a values file renders or docs/examples holds, built into pods by the operator: each
    model path SGLang, the trainer and the draft import read lies on a volume of that container (a fetched one
    after its init container; never inside the registry mount, which is the deployment's own sub-path), and no
    two deployments share a registry lineage (the same PVC sub-path or object prefix)."""
    lineages: dict[str, set[tuple[str, str]]] = {}
    examples = {p.name: [yaml.safe_load(p.read_text())] for p in (ROOT / "docs/examples").glob("tide*.yaml")}
    for values, tds in {**{k: by_kind(v, "TideDeployment") for k, v in rendered.items()}, **examples}.items():
        for td in tds:
            name = td["metadata"]["name"]
            spec, _ = parse(name, td["spec"])
            assert spec is not None
            for dep in (d for d in builders.children(name, NAMESPACE, spec) if d["kind"] == "Deployment"):
                pod = dep["spec"]["template"]["spec"]
                fetched = {c["command"][3]: c["name"] for c in pod.get("initContainers", [])
                           if c["name"].startswith(builders.FETCH_PREFIX)}
                for c in [*pod.get("initContainers", []), *pod["containers"]]:
                    env = {e["name"]: e.get("value") for e in c.get("env", [])}
                    argv = [*c.get("command", []), *c.get("args", [])]
                    paths = [env.get("TIDE_TARGET")] + [argv[i + 1] for i, a in enumerate(argv)
                                                        if a in ("--model-path", "--speculative-draft-model-path")]
                    if c["name"] == builders.IMPORT_DRAFT:
                        paths.append(argv[2])
                    for path in filter(None, paths):
                        where = f"{values}: {dep['metadata']['name']}/{c['name']} reads {path}"
                        assert path.startswith("/") and _under(path, c["volumeMounts"]), where
                        # the registry mount is the deployment's lineage only (its sub-path), never a model's home
                        assert not _under(path, [m for m in c["volumeMounts"] if m["name"] == "registry"]), where
                        if path.startswith(builders.MODEL_CACHE):  # fetched: by an earlier init container
                            assert path in fetched and c["name"] != fetched[path], where
                registry = next((m for m in pod["containers"][0]["volumeMounts"] if m["name"] == "registry"), None)
                claim = next((v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"]
                              if v["name"] == "registry"), None)
                url = next((e["value"] for e in pod["containers"][0]["env"] if e["name"] == "TIDE_REGISTRY_URL"), None)
                lineage = (f"pvc://{claim}/{registry['subPath']}" if registry else url, dep["metadata"]["name"])
                lineages.setdefault(f"{values}/{lineage[0]}", set()).add((name, lineage[1]))
    assert any("pvc://tide-drafts/" in k for k in lineages) and any("s3://" in k for k in lineages)
    for lineage, users in lineages.items():
        assert len({n for n, _ in users}) == 1, f"{lineage} is shared by {sorted(users)}"


def test_crd_schema_check_rejects_a_typo() -> None:
    crd = load_crds()["TideDeployment"]
    td = by_kind(render([ROOT / "helm/values-heterogeneous.yaml"]), "TideDeployment")[0]
    td["spec"]["inference"]["replica"] = 3
    assert errors(crd, td)


def test_crds_are_the_generated_files(rendered: dict[str, list[dict]]) -> None:
    crds = {o["metadata"]["name"]: o for o in by_kind(rendered["defaults"], "CustomResourceDefinition")}
    assert crds == {c["metadata"]["name"]: c for c in load_crds().values()}


def test_rbac_rules_are_the_generated_file() -> None:
    role = by_kind(render(), "ClusterRole")[0]
    assert role["rules"] == yaml.safe_load((CHART / "files/operator-rbac-rules.yaml").read_text())
    binding = by_kind(render(), "ClusterRoleBinding")[0]
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"][0]["name"] == by_kind(render(), "ServiceAccount")[0]["metadata"]["name"]


def test_watched_namespaces_get_role_bindings_and_flags() -> None:
    objs = render(sets=["operator.watchNamespaces={serving,batch}"])
    assert not by_kind(objs, "ClusterRoleBinding")
    assert sorted(b["metadata"]["namespace"] for b in by_kind(objs, "RoleBinding")) == ["batch", "serving"]
    args = by_kind(objs, "Deployment")[0]["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--namespace=serving" in args and "--namespace=batch" in args and "--all-namespaces" not in args


def test_operator_deployment() -> None:
    objs = render(sets=["operator.verbosity=debug", "operator.intervalSeconds=5"])
    dep = by_kind(objs, "Deployment")[0]
    assert dep["spec"]["replicas"] == 2 and "strategy" not in dep["spec"]  # rolled: the peers hand over
    c = dep["spec"]["template"]["spec"]["containers"][0]
    assert c["image"] == "ghcr.io/tide-sglang/tide-operator:0.1.0"
    assert c["args"] == ["--log-format=full", "--debug", "--liveness=http://0.0.0.0:8080/healthz", "--peering=tide",
                         "--all-namespaces"]
    env = {e["name"]: e.get("value", e.get("valueFrom")) for e in c["env"]}
    assert env == {"TIDE_OPERATOR_INTERVAL_S": "5", "TIDE_OPERATOR_REDIS_TIMEOUT_S": "3",
                   "TIDE_OPERATOR_EVENTS_BATCH": "100", "TIDE_OPERATOR_METRICS_PORT": "9401",
                   "TIDE_OPERATOR_NAMESPACE": {"fieldRef": {"fieldPath": "metadata.namespace"}}}
    assert dep["spec"]["template"]["metadata"]["labels"]["tide.dev/operator"] == "true"
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}


@pytest.mark.parametrize("watch", [[], ["serving", "batch"]])
def test_operator_replicas_share_a_kopf_peering_and_a_disruption_budget(watch: list[str]) -> None:
    """Two replicas by default, one acting (python -m tide_operator --peering gives each a random kopf priority):
    the peering object they share is rendered (cluster-wide, or one per watched namespace, as kopf looks for it
    with -A or -n), its CRD is in crds/, and a PodDisruptionBudget keeps one replica through drains."""
    from tide_operator.__main__ import kopf_argv

    sets = [f"operator.watchNamespaces={{{','.join(watch)}}}"] if watch else []
    objs = render(sets=sets)
    kind = "KopfPeering" if watch else "ClusterKopfPeering"
    peerings = by_kind(objs, kind)
    assert [p["metadata"].get("namespace") for p in peerings] == (watch or [None])
    assert all(errors(load_crds()[kind], p) == [] for p in peerings)
    args = by_kind(objs, "Deployment")[0]["spec"]["template"]["spec"]["containers"][0]["args"]
    assert f"--peering={peerings[0]['metadata']['name']}" in args
    argv = kopf_argv(args)
    assert "--standalone" not in argv and sum(a.startswith("--priority=") for a in argv) == 1
    assert "--standalone" in kopf_argv(["-n", "x"])  # run by hand without --peering: one replica
    (pdb,) = by_kind(objs, "PodDisruptionBudget")
    assert pdb["spec"] == {"minAvailable": 1, "selector": by_kind(objs, "Deployment")[0]["spec"]["selector"]}
    assert not by_kind(render(sets=["operator.replicas=1"]), "PodDisruptionBudget")


def test_digest_overrides_tag() -> None:
    digest = "sha256:" + "a" * 64
    dep = by_kind(render(sets=[f"operator.image.digest={digest}"]), "Deployment")[0]
    assert dep["spec"]["template"]["spec"]["containers"][0]["image"] == f"ghcr.io/tide-sglang/tide-operator@{digest}"


def test_managed_redis_and_its_tide_deployments() -> None:
    objs = render([ROOT / "helm/values-heterogeneous.yaml"])
    secret = by_kind(objs, "Secret")[0]
    assert secret["metadata"]["name"] == "tide-redis" and len(secret["data"]["password"]) > 20
    assert secret["metadata"]["labels"]["tide.dev/secret"] == "true"  # the operator may read it
    sts = by_kind(objs, "StatefulSet")[0]
    c = sts["spec"]["template"]["spec"]["containers"][0]
    assert c["args"][-2:] == ["--requirepass", "$(REDIS_PASSWORD)"]
    assert {"REDIS_PASSWORD", "REDISCLI_AUTH"} == {e["name"] for e in c["env"]}
    assert sts["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"] == "50Gi"
    tds = {t["metadata"]["name"]: t["spec"] for t in by_kind(objs, "TideDeployment")}
    assert set(tds) == {"llama-chat", "qwen-coder", "mistral-support"}
    for spec in tds.values():
        assert spec["redis"] == {"url": f"redis://tide-redis.{NAMESPACE}.svc:6379/0",
                                 "passwordSecretRef": {"name": "tide-redis", "key": "password"}}
    assert tds["llama-chat"]["inference"]["image"] == "ghcr.io/tide-sglang/tide-inference:0.1.0"
    assert tds["llama-chat"]["training"]["image"] == "ghcr.io/tide-sglang/tide-trainer:0.1.0"
    assert tds["mistral-support"]["training"]["image"].endswith("-rocm")  # kept: the spec names it
    pools = {n: s["training"]["nodeSelector"] for n, s in tds.items()}
    assert pools == {"llama-chat": {"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB"},
                     "qwen-coder": {"nvidia.com/gpu.product": "NVIDIA-L40S"},
                     "mistral-support": {"amd.com/gpu.product-name": "AMD-Instinct-MI250X"}}


def test_chart_redis_admits_only_tide_pods_and_the_operator() -> None:
    """Its NetworkPolicy's peers match the pods the operator builds for the TideDeployments the chart renders and
    the operator's own pods, and no other pod of the namespace (the Redis pod itself, say)."""
    objs = render([ROOT / "helm/values-heterogeneous.yaml"])
    (policy,) = by_kind(objs, "NetworkPolicy")
    redis_pod = by_kind(objs, "StatefulSet")[0]["spec"]["template"]["metadata"]["labels"]
    assert _matches(policy["spec"]["podSelector"], redis_pod)
    (rule,) = policy["spec"]["ingress"]
    assert rule["ports"] == [{"protocol": "TCP", "port": 6379}]

    def allowed(labels: dict[str, str]) -> bool:
        return any(_matches(peer["podSelector"], labels) for peer in rule["from"])

    operator = by_kind(objs, "Deployment")[0]["spec"]["template"]["metadata"]["labels"]
    assert allowed(operator) and not allowed(redis_pod)
    for td in by_kind(objs, "TideDeployment"):
        spec, _ = parse(td["metadata"]["name"], td["spec"])
        assert spec is not None
        for dep in (d for d in builders.children(td["metadata"]["name"], NAMESPACE, spec) if d["kind"] == "Deployment"):
            assert allowed(dep["spec"]["template"]["metadata"]["labels"]), dep["metadata"]["name"]
    assert not by_kind(render([ROOT / "helm/values-heterogeneous.yaml"], sets=["redis.networkPolicy.enabled=false"]),
                       "NetworkPolicy")


def test_external_redis_keeps_the_spec_secrets() -> None:
    objs = render([ROOT / "helm/values-external-redis-tls.yaml"])
    assert not by_kind(objs, "StatefulSet") and not by_kind(objs, "Secret")
    td = by_kind(objs, "TideDeployment")[0]
    assert td["spec"]["redis"] == {"urlSecretRef": {"name": "tide-redis", "key": "url"},
                                   "passwordSecretRef": {"name": "tide-redis", "key": "password"}}
    pod = by_kind(objs, "Deployment")[0]["spec"]["template"]["spec"]
    assert {"name": "TIDE_REDIS_TLS_CA_FILE", "value": "/etc/tide/redis-ca/ca.crt"} in pod["containers"][0]["env"]
    assert {"name": "redis-ca", "secret": {"secretName": "tide-redis-ca"}} in pod["volumes"]


def test_monitors_only_when_the_prometheus_operator_api_exists() -> None:
    sets = ["monitoring.podMonitor.enabled=true"]
    assert not by_kind(render(sets=sets, apis=()), "PodMonitor")
    notes = helm("install", "tide", str(CHART), "--dry-run=client", "--namespace", NAMESPACE,
                 "--set", sets[0]).stdout
    assert "no PodMonitor was created" in notes
    assert {m["metadata"]["name"] for m in by_kind(render(sets=sets, apis=MONITORING_APIS), "PodMonitor")} == {
        "tide", "tide-operator"}
    sm = ["monitoring.serviceMonitor.enabled=true"]
    assert not by_kind(render(sets=sm, apis=()), "ServiceMonitor")
    assert len(by_kind(render(sets=sm), "ServiceMonitor")) == 1
    assert [m["metadata"]["name"] for m in by_kind(render(sets=sm), "PodMonitor")] == ["tide-operator"]
    assert [m["metadata"]["name"] for m in by_kind(render(sets=[*sets, "operator.metricsPort=0"]), "PodMonitor")] \
        == ["tide"]


def test_operator_pod_monitor_scrapes_the_operators_metrics_port() -> None:
    """The operator's own series (tide_operator.metrics) are scraped from its `metrics` port, keeping their
    namespace and deployment labels."""
    objs = render(sets=["monitoring.podMonitor.enabled=true"])
    pm = next(m for m in by_kind(objs, "PodMonitor") if m["metadata"]["name"] == "tide-operator")
    operator = next(d for d in by_kind(objs, "Deployment") if d["metadata"]["name"] == "tide-operator")
    pod = operator["spec"]["template"]
    assert _matches(pm["spec"]["selector"], pod["metadata"]["labels"])
    assert pm["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    (endpoint,) = pm["spec"]["podMetricsEndpoints"]
    assert endpoint["honorLabels"] and endpoint["port"] == "metrics"
    container = pod["spec"]["containers"][0]
    port = next(p["containerPort"] for p in container["ports"] if p["name"] == "metrics")
    assert {"name": "TIDE_OPERATOR_METRICS_PORT", "value": str(port)} in container["env"]
    off = next(d for d in by_kind(render(sets=["operator.metricsPort=0"]), "Deployment")
               if d["metadata"]["name"] == "tide-operator")["spec"]["template"]["spec"]["containers"][0]
    assert [p["name"] for p in off["ports"]] == ["health"]


def _matches(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    for expr in selector.get("matchExpressions", []):
        key, op = expr["key"], expr["operator"]
        if (op == "Exists" and key not in labels) or (op == "In" and labels.get(key) not in expr["values"]):
            return False
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


def test_pod_monitor_scrapes_the_pods_the_operator_builds() -> None:
    """The chart's PodMonitor selects the inference pods of tide_operator.builders and names their metrics port."""
    objs = render([ROOT / "helm/values-kube-prometheus-stack.yaml"])
    pm = next(m for m in by_kind(objs, "PodMonitor") if m["metadata"]["name"] == "tide")
    assert pm["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert pm["spec"]["namespaceSelector"] == {"any": True}
    td = by_kind(render([ROOT / "helm/values-heterogeneous.yaml"]), "TideDeployment")[0]
    spec, _ = parse(td["metadata"]["name"], td["spec"])
    assert spec is not None
    kids = builders.children(td["metadata"]["name"], NAMESPACE, spec)
    pods = {d["metadata"]["name"]: d["spec"]["template"] for d in kids if d["kind"] == "Deployment"}
    inference = pods["llama-chat"]
    assert _matches(pm["spec"]["selector"], inference["metadata"]["labels"])
    ports = {p["name"] for p in inference["spec"]["containers"][0]["ports"]}
    assert {e["port"] for e in pm["spec"]["podMetricsEndpoints"]} & ports == {"http"}
    targets = {r["targetLabel"]: r["sourceLabels"][0] for r in pm["spec"]["podMetricsEndpoints"][0]["relabelings"]}
    assert targets["deployment"] == "__meta_kubernetes_pod_label_tide_dev_deployment"
    assert all(e["honorLabels"] for e in pm["spec"]["podMetricsEndpoints"])
    svc = next(k for k in kids if k["kind"] == "Service")
    sm = by_kind(render(sets=["monitoring.serviceMonitor.enabled=true"]), "ServiceMonitor")[0]
    assert _matches(sm["spec"]["selector"], svc["metadata"]["labels"])


def test_dashboards_config_map() -> None:
    cms = by_kind(render([ROOT / "helm/values-kube-prometheus-stack.yaml"]), "ConfigMap")
    cm = next(c for c in cms if c["metadata"]["name"].endswith("-dashboards"))
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert cm["metadata"]["annotations"] == {"grafana_folder": "TIDE"}
    files = {p.name: json.loads(p.read_text()) for p in (CHART / "dashboards").glob("*.json")}
    assert len(files) == 3
    assert {k: json.loads(v) for k, v in cm["data"].items()} == files
    assert not by_kind(render(sets=["dashboards.enabled=false"]), "ConfigMap")


@pytest.mark.parametrize(("sets", "message"), [
    (["operator.imag.tag=1"], "additional properties 'imag' not allowed"),
    (["redis.maxMemory=4GB"], "maxMemory"),
    (["operator.verbosity=loud"], "verbosity"),
    (["monitoring.podMonitor.enabled=true", "monitoring.serviceMonitor.enabled=true"], "not both"),
    (["serviceAccount.create=false"], "serviceAccount.name"),
    (["tideDeployments.Bad_Name.spec.model.path=x"], "invalid propertyName 'Bad_Name'"),
    (["tideDeployments.a.spec.model.path=m", "tideDeployments.a.spec.draft.initialPath=d",
      "tideDeployments.a.spec.inference.replicas=1"], "names no Redis"),
    (["tideDeployments.a.spec.model.path=m"], "spec.draft is required"),
    (["tideDeployments.a.spec.model.path=m", "tideDeployments.a.spec.draft.initialPath=d",
      "tideDeployments.a.spec.inference.replicas=1", "tideDeployments.a.spec.redis.url=redis://r:6379",
      "tideDeployments.a.spec.redis.managed.enabled=true"], "exactly one of"),
    (["tideDeployments.a.spec.model.path=m", "tideDeployments.a.spec.draft.initialPath=d",
      "tideDeployments.a.spec.inference.replicas=1", "redis.enabled=true", "operator.watchNamespaces={other}"],
     "does not include"),
])
def test_bad_values_fail_the_render(sets: list[str], message: str) -> None:
    assert message in render_error(sets)


def _leaves(values: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted paths of the values a user sets (a map of free-form content counts as one value)."""
    out = []
    for key, value in values.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value and key not in ("resources", "podSecurityContext", "securityContext"):
            out += _leaves(value, path + ".")
        else:
            out.append(path)
    return out


def test_every_value_is_documented_with_an_example() -> None:
    """values.yaml: each value has a `# -- ` description and an `Example:` in the comment block above it."""
    lines = (CHART / "values.yaml").read_text().splitlines()
    values = yaml.safe_load("\n".join(lines))
    undocumented = []
    for path in _leaves(values):
        key = path.rsplit(".", 1)[-1]
        depth = path.count(".")
        (at,) = [i for i, ln in enumerate(lines) if ln.startswith("  " * depth + f"{key}:")
                 and _parents(lines, i) == path.split(".")[:-1]]
        block = []
        for ln in reversed(lines[:at]):
            if not ln.strip().startswith("#"):
                break
            block.append(ln)
        text = "\n".join(block)
        if "# -- " not in text or "Example:" not in text:
            undocumented.append(path)
    assert undocumented == []


def _parents(lines: list[str], at: int) -> list[str]:
    indent = len(lines[at]) - len(lines[at].lstrip())
    parents = []
    for ln in reversed(lines[:at]):
        stripped = ln.lstrip()
        if not stripped or stripped.startswith("#"):
            continue
        level = len(ln) - len(stripped)
        if level < indent:
            parents.append(stripped.split(":", 1)[0])
            indent = level
    return parents[::-1]


def test_schema_and_values_have_the_same_keys() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())

    def walk(node: dict[str, Any], value: Any, path: str) -> None:
        assert node.get("additionalProperties") is False or "properties" not in node, f"{path}: not closed"
        props = node.get("properties")
        if props is None or not isinstance(value, dict):
            return
        assert set(value) <= set(props), f"{path}: values.yaml keys missing from the schema"
        assert set(props) - {"global"} <= set(value), f"{path}: schema keys without a default in values.yaml"
        for key, sub in props.items():
            if key in value:
                walk(sub, value[key], f"{path}.{key}")

    walk(schema, values, "$")


def test_chart_testing_config() -> None:
    ct = yaml.safe_load((ROOT / "helm/ct.yaml").read_text())
    known = {"chart-dirs", "target-branch", "remote", "validate-maintainers", "check-version-increment",
             "validate-chart-schema", "validate-yaml", "helm-extra-args", "charts", "excluded-charts",
             "chart-repos", "lint-conf", "chart-yaml-schema", "debug", "upgrade", "skip-missing-values"}
    assert set(ct) <= known
    for d in ct["chart-dirs"]:
        assert (ROOT / d / "tide/Chart.yaml").is_file()
    assert list((CHART / "ci").glob("*-values.yaml")), "ct lints and installs with ci/*-values.yaml"


def test_external_redis_secrets_from_the_documented_commands(tmp_path: Path) -> None:
    """The `kubectl create secret` commands in the example's header, run with the real kubectl (client-side dry
    run), give the Secrets and keys the rendered TideDeployment and the operator's CA mount refer to."""
    values = ROOT / "helm/values-external-redis-tls.yaml"
    header = "\n".join(ln[1:].strip() for ln in values.read_text().splitlines() if ln.startswith("#"))
    header = header.replace("\\\n", " ")  # join continuation lines
    commands = [ln.split("kubectl ", 1)[1] for ln in header.splitlines() if ln.startswith("kubectl ")]
    (tmp_path / "redis-ca.crt").write_text("-----BEGIN CERTIFICATE-----\n")
    secrets: dict[str, dict] = {}
    for command in commands:
        argv = [a.replace("./redis-ca.crt", str(tmp_path / "redis-ca.crt")) for a in shlex.split(command)]
        if argv[2] == "label":  # `label secret NAME k=v` of a Secret made above: applied locally (--local)
            (tmp_path / "s.yaml").write_text(yaml.safe_dump(secrets[argv[4]]))
            argv = [*argv[:3], "-f", str(tmp_path / "s.yaml"), "--local", *argv[5:]]
        secret = yaml.safe_load(kubectl(*argv, "--dry-run=client", "-o", "yaml").stdout)
        secrets[secret["metadata"]["name"]] = secret
    assert set(secrets) == {"tide-redis", "tide-redis-ca"}
    objs = render([values])
    td = by_kind(objs, "TideDeployment")[0]
    spec, problems = parse(td["metadata"]["name"], td["spec"])
    assert spec is not None and problems == []
    refs = {"urlSecretRef": spec.redis.url_secret_ref, "passwordSecretRef": spec.redis.password_secret_ref}
    labelled = {n: s for n, s in secrets.items() if s["metadata"].get("labels", {}).get("tide.dev/secret") == "true"}
    for field, ref in refs.items():  # as the operator sees them: labelled for TIDE
        assert ref is not None and check_secret(field, ref, labelled.get(ref.name)) is None
    url = base64.b64decode(secrets["tide-redis"]["data"]["url"]).decode()
    assert TideSettings(redis_url=url).redis_url.startswith("rediss://")
    pod = by_kind(objs, "Deployment")[0]["spec"]["template"]["spec"]
    (volume,) = [v for v in pod["volumes"] if "secret" in v]
    assert volume["secret"]["secretName"] == "tide-redis-ca"
    env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
    mount = next(m for m in pod["containers"][0]["volumeMounts"] if m["name"] == volume["name"])
    ca_file = env["TIDE_REDIS_TLS_CA_FILE"]
    assert ca_file.startswith(mount["mountPath"] + "/")
    assert ca_file.rsplit("/", 1)[1] in secrets["tide-redis-ca"]["data"]
