"""The Grafana dashboards: valid against Grafana's dashboard schema, and every PromQL expression accepted by
promtool. That every expression returns data from the real components is tests/test_dashboards_e2e.py.
"""

import json
import subprocess
from pathlib import Path

import jsonschema
import pytest
import yaml

from tests.chart_tools import ROOT, system_binary
from tests.prometheus import DASHBOARDS, concrete, dashboard_queries, panels

# A copy of the workplace's shared/schemas file, kept in the repo so a clean CI checkout has it.
GRAFANA_SCHEMA = json.loads((ROOT / "tests/schemas/grafana-dashboard.jsonschema.json").read_text())
QUERIES = dashboard_queries()


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
    text = " ".join(q.expr for q in QUERIES)
    for metric in ("tide_draft_accepted_tokens_total", "sglang[:_]realtime_tokens_total", "tide_speculation_steps",
                   "tide_captured_tokens_total", "tide_captured_bytes_total", "tide_capture_drops_total",
                   "tide_stream_lag_entries", "tide_trainer_loss", "tide_trainer_heldout_acceptance",
                   "tide_trainer_tokens_total", "tide_draftversion_phase", "tide_controller_spec_steps",
                   "tide_controller_acceptance_ewma", "tide_trainer_trigger_active"):
        assert metric in text, metric


def test_promtool_accepts_every_expression(tmp_path: Path) -> None:
    promtool = system_binary("promtool")
    rules = [{"record": f"tide:dashboard:{i}", "expr": concrete(q.expr, "llama-chat")} for i, q in enumerate(QUERIES)]
    good = tmp_path / "dashboards.rules.yml"
    good.write_text(yaml.safe_dump({"groups": [{"name": "dashboards", "rules": rules}]}))
    run = subprocess.run([promtool, "check", "rules", str(good)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr
    assert f"SUCCESS: {len(rules)} rules found" in run.stdout
    bad = tmp_path / "bad.rules.yml"  # promtool does reject a broken expression
    bad.write_text(yaml.safe_dump({"groups": [{"name": "b", "rules": [{"record": "x", "expr": "sum by (a (x)"}]}]}))
    assert subprocess.run([promtool, "check", "rules", str(bad)], capture_output=True, timeout=60).returncode != 0
