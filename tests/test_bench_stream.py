"""`tide bench stream --quick --json` end to end through the real CLI (no speed assertions: benchmarks show speed)."""

import json
import subprocess
import sys
from pathlib import Path


def test_bench_stream_quick_json(tmp_path: Path):
    out = subprocess.run(
        [sys.executable, "-m", "tide_sglang.cli", "bench", "stream", "--quick", "--json", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=240, check=True,
    )
    report = json.loads(out.stdout)  # exactly one JSON object on stdout
    assert report["name"] == "stream" and report["quick"] is True
    assert {g["name"] for g in report["goals"]} >= {"enqueue_p99_us", "llama8b_sustained_mib_s", "llama8b_lost"}
    for g in report["goals"]:
        assert set(g) == {"name", "value", "unit", "target", "met"}
    results = report["figures"]["results"]
    assert {(r["shape"], r["transport"]) for r in results} == {
        (s, t) for s in ("smollm2-135m", "llama-3.1-8b", "gpt-oss-120b") for t in ("redis-stream", "torch.save-files")
    }
    for r in results:
        assert r["lost"] == 0 and r["mib_s"] > 0, r  # flow-controlled: everything produced was consumed
    assert list(tmp_path.glob("stream-*.json")), "the JSON report is written"
