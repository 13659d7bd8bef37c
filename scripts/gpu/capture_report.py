"""Merge the capture phases of one or more `sglang_run.py` reports (one per `run` call) into the committed result
docs/results/sglang-capture-<date>.json, with a `goals` list like `tide bench --json`.

    python scripts/gpu/capture_report.py OUT.json RUN1/sglang-run.json [RUN2/sglang-run.json ...]

Per steady batch: SGLang's decode tokens/s of every server (in run order), capture-on / no-plugin (the mean of
the no-plugin servers), the spread between the no-plugin servers, TIDE's scheduler-thread µs per batch and its
share of the batch time (batch time = running requests x accept length / decode tokens/s), and rows dropped; with
the nospec/zero/zeroskip servers, 0 pinned steps (with and without the draft extend) over no speculation.
A ratio goal is met when the median ratio reaches 0.99 or the gap is inside the spread between the no-plugin
servers of one call.
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


def per_batch(runs: list[list[dict]]) -> dict[int, dict[str, Any]]:
    """`runs`: the capture servers of each `run` call. Servers are named `name@k` (k: the call, from 1) when there
    are several calls; a ratio is taken within a call (the machine and its clocks change between calls), and the
    median over the calls is reported, each call's beside it."""
    out: dict[int, dict[str, Any]] = {}
    for k, servers in enumerate(runs, 1):
        for s in servers:
            key = s["server"] if len(runs) == 1 else f"{s['server']}@{k}"
            for row in s.get("rows", []):
                b = out.setdefault(row["batch"], {"tokens_per_s": {}, "accept_length": {}, "steady_s": {}})
                b["tokens_per_s"][key] = row.get("decode_tokens_per_s")
                b["accept_length"][key] = row.get("accept_length")
                b["steady_s"][key] = row.get("steady_s")
                if s["server"] == "on":
                    b.setdefault("tide_us_per_batch_runs", []).append(row.get("tide_us_per_batch"))
                    b["drops"] = b.get("drops", 0) + (row.get("drops") or 0)
                    b["captured_tokens"] = b.get("captured_tokens", 0) + (row.get("captured_tokens") or 0)
                if s["server"] == "rate0":
                    b.setdefault("tide_us_per_batch_rate0_runs", []).append(row.get("tide_us_per_batch"))
    calls = range(1, len(runs) + 1)
    for bs, b in out.items():
        rate = b["tokens_per_s"]

        def named(name: str, k: int, rate: dict[str, float | None] = rate) -> list[float]:
            """The rates of the servers called `name` (off, off2, ... are all "off") in call `k`."""
            return [v for key, v in rate.items() if v and key.split("@")[0].rstrip("0123456789") == name
                    and (len(runs) == 1 or key.endswith(f"@{k}"))]

        def ratios(name: str, base: str) -> list[float]:
            """`name` over `base` in each call that ran both (the mean of each's servers)."""
            return [statistics.mean(named(name, k)) / statistics.mean(named(base, k))
                    for k in calls if named(name, k) and named(base, k)]

        # the spread between the no-plugin servers of one call (across calls it would also hold the machine's)
        spreads = [(max(off) - min(off)) / statistics.mean(off) for off in (named("off", k) for k in calls)
                   if len(off) > 1]
        b["no_plugin_spread"] = max(spreads) if spreads else None
        for name in ("on", "rate0"):
            b[f"ratio_{name}_runs"] = ratios(name, "off")
            b[f"ratio_{name}"] = statistics.median(b[f"ratio_{name}_runs"]) if b[f"ratio_{name}_runs"] else None
        for name in ("zero", "zeroskip"):  # issue 15: what 0 steps costs inside a speculative server
            over = ratios(name, "nospec")
            b[f"ratio_{name}_over_nospec"] = statistics.median(over) if over else None
        us = [u for u in b.get("tide_us_per_batch_runs", []) if u is not None]
        b["tide_us_per_batch"] = statistics.median(us) if us else None
        on = [v for key, v in rate.items() if v and key.split("@")[0] == "on"]
        accept = [v for key, v in b["accept_length"].items() if v and key.split("@")[0] == "on"]
        if on and accept and b["tide_us_per_batch"] is not None:
            batch_s = bs * statistics.mean(accept) / statistics.mean(on)
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
    per_run = [r.get("phases", {}).get("capture", {}).get("servers", []) for r in runs]
    servers = [s for run in per_run for s in run]
    truth = next((r["phases"]["truth"] for r in runs if "truth" in r.get("phases", {})), None)
    batches = per_batch(per_run)
    report = {"name": "sglang-capture", "device": next((r.get("device") for r in runs), None),
              "versions": next((r.get("versions") for r in runs if r.get("versions")), None),
              "args": next((r.get("args") for r in runs), None),
              "server_order": [[s["server"] for s in run] for run in per_run],
              "batches": batches, "truth": truth, "servers": servers, "goals": goals(batches, truth)}
    out.write_text(json.dumps(report, indent=1) + "\n")
    for g in report["goals"]:
        print(f"{g['name']:40s} {g['value']!s:>24} {g['target']:>8} {'met' if g['met'] else 'MISSED'}")


if __name__ == "__main__":
    main(sys.argv)
