"""`tide bench capture --quick --json` end to end through the real CLI (no speed assertions: benchmarks show speed)."""

import json
import subprocess
import sys
from pathlib import Path


def test_bench_capture_quick_json(tmp_path: Path):
    out = subprocess.run(
        [sys.executable, "-m", "tide_sglang.cli", "bench", "capture", "--quick", "--json", "--out", str(tmp_path),
         "-p", "seconds=0.2"],
        capture_output=True, text=True, timeout=240, check=True,
    )
    report = json.loads(out.stdout)  # exactly one JSON object on stdout
    assert report["name"] == "capture" and report["quick"] is True
    assert {g["name"] for g in report["goals"]} == {"loss_pct_bs8", "loss_pct_bs48", "sched_share_pct_bs8",
                                                    "sched_share_pct_bs48", "drops"}
    for g in report["goals"]:
        assert set(g) == {"name", "value", "unit", "target", "met"}
    figures = report["figures"]
    assert figures["params"]["seconds"] == 0.2  # -p reaches the benchmark
    assert [r["batch_size"] for r in figures["results"]] == [8, 48]
    for r in figures["results"]:
        assert r["rate_alone"] > 0 and r["rate_capture"] > 0 and r["captured_tokens"] > 0, r
        assert r["sched_capture_us"] > 0 and r["helper_cpu_us"] > 0 and 0 < r["sched_share_pct"] < 100, r
    assert set(figures["ratio_capture_over_alone"]) == {"8", "48"}
    assert list(tmp_path.glob("capture-*.json")), "the JSON report is written"


def test_an_unknown_bench_parameter_is_a_usage_error(tmp_path: Path):
    out = subprocess.run([sys.executable, "-m", "tide_sglang.cli", "bench", "capture", "--out", str(tmp_path),
                          "-p", "nope=1"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "capture has no parameter nope (it takes: " in out.stderr
    assert not list(tmp_path.glob("*.json")), "nothing ran"
