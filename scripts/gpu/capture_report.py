"""Merge the capture phases of one or more `sglang_run.py` reports (one per `run` call) into the committed result
docs/results/sglang-capture-<date>.json, with a `goals` list like `tide bench --json`.

    python scripts/gpu/capture_report.py OUT.json RUN1/sglang-run.json [RUN2/sglang-run.json ...]

Per steady batch: SGLang's decode tokens/s of every server (in run order), capture-on / no-plugin (the mean of
the no-plugin servers), the spread between the no-plugin servers, TIDE's scheduler-thread µs per batch and its
share of the batch time (batch time = running requests x accept length / decode tokens/s), and rows dropped; with
the nospec/zero/zeroskip servers, 0 pinned steps (with and without the draft extend) over no speculation.
A ratio goal is met when the ratio reaches 0.99 or the gap is inside the no-plugin servers' spread.
"""

import json
import statistics
import sys
from pathlib import Path
from typing import Any


def _goal(name: str, value: float | None, unit: str, op: str, target: float, met: bool | None = None) -> dict:
    if met is None:
        met = value is not None and (value <= target if op == "<=" else value >= target)
    return {"name": name, "value": value, "unit": unit, "target": f"{op} {target:g}", "met": bool(met)}


def per_batch(servers: list[dict]) -> dict[int, dict[str, Any]]:
    out: dict[int, dict[str, Any]] = {}
    for s in servers:
        for row in s.get("rows", []):
            b = out.setdefault(row["batch"], {"tokens_per_s": {}, "accept_length": {}})
            b["tokens_per_s"][s["server"]] = row.get("decode_tokens_per_s")
            b["accept_length"][s["server"]] = row.get("accept_length")
            b.setdefault("steady_s", {})[s["server"]] = row.get("steady_s")
            if s["server"] == "on":
                b.update(tide_us_per_batch=row.get("tide_us_per_batch"), drops=row.get("drops"),
                         captured_tokens=row.get("captured_tokens"))
            if s["server"] == "rate0":
                b["tide_us_per_batch_rate0"] = row.get("tide_us_per_batch")
    for bs, b in out.items():
        off = [v for k, v in b["tokens_per_s"].items() if k.startswith("off") and v]
        on, rate0 = b["tokens_per_s"].get("on"), b["tokens_per_s"].get("rate0")
        base = statistics.mean(off) if off else None
        b["no_plugin_spread"] = (max(off) - min(off)) / base if len(off) > 1 else None
        b["ratio_on"] = on / base if on and base else None
        b["ratio_rate0"] = rate0 / base if rate0 and base else None
        nospec = b["tokens_per_s"].get("nospec")  # issue 15: what 0 steps costs inside a speculative server
        for name in ("zero", "zeroskip"):
            value = b["tokens_per_s"].get(name)
            b[f"ratio_{name}_over_nospec"] = value / nospec if value and nospec else None
        accept = b["accept_length"].get("on")
        if on and accept and b.get("tide_us_per_batch") is not None:
            batch_s = bs * accept / on
            b["batch_ms"] = batch_s * 1e3
            b["tide_share_pct"] = 100 * b["tide_us_per_batch"] / 1e6 / batch_s
    return dict(sorted(out.items()))


def goals(batches: dict[int, dict[str, Any]], truth: dict | None) -> list[dict]:
    out = []
    for bs, b in batches.items():
        ratio, spread = b.get("ratio_on"), b.get("no_plugin_spread") or 0.0
        out.append(_goal(f"capture_over_no_plugin_bs{bs}", ratio, "x", ">=", 0.99,
                         met=ratio is not None and (ratio >= 0.99 or 1 - ratio <= spread)))
        out.append(_goal(f"tide_scheduler_share_pct_bs{bs}", b.get("tide_share_pct"), "%", "<=", 1))
        out.append(_goal(f"drops_bs{bs}", b.get("drops"), "batches", "<=", 0))
    if truth is not None:
        out.append(_goal("truth_rows_different", truth.get("rows_mismatched"), "rows", "<=", 0,
                         met=truth.get("ok") and truth.get("rows_missing_in_capture") == 0))
    return out


def main(argv: list[str]) -> None:
    out, runs = Path(argv[1]), [json.loads(Path(p).read_text()) for p in argv[2:]]
    servers = [s for r in runs for s in r.get("phases", {}).get("capture", {}).get("servers", [])]
    truth = next((r["phases"]["truth"] for r in runs if "truth" in r.get("phases", {})), None)
    batches = per_batch(servers)
    report = {"name": "sglang-capture", "device": next((r.get("device") for r in runs), None),
              "versions": next((r.get("versions") for r in runs if r.get("versions")), None),
              "args": next((r.get("args") for r in runs), None), "server_order": [s["server"] for s in servers],
              "batches": batches, "truth": truth, "servers": servers, "goals": goals(batches, truth)}
    out.write_text(json.dumps(report, indent=1) + "\n")
    for g in report["goals"]:
        print(f"{g['name']:40s} {g['value']!s:>24} {g['target']:>8} {'met' if g['met'] else 'MISSED'}")


if __name__ == "__main__":
    main(sys.argv)
