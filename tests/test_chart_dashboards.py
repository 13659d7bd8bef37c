"""The Grafana dashboards: valid against Grafana's dashboard schema, every PromQL expression accepted by promtool,
and every query answered by a real Prometheus that scrapes real TIDE metrics endpoints on loopback.

What feeds Prometheus (only the cluster is absent; nothing here is mocked):
- the controller's tide_controller_* and tide_trainer_trigger_* series come from a real SpeculationController
  driven through a drifting acceptance (so switches, probes and a change point happen), and tide_speculation_steps
  from the plugin's real Runtime.sync with a StepTable, all in real CollectorRegistries served by
  prometheus_client's start_http_server;
- the plugin's capture, swap and per-version acceptance counters are the real PluginMetrics objects,
  incremented here (their code paths need CUDA streams and SGLang's draft worker);
- SGLang's own sglang:* series exist only inside SGLang: they are registered here with SGLang's names and labels;
- the trainer's series and the stream lag are registered here under the names the trainer exports;
- the tide_draftversion_* / tide_tidedeployment_* series come from kube-state-metrics' custom resource state
  config in helm/kube-prometheus-stack/values.yaml, which KSM would apply: `ksm_families` applies it here to
  DraftVersion/TideDeployment objects that validate against the CRDs.
Each registry is one scrape target with the target labels the chart's PodMonitor adds (deployment, pod).
"""

import json
import math
import re
import socket
import subprocess
import threading
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np
import pytest
import yaml
from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from tests.chart_tools import CHART, ROOT, system_binary
from tests.helpers import wait_for
from tests.operator.crdcheck import errors, load_crds
from tide_sglang.control import Profile, SpeculationController
from tide_sglang.plugin.metrics import PluginMetrics
from tide_sglang.plugin.runtime import Runtime
from tide_sglang.plugin.speculation import StepTable
from tide_sglang.settings import TideSettings

DASHBOARDS = sorted((CHART / "dashboards").glob("*.json"))
# A copy of the workplace's shared/schemas file, kept in the repo so a clean CI checkout has it.
GRAFANA_SCHEMA = json.loads((ROOT / "tests/schemas/grafana-dashboard.jsonschema.json").read_text())
KSM_VALUES = ROOT / "helm/kube-prometheus-stack/values.yaml"
DEPLOYMENT = "llama-chat"
RATE_WINDOW = "5s"  # $__rate_interval at a 1 s scrape interval
PROFILE = Profile.roofline(floor_s=0.010, per_token_s=1e-4, draft_s=0.001, max_tokens=1024)
SLOTS = {1: [0, 1, 2, 3, 5], 8: [0, 1, 2, 3, 5], 64: [0, 1, 2, 3, 5]}


def panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for p in dashboard["panels"]:
        yield p
        yield from p.get("panels", [])


def queries() -> list[tuple[str, str, str]]:
    """(dashboard file, panel title, expr) of every target."""
    out = []
    for path in DASHBOARDS:
        for p in panels(json.loads(path.read_text())):
            out += [(path.name, p["title"], t["expr"]) for t in p.get("targets", [])]
    return out


def concrete(expr: str, deployment: str = DEPLOYMENT) -> str:
    """The expression as Grafana sends it, with the dashboard variables filled in."""
    return (expr.replace("$deployment", deployment).replace("$__rate_interval", RATE_WINDOW)
            .replace("$__range", "1m"))


QUERIES = queries()


# -- static checks ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_dashboard_is_valid_against_grafana_schema(path: Path) -> None:
    dashboard = json.loads(path.read_text())
    found = [f"{'/'.join(map(str, e.path))}: {e.message}" for e in
             jsonschema.Draft7Validator(GRAFANA_SCHEMA).iter_errors(dashboard)]
    assert found == []
    broken = {**dashboard, "panels": [{**dashboard["panels"][1], "gridPos": {"h": 8, "w": 30, "x": 0, "y": 0}}]}
    assert list(jsonschema.Draft7Validator(GRAFANA_SCHEMA).iter_errors(broken))  # the schema does reject


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_dashboard_conventions(path: Path) -> None:
    d = json.loads(path.read_text())
    assert d["uid"] == path.stem and d["title"].startswith("TIDE / ")
    ids = [p["id"] for p in panels(d)]
    assert len(ids) == len(set(ids))
    assert [v["name"] for v in d["templating"]["list"]] == ["datasource", "deployment"]
    for p in panels(d):
        if p["type"] == "row":
            continue
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        assert p.get("description"), f"{p['title']}: every panel says what it shows"
        for t in p["targets"]:
            assert 'deployment=~"$deployment"' in t["expr"], f"{p['title']}: {t['expr']}"


def test_dashboards_cover_what_an_operator_needs() -> None:
    text = " ".join(e for _, _, e in QUERIES)
    for metric in ("tide_draft_accepted_tokens_total", "sglang[:_]generation_tokens_total", "tide_speculation_steps",
                   "tide_captured_tokens_total", "tide_captured_bytes_total", "tide_capture_drops_total",
                   "tide_stream_lag_entries", "tide_trainer_loss", "tide_trainer_heldout_acceptance",
                   "tide_trainer_tokens_total", "tide_draftversion_phase", "tide_controller_spec_steps",
                   "tide_controller_acceptance_ewma", "tide_trainer_trigger_active"):
        assert metric in text, metric


def test_promtool_accepts_every_expression(tmp_path: Path) -> None:
    promtool = system_binary("promtool")
    rules = [{"record": f"tide:dashboard:{i}", "expr": concrete(e)} for i, (_, _, e) in enumerate(QUERIES)]
    good = tmp_path / "dashboards.rules.yml"
    good.write_text(yaml.safe_dump({"groups": [{"name": "dashboards", "rules": rules}]}))
    run = subprocess.run([promtool, "check", "rules", str(good)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr
    assert f"SUCCESS: {len(rules)} rules found" in run.stdout
    bad = tmp_path / "bad.rules.yml"  # promtool does reject a broken expression
    bad.write_text(yaml.safe_dump({"groups": [{"name": "b", "rules": [{"record": "x", "expr": "sum by (a (x)"}]}]}))
    assert subprocess.run([promtool, "check", "rules", str(bad)], capture_output=True, timeout=60).returncode != 0


# -- kube-state-metrics' custom resource state, applied to CRD objects --------------------------------------------


def _get(obj: Any, path: list[str]) -> Any:
    for key in path:
        if not isinstance(obj, dict) or key not in obj:
            return None
        obj = obj[key]
    return obj


def _number(value: Any) -> float:
    if isinstance(value, str):
        return {"true": 1.0, "false": 0.0, "unknown": 0.0}[value.lower()]
    return float(value)


def ksm_families(objects: list[dict[str, Any]]) -> list[GaugeMetricFamily]:
    """What kube-state-metrics' custom resource state (Gauge and StateSet, as configured in
    helm/kube-prometheus-stack/values.yaml) exports for these objects."""
    config = yaml.safe_load(KSM_VALUES.read_text())["kube-state-metrics"]["customResourceState"]["config"]
    out = []
    for res in config["spec"]["resources"]:
        gvk = res["groupVersionKind"]
        mine = [o for o in objects if o["kind"] == gvk["kind"]]
        for metric in res["metrics"]:
            each = metric["each"]
            fam = None
            for obj in mine:
                base = {"customresource_group": gvk["group"], "customresource_kind": gvk["kind"],
                        "customresource_version": gvk["version"]}
                base |= {k: str(_get(obj, p)) for k, p in res["labelsFromPath"].items()}
                for labels, value in _ksm_values(each, obj):
                    labels = base | labels
                    if fam is None:
                        fam = GaugeMetricFamily(f"{res['metricNamePrefix']}_{metric['name']}", metric["help"],
                                                labels=list(labels))
                    fam.add_metric([labels[k] for k in fam._labelnames], value)
            if fam is not None:
                out.append(fam)
    return out


def _ksm_values(each: dict[str, Any], obj: dict[str, Any]) -> list[tuple[dict[str, str], float]]:
    if each["type"] == "StateSet":
        s = each["stateSet"]
        current = _get(obj, s["path"])
        return [({s["labelName"]: state}, float(state == current)) for state in s["list"]]
    g = each["gauge"]
    value = _get(obj, g["path"])
    items = value if isinstance(value, list) else [value]
    out = []
    for item in items:
        v = _get(item, g["valueFrom"]) if "valueFrom" in g else item
        if v is not None:
            out.append(({k: str(_get(item, p)) for k, p in g.get("labelsFromPath", {}).items()}, _number(v)))
    return out


def rollout_objects() -> list[dict[str, Any]]:
    """A TideDeployment mid-canary and its DraftVersions, as the operator writes them (validated by the CRDs)."""
    canary = yaml.safe_load((ROOT / "docs/examples/draftversion.yaml").read_text())
    canary["spec"]["deployment"] = DEPLOYMENT
    stable = json.loads(json.dumps(canary))
    stable["metadata"]["name"], stable["spec"]["version"], stable["spec"]["parent"] = f"{DEPLOYMENT}-v3", 3, 2
    stable["status"] = {"phase": "Promoted", "reason": "BetterAcceptance", "promotion": 1,
                        "lastTransitionTime": "2026-11-25T17:00:00Z"}
    td = yaml.safe_load((ROOT / "docs/examples/tidedeployment-minimal.yaml").read_text())
    cond = {"status": "True", "reason": "Canary", "observedGeneration": 1, "lastTransitionTime": "2026-11-25T18:00:00Z"}
    td["status"] = {"observedGeneration": 1, "stable": 3, "canary": 4, "candidate": 4, "acceptance": 0.66,
                    "training": {"state": "Training", "reason": "TriggerFired", "since": "2026-11-25T17:30:00Z",
                                 "upSince": "2026-11-25T17:30:00Z", "lastTrigger": "2026-11-25T18:00:00Z"},
                    "conditions": [{"type": "Progressing", **cond},
                                   {"type": "Ready", **cond, "status": "False", "reason": "PodsNotReady"}]}
    crds = load_crds()
    for obj in (canary, stable, td):
        assert errors(crds[obj["kind"]], obj) == [], obj["metadata"]["name"]
    return [canary, stable, td]


def test_ksm_config_reads_fields_the_crds_have() -> None:
    """Every path of the kube-state-metrics config exists in the CRD schema (a renamed status field fails here)."""
    config = yaml.safe_load(KSM_VALUES.read_text())["kube-state-metrics"]["customResourceState"]["config"]
    crds = load_crds()
    for res in config["spec"]["resources"]:
        schema = crds[res["groupVersionKind"]["kind"]]["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
        paths = list(res["labelsFromPath"].values())
        for m in res["metrics"]:
            each = m["each"]
            root = (each.get("gauge") or each.get("stateSet"))["path"]
            paths.append(root)
            node = _schema_at(schema, root)
            for sub in [*each.get("gauge", {}).get("labelsFromPath", {}).values(),
                        *([each["gauge"]["valueFrom"]] if "valueFrom" in each.get("gauge", {}) else [])]:
                assert _schema_at(node["items"], sub) is not None, (m["name"], sub)
            if each["type"] == "StateSet":
                assert set(each["stateSet"]["list"]) == set(node["enum"]), m["name"]
        for path in paths:
            assert path[0] == "metadata" or _schema_at(schema, path) is not None, path


def _schema_at(schema: dict[str, Any], path: list[str]) -> dict[str, Any] | None:
    for key in path:
        schema = (schema.get("properties") or {}).get(key)
        if schema is None:
            return None
    return schema


# -- a real Prometheus ---------------------------------------------------------------------------------------------


class Static(Collector):
    def __init__(self, families: list[GaugeMetricFamily]) -> None:
        self.families = families

    def collect(self) -> Iterator[GaugeMetricFamily]:
        yield from self.families


def engine_registry(version: int, acceptance: list[float], seed: int) -> tuple[CollectorRegistry, dict[str, Any]]:
    """One SGLang scheduler process: the real controller and plugin metrics, plus SGLang's own series."""
    reg = CollectorRegistry()
    settings = TideSettings(deployment=DEPLOYMENT, control_window_steps=32, changepoint_warmup=5,
                            control_probe_interval=2, sync_interval_batches=1, control_switch_patience=2,
                            control_half_life_steps=16)
    ctl = SpeculationController(PROFILE, settings, registry=reg, version=version)
    metrics = PluginMetrics(DEPLOYMENT, registry=reg)
    runtime = Runtime(settings, metrics, None, None, StepTable(ctl.steps_for_batch), lambda v: None)
    rng = np.random.default_rng(seed)
    for a in acceptance:  # drift: the controller switches, probes and detects a change point
        for _ in range(40):
            g = ctl.steps_for_batch(8)
            if g:
                ctl.observe(version, int(np.minimum(rng.geometric(1 - a, size=8) - 1, g).sum()), 8, g)
    for _ in range(2):
        runtime.sync(SLOTS)  # the plugin's sync point publishes the agreed steps per batch-size slot
    labels = {"model_name": "llama", "engine_type": "unified", "tp_rank": "0"}
    sglang = {name: Gauge(name, name, list(labels), registry=reg).labels(**labels) for name in
              ("sglang:spec_accept_length", "sglang:gen_throughput", "sglang:num_running_reqs",
               "sglang:spec_num_steps")}
    sglang["tokens"] = Counter("sglang:generation_tokens_total", "tokens", list(labels), registry=reg).labels(**labels)
    metrics.version.labels(deployment=DEPLOYMENT).set(version)
    metrics.swap_failures.labels(**metrics.labels(version)).inc(0)
    return reg, {"metrics": metrics, "version": version, "sglang": sglang, "ctl": ctl}


def trainer_registry() -> tuple[CollectorRegistry, dict[str, Any]]:
    """The series the dashboards expect from the trainer, under the names `tide train` exports (TrainerMetrics)."""
    reg = CollectorRegistry()
    d = ("deployment",)
    fam = {"loss": Gauge("tide_trainer_loss", "loss", d, registry=reg).labels(DEPLOYMENT),
           "tokens": Counter("tide_trainer_tokens_total", "tokens", d, registry=reg).labels(DEPLOYMENT),
           "lag": Gauge("tide_stream_lag_entries", "lag", d, registry=reg).labels(DEPLOYMENT),
           "pending": Gauge("tide_stream_pending_entries", "pending", d, registry=reg).labels(DEPLOYMENT)}
    heldout = Gauge("tide_trainer_heldout_acceptance", "held-out", ("deployment", "draft_version", "model"),
                    registry=reg)
    heldout.labels(DEPLOYMENT, "4", "candidate").set(0.71)
    heldout.labels(DEPLOYMENT, "3", "deployed").set(0.66)
    return reg, fam


def tick(engines: list[dict[str, Any]], trainer: dict[str, Any], step: int) -> None:
    """What a second of serving and training adds."""
    for e in engines:
        m, v, s = e["metrics"], e["version"], e["sglang"]
        labels = m.labels(v)
        m.captured_tokens.labels(**labels).inc(480)
        m.captured_bytes.labels(**labels).inc(480 * 3 * 4096 * 2)
        m.drops.labels(**labels, reason="queue_full").inc(step % 2)
        m.swaps.labels(**labels).inc()
        m.swap_seconds.labels(**labels).observe(0.004 + 0.001 * (step % 5))
        s["tokens"].inc(900)
        s["sglang:spec_accept_length"].set(2.6 + 0.1 * v)
        s["sglang:gen_throughput"].set(880.0)
        s["sglang:num_running_reqs"].set(8)
        s["sglang:spec_num_steps"].set(3)
        m.draft_tokens.labels(**labels).inc(600)
        m.accepted_tokens.labels(**labels).inc(400 + 10 * v)
        m.verify_steps.labels(**labels).inc(200)
    trainer["loss"].set(2.0 / (1 + 0.1 * step))
    trainer["tokens"].inc(5000)
    trainer["lag"].set(120 - step)
    trainer["pending"].set(16)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def api(base: str, path: str, **params: str) -> Any:
    url = f"{base}{path}?{urllib.parse.urlencode(params)}"
    with urllib.request.urlopen(url, timeout=10) as r:
        body = json.loads(r.read())
    assert body["status"] == "success", body
    return body["data"]


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real Prometheus scraping four loopback targets every second; yields its base URL."""
    binary = system_binary("prometheus")
    stable_reg, stable = engine_registry(3, [0.8, 0.8, 0.8, 0.02, 0.02, 0.02, 0.6], seed=1)
    canary_reg, canary = engine_registry(4, [0.8, 0.8, 0.8, 0.02, 0.02, 0.02, 0.7], seed=2)
    trainer_reg, trainer = trainer_registry()
    ksm_reg = CollectorRegistry()
    ksm_reg.register(Static(ksm_families(rollout_objects())))
    targets = []
    servers = []
    for reg, labels in ((stable_reg, {"pod": f"{DEPLOYMENT}-7d9f-a"}),
                        (canary_reg, {"pod": f"{DEPLOYMENT}-7d9f-b"}),
                        (trainer_reg, {"pod": f"{DEPLOYMENT}-trainer-0"}),
                        (ksm_reg, {"job_kind": "kube-state-metrics"})):
        server, _ = start_http_server(0, addr="127.0.0.1", registry=reg)
        servers.append(server)
        # The PodMonitor's relabeling puts the pod label tide.dev/deployment on every target as `deployment`.
        static = {"deployment": DEPLOYMENT, **labels} if "job_kind" not in labels else {}
        targets.append({"targets": [f"127.0.0.1:{server.server_port}"], "labels": static})
    stop = threading.Event()

    def ticker() -> None:
        step = 0
        while not stop.wait(0.25):
            tick([stable, canary], trainer, step)
            step += 1

    feeder = threading.Thread(target=ticker, daemon=True)
    feeder.start()
    work = tmp_path_factory.mktemp("prometheus")
    config = {"global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
              "scrape_configs": [{"job_name": "tide", "honor_labels": True, "static_configs": targets}]}
    (work / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = _free_port()
    proc = subprocess.Popen([binary, f"--config.file={work / 'prometheus.yml'}",
                             f"--storage.tsdb.path={work / 'data'}", f"--web.listen-address=127.0.0.1:{port}",
                             "--log.level=warn"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: _ready(base, proc), timeout=30, what="Prometheus to be ready")
        # Four healthy scrapes of every target, so that rate() over 5 s has samples to work with.
        wait_for(lambda: _scraped(base, len(targets)), timeout=30, what="4 scrapes of every target")
        yield base
    finally:
        stop.set()
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        for s in servers:
            s.shutdown()


def _ready(base: str, proc: subprocess.Popen[bytes]) -> bool:
    if proc.poll() is not None:
        raise AssertionError(f"prometheus exited: {proc.stderr.read().decode() if proc.stderr else ''}")
    try:
        with urllib.request.urlopen(f"{base}/-/ready", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def _scraped(base: str, n: int) -> bool:
    result = api(base, "/api/v1/query", query="count_over_time(up[30s]) >= 4 and up == 1")["result"]
    return len(result) == n


@pytest.mark.parametrize(("dashboard", "title", "expr"), QUERIES, ids=[f"{d}:{t}:{i}" for i, (d, t, _) in
                                                                        enumerate(QUERIES)])
def test_prometheus_answers_every_dashboard_query(prometheus: str, dashboard: str, title: str, expr: str) -> None:
    result = api(prometheus, "/api/v1/query", query=concrete(expr))["result"]
    assert result, f"{dashboard} / {title}: no series for {concrete(expr)}"
    values = [float(r["value"][1]) for r in result]
    assert any(math.isfinite(v) for v in values), f"{dashboard} / {title}: only NaN/Inf {values}"


def test_queries_filter_by_deployment(prometheus: str) -> None:
    """The $deployment variable does select: another deployment's name empties every panel."""
    for _, title, expr in QUERIES:
        assert api(prometheus, "/api/v1/query", query=concrete(expr, "other"))["result"] == [], title


def test_deployment_variable_lists_the_deployment(prometheus: str) -> None:
    query = json.loads(DASHBOARDS[0].read_text())["templating"]["list"][1]["query"]
    selector, label = re.fullmatch(r"label_values\((.+), (\w+)\)", query).groups()
    values = api(prometheus, f"/api/v1/label/{label}/values", **{"match[]": selector})
    assert values == [DEPLOYMENT]


def test_controller_series_come_from_real_decisions(prometheus: str) -> None:
    """The drift drove the real controller through a switch, a probe and a change point."""
    for name in ("tide_controller_switches_total", "tide_controller_probes_total",
                 "tide_controller_changepoint_total"):
        result = api(prometheus, "/api/v1/query", query=f"sum({name})")["result"]
        assert result and float(result[0]["value"][1]) > 0, name
    pods = api(prometheus, "/api/v1/query", query="max by (pod) (tide_draft_version)")["result"]
    assert {r["metric"]["pod"]: r["value"][1] for r in pods} == {f"{DEPLOYMENT}-7d9f-a": "3",
                                                                  f"{DEPLOYMENT}-7d9f-b": "4"}
