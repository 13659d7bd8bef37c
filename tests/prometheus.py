"""A real Prometheus (Debian's `prometheus` package) scraping loopback targets, and the dashboards' queries.

`Prometheus` runs the binary with a static scrape configuration; `dashboard_queries` lists every target of every
shipped dashboard; `concrete` fills in the Grafana variables as Grafana would send them.
"""

import json
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from tests.chart_tools import CHART, system_binary

DASHBOARDS = sorted((CHART / "dashboards").glob("*.json"))
SCRAPE_S = 1
RATE_WINDOW = "5s"  # $__rate_interval at a 1 s scrape interval: max(4 x scrape, step + scrape)


class Query(BaseModel):
    """One target of one panel."""

    dashboard: str
    panel: str
    expr: str
    instant: bool  # a table or stat panel's instant query; else Grafana asks for a range

    @property
    def over_sglang(self) -> bool:
        """Reads SGLang's own series, which only a GPU run of SGLang has."""
        return "sglang" in self.expr


def panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    return [q for p in dashboard["panels"] for q in (p, *p.get("panels", []))]


def dashboard_queries() -> list[Query]:
    return [Query(dashboard=path.name, panel=p["title"], expr=t["expr"], instant=bool(t.get("instant")))
            for path in DASHBOARDS for p in panels(json.loads(path.read_text())) for t in p.get("targets", [])]


def concrete(expr: str, deployment: str, range_s: int = 60) -> str:
    """The expression as Grafana sends it, with the dashboard variables filled in."""
    return (expr.replace("$deployment", deployment).replace("$__rate_interval", RATE_WINDOW)
            .replace("$__range", f"{range_s}s"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Target(BaseModel):
    port: int
    labels: dict[str, str] = {}  # target labels, as the chart's PodMonitor relabeling adds them


class Prometheus:
    """`with Prometheus(targets, workdir) as prom:` scrapes every target each second (honor_labels, as the chart's
    monitors); `prom.query(...)` and `prom.query_range(...)` go through its HTTP API."""

    def __init__(self, targets: list[Target], workdir: Path) -> None:
        self.targets, self.workdir = targets, workdir
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> "Prometheus":
        static = [{"targets": [f"127.0.0.1:{t.port}"], "labels": t.labels} for t in self.targets]
        config = {"global": {"scrape_interval": f"{SCRAPE_S}s", "scrape_timeout": f"{SCRAPE_S}s",
                             "evaluation_interval": f"{SCRAPE_S}s"},
                  "scrape_configs": [{"job_name": "tide", "honor_labels": True, "static_configs": static}]}
        (self.workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.log = (self.workdir / "prometheus.log").open("wb")
        self.proc = subprocess.Popen([system_binary("prometheus"), f"--config.file={self.workdir / 'prometheus.yml'}",
                                      f"--storage.tsdb.path={self.workdir / 'data'}",
                                      f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
                                     stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while not self._ready():
            assert time.monotonic() < deadline, "Prometheus did not become ready in 30 s"
            time.sleep(0.2)
        return self

    def __exit__(self, *_: object) -> None:
        assert self.proc is not None
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()

    def _ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"prometheus exited: {(self.workdir / 'prometheus.log').read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"{self.base}/-/ready", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def api(self, path: str, **params: str) -> Any:
        with urllib.request.urlopen(f"{self.base}{path}?{urllib.parse.urlencode(params)}", timeout=10) as r:
            body = json.loads(r.read())
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        return self.api("/api/v1/query", query=expr)["result"]

    def query_range(self, expr: str, start: float, end: float) -> list[dict[str, Any]]:
        return self.api("/api/v1/query_range", query=expr, start=f"{start:.3f}", end=f"{end:.3f}",
                        step=f"{SCRAPE_S}s")["result"]

    def up(self) -> dict[str, float]:
        """instance -> up, for every target."""
        return {r["metric"]["instance"]: float(r["value"][1]) for r in self.query("up")}
