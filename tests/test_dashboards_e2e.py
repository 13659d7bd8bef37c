"""Every expression of every shipped Grafana dashboard has data, from the real components.

tide_* expressions: a real Prometheus scrapes the CPU loop of tests/test_loop_e2e.py while a version is published
and canaried: two `tide engine` pods (the reference engine with TIDE's controller on a cost profile, serving the
plugin's and the controller's series on TIDE_ENGINE_METRICS_PORT), the real `tide train` process
(TIDE_TRAIN_METRICS_PORT) and the real operator (kopf against kmock, its rollout-state gauges on
TIDE_OPERATOR_METRICS_PORT), through one real redis-server. Each expression is then asked as Grafana asks it (a
range over the run, or an instant query for table and stat panels) and must return at least one series.

sglang:* expressions: SGLang's own series exist only in a GPU run of SGLang. They are asked of a real Prometheus
scraping the sglang:* families of the newest /metrics snapshot of such a run, committed as
docs/results/sglang-metrics-*.prom (SGLang 0.5.17 with the TIDE plugin on).

Stood in for: the Kubernetes API (kmock, which runs no pods: the test marks the inference replicas ready), the GPU
SGLang pods (the reference engine: same protocol, the plugin's metric definitions), and Grafana (its variables are
filled in here).
"""

import http.server
import json
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from tide_operator.emulator import Cluster, Operator

from tests.chart_tools import ROOT
from tests.helpers import wait_for
from tests.operator.harness import ApiServer, cluster_fixture, operator_fixture  # noqa: F401
from tests.prometheus import DASHBOARDS, Prometheus, Query, Target, concrete, dashboard_queries, free_port
from tests.test_loop_e2e import (
    HEARTBEAT_S,
    NAME,
    NS,
    PODS,
    Processes,
    publish_worse,
    registry_wiring,
    served,
    specforge_draft,
    tide,
    watching,
)
from tide_sglang.control import Profile
from tide_sglang.draft import open_registry
from tide_sglang.engine.online import CPU_TRAINER_ENV
from tide_sglang.stream.server import LocalRedis

QUERIES = dashboard_queries()
SNAPSHOTS = sorted((ROOT / "docs/results").glob("sglang-metrics-*.prom"))
# Verify costs the same up to 1024 tokens and a draft step nearly nothing: speculating pays at any acceptance, so
# the controller keeps drafting (and the canary gets its tokens) while its decisions and inputs are all exported.
PROFILE = Profile.roofline(floor_s=0.05, per_token_s=1e-5, draft_s=1e-6)
CONTROLLER_ENV = {"TIDE_CONTROL_WINDOW_STEPS": "8", "TIDE_CHANGEPOINT_WARMUP": "5",
                  "TIDE_CONTROL_PROBE_INTERVAL": "2", "TIDE_CONTROL_SWITCH_PATIENCE": "2"}


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Processes]:
    """The loop's processes, with a trainer that evaluates (loss, held-out acceptance) after a few steps."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TIDE_")}
    procs = Processes(tmp_path, {**env, **CPU_TRAINER_ENV, "TIDE_TRAIN_EVAL_INTERVAL_STEPS": "5",
                                 "TIDE_TRAIN_MIN_HELDOUT_ROWS": "16"})
    yield procs
    procs.close()


def test_queries_cover_every_panel() -> None:
    """The split below leaves nothing out: every target is a tide_* or an sglang:* expression."""
    assert QUERIES and all(q.over_sglang or "tide_" in q.expr for q in QUERIES)
    assert {q.over_sglang for q in QUERIES} == {True, False}


def deployment_variable() -> tuple[str, str]:
    """The series selector and label of the dashboards' `deployment` variable (label_values(selector, label))."""
    variables = {json.loads(path.read_text())["templating"]["list"][1]["query"] for path in DASHBOARDS}
    assert len(variables) == 1, variables
    selector, label = re.fullmatch(r"label_values\((.+), (\w+)\)", variables.pop()).groups()
    return selector, label


def missing(prom: Prometheus, queries: list[Query], start: float, deployment: str = NAME) -> list[str]:
    """The queries that return no series: range queries over [start, now], instant ones at now."""
    end = time.time()
    out = []
    for q in queries:
        expr = concrete(q.expr, deployment, range_s=max(int(end - start), 1))
        result = prom.query(expr) if q.instant else prom.query_range(expr, start, end)
        if not result:
            out.append(f"{q.dashboard} / {q.panel}: {expr}")
    return out


# -- sglang:* against a GPU run's /metrics -------------------------------------------------------------------------


def sglang_families(snapshot: Path) -> str:
    """The sglang:* families of a /metrics snapshot (Prometheus text format); the tide_* ones the snapshot also
    holds are the GPU run's, and the CPU loop above is what must feed those."""
    def name(line: str) -> str:
        parts = line.split()
        return parts[2] if line.startswith("# ") and len(parts) > 2 else line.split("{")[0].split(" ")[0]

    return "".join(line + "\n" for line in snapshot.read_text().splitlines()
                   if line.strip() and name(line).startswith("sglang"))


def test_only_the_sglang_families_of_a_snapshot_are_served(tmp_path: Path) -> None:
    snapshot = tmp_path / "sglang-metrics-x.prom"
    snapshot.write_text("# HELP sglang:gen_throughput Throughput\n# TYPE sglang:gen_throughput gauge\n"
                        'sglang:gen_throughput{model_name="m"} 880.0\n\n'
                        "# HELP tide_draft_version Draft version\n# TYPE tide_draft_version gauge\n"
                        'tide_draft_version{deployment="gpu-run"} 3.0\n'
                        "# TYPE sglang:generation_tokens_total counter\nsglang:generation_tokens_total 9.0\n")
    assert sglang_families(snapshot).splitlines() == [
        "# HELP sglang:gen_throughput Throughput", "# TYPE sglang:gen_throughput gauge",
        'sglang:gen_throughput{model_name="m"} 880.0', "# TYPE sglang:generation_tokens_total counter",
        "sglang:generation_tokens_total 9.0"]


@pytest.fixture
def snapshot_server() -> Iterator[int]:
    """Serves the newest snapshot's sglang:* families on loopback, as an SGLang pod's /metrics would."""
    if not SNAPSHOTS:
        pytest.skip("no /metrics snapshot of a GPU SGLang run under docs/results/sglang-metrics-*.prom yet: the "
                    "sglang:* expressions are unchecked (the tide_* ones are checked by the CPU loop test)")
    body = sglang_families(SNAPSHOTS[-1]).encode()
    assert body, f"{SNAPSHOTS[-1].name} holds no sglang:* series"

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def test_every_sglang_expression_has_data_in_the_gpu_snapshot(snapshot_server: int, tmp_path: Path) -> None:
    queries = [q for q in QUERIES if q.over_sglang]
    pod = {"deployment": NAME, "pod": f"{NAME}-gpu-0"}  # the labels the chart's PodMonitor adds
    with Prometheus([Target(port=snapshot_server, labels=pod)], tmp_path) as prom:
        start = time.time()
        # rate() needs two samples in its window: wait for three scrapes
        wait_for(lambda: len(prom.query("count_over_time(up[30s]) >= 3 and up == 1")) == 1, timeout=30,
                 what="three scrapes of the snapshot")
        assert missing(prom, queries, start) == [], SNAPSHOTS[-1].name
        assert all(not prom.query(concrete(q.expr, "other")) for q in queries)  # $deployment does select


# -- tide_* against the CPU loop -----------------------------------------------------------------------------------


@pytest.mark.asyncio
@pytest.mark.kmock(cls=ApiServer)
@pytest.mark.slow
@pytest.mark.timeout(300)
async def test_every_tide_expression_has_data_from_the_cpu_loop(
        cluster: Cluster, operator: Operator, redis_server: LocalRedis, processes: Processes, tmp_path: Path,
        request: pytest.FixtureRequest) -> None:
    import tide_operator.handlers

    spec_registry, location, registry_env = registry_wiring("directory", request, tmp_path)
    imported = subprocess.run([sys.executable, "-m", "tide_sglang.cli", "import",
                               str(specforge_draft(tmp_path / "specforge")), "--registry", location],
                              capture_output=True, text=True, env={**processes.env, **registry_env}, timeout=120)
    assert imported.returncode == 0, imported.stderr
    profile = tmp_path / "profile.json"
    profile.write_text(PROFILE.model_dump_json())
    ports = {name: free_port() for name in (*PODS, "trainer")}
    targets = [Target(port=ports[p], labels={"deployment": NAME, "pod": p}) for p in PODS]
    targets += [Target(port=ports["trainer"], labels={"deployment": NAME, "pod": f"{NAME}-trainer-0"}),
                Target(port=tide_operator.handlers.CONFIG.metrics_port)]  # its series carry namespace, deployment
    queries = [q for q in QUERIES if not q.over_sglang]
    r = redis.Redis.from_url(redis_server.url)
    common = {"TIDE_NAMESPACE": NS, "TIDE_DEPLOYMENT": NAME, "TIDE_REDIS_URL": redis_server.url, **registry_env}

    async def until(predicate: object, timeout: float, what: str) -> None:
        await watching(processes, cluster, predicate, timeout, what)

    with Prometheus(targets, tmp_path) as prom:
        start = time.time()
        await cluster.create(tide(redis_server.url, spec_registry, location))
        processes.start("trainer", ["-m", "tide_sglang.cli", "-v", "train", "--device", "cpu", "--checkpoint-dir",
                                    str(tmp_path / "ckpt"), "--consumer", "trainer"],
                        **common, TIDE_TRAIN_METRICS_PORT=str(ports["trainer"]))
        for pod in PODS:
            processes.start(pod, ["-m", "tide_sglang.cli", "engine", "--version", "0", "--schedule", "writing:12",
                                  "--repeat", "--max-new-tokens", "24"],
                            **common, **CONTROLLER_ENV, TIDE_POD_NAME=pod, TIDE_HEARTBEAT_S=f"{HEARTBEAT_S:g}",
                            TIDE_SWAP_POLL_S="0.3", TIDE_STATS_FLUSH_S="0.5", TIDE_CONTROL_PROFILE=str(profile),
                            TIDE_ENGINE_METRICS_PORT=str(ports[pod]))
        await until(lambda: cluster.get("Deployment", NAME), 30, "the inference Deployment")
        cluster.mark_ready(NAME)  # kmock runs no pods: the processes above are them
        await until(lambda: served(r) == dict.fromkeys(PODS, 0), 90, "every pod serving the imported v0")

        # a version to canary (v0's weights again): swaps, canary routing, canary and stable acceptance
        version = publish_worse(open_registry(location), r, parent=0)
        await until(lambda: ((cluster.get("DraftVersion", f"{NAME}-v{version}") or {}).get("status") or {})
                    .get("stableAcceptance") is not None, 90, f"v{version} canaried and measured")
        left: list[str] = []

        def complete() -> bool:
            left[:] = missing(prom, queries, start)
            return not left

        try:
            await until(complete, 60, "every tide_* expression to return data")
        except AssertionError as e:
            raise AssertionError("no data for:\n" + "\n".join(left) + f"\n{e}") from None
        assert all(v == 1.0 for v in prom.up().values()), prom.up()
        for q in queries:  # $deployment does select: another deployment's name empties every panel
            assert not prom.query_range(concrete(q.expr, "other"), start, time.time()), q.panel
        selector, label = deployment_variable()
        assert prom.api(f"/api/v1/label/{label}/values", **{"match[]": selector}) == [NAME]
    r.close()
