"""Checks of the TIDE plugin inside a real SGLang server on a GPU (issue: run the plugin on the H100).

Run on the GPU machine after scripts/gpu/setup-sglang.sh (source $GPU_RUN_HOME/env.sh first):

    python3 scripts/gpu/sglang_run.py --out $OUT [--phases truth,swap,control,throughput] [--no-cuda-graph]

Each phase starts `tide serve` (SmolLM2-135M target, the older of the two carried registry versions as draft,
a local redis-server) and checks one thing against SGLang itself; every figure goes to OUT/sglang-run.json and
each server's log to OUT/server-<name>.log. A phase that fails is recorded and the next one still runs.

- truth: the rows TIDE captured to the stream equal SGLang's own `--enable-return-hidden-states` output for the
  same requests (prefill and decode rows, bit for bit, and the emitted tokens).
- swap: a newer registry version is published while 48 requests are in flight: no request fails, the plugin's
  `tide_draft_version` moves, the pod's heartbeat reports the new version, and SGLang's `/weights_checker`
  checksums of the draft equal the new version's tensors; then a corrupt version is refused and serving goes on.
  Acceptance per version from the stats hash.
- control: with TIDE_CONTROL_PROFILE set, the steps SGLang runs per batch-size slot follow TIDE's controller.
- capture: the capture cost (docs/sglang.md, "Capture cost"): servers with identical arguments and pinned steps
  (one candidate, 3 draft steps), in the order --capture-servers gives (no plugin, plugin capturing, plugin at
  sample rate 0, no plugin again), each serving rounds of short waves per steady batch size with about
  --capture-seconds of decode, read from SGLang's own log; TIDE's scheduler-thread time per batch from
  tide_plugin_scheduler_seconds.
- collect: a static draft from SGLang's own captures: a plugin-on server serves --collect-requests "train"
  prompts of bench.static, then `bench.static train --stream-url` trains on what the plugin captured and writes
  $GPU_RUN_HOME/static (the static phase then serves it without --static-dir). Not under OUT: a call's OUT is
  gone at the next call, and collect and static together outlast one call's 10 minutes, so the static phase can
  run in the next call (`--phases static --static-dir $GPU_RUN_HOME/static`) while the machine stays warm.
- static: the static draft of `python -m tide_sglang.bench.static train` served by SGLang itself at 3 pinned steps
  on the evaluation prompts (MT-Bench writing "eval" side): its accept length (issue: a draft worth serving).
- throughput: decode tokens/s with the plugin (capture on) and without it (TIDE_ENABLED unset), same
  server arguments, alternated `--repeats` times: SGLang's own decode throughput at a steady batch (its "Decode
  batch" log lines, read back by `decode_log`) and the client's wall-clock tokens/s, prefill included.
"""

import argparse
import concurrent.futures as cf
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import requests
import torch
from prometheus_client.parser import text_string_to_metric_families

from tide_sglang import keys, rollout
from tide_sglang.draft import DirectoryRegistry
from tide_sglang.draft.target import DEFAULT_TARGET, resolve
from tide_sglang.stream import codec, connect
from tide_sglang.stream.server import LocalRedis, free_port
from tide_sglang.workloads.registry import load_workload

DEPLOYMENT = "gpu"
NAMESPACE = "default"
POD = "gpu-0"
HEARTBEAT_S = 1.0
HOME = Path(os.environ.get("GPU_RUN_HOME", "/root/tide"))


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


class OutOfTime(RuntimeError):
    """Starting this step would outlast --budget-s: skipped, so what ran is saved before the call's limit."""


DEADLINE = float("inf")  # time.monotonic() by which the run must have saved and exited (--budget-s)
SERVER_START_S = 150.0  # a server's start on the H200 (60-145 s seen) before it serves anything
COLLECT_CONCURRENCY = 256  # the collect phase's requests in flight: 128 served 2,048 prompts in 111 s


def need(seconds: float, what: str) -> None:
    """Raise OutOfTime unless `seconds` are left before the deadline."""
    left = DEADLINE - time.monotonic()
    if left < seconds:
        raise OutOfTime(f"{what} skipped: {left:.0f} s left of --budget-s, it needs about {seconds:.0f} s")


class Server:
    """`tide serve` (or plain SGLang with `plugin=False`) in its own process group, log to OUT."""

    def __init__(self, name: str, out: Path, args: list[str], env: dict[str, str], plugin: bool = True,
                 speculative: bool = True):
        need(SERVER_START_S, f"server {name}")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = out / f"server-{name}.log"
        base = [sys.executable, "-c", "from tide_sglang.cli import main; main()", "serve",
                "--host", "127.0.0.1", "--port", str(self.port), *args]
        env = {**os.environ, **env}
        if not plugin:  # SGLang itself, with TIDE installed but not enabled: its entry point patches nothing
            dry = subprocess.run([*base, "--tide-dry-run"], env=env, capture_output=True, text=True, check=True)
            base = dry.stdout.splitlines()[0].split()  # SGLang's command; a start-up profile's lines follow
            if not speculative:
                base = without_speculation(base)
            env.pop("TIDE_ENABLED", None)
        self.command = base
        self.proc = subprocess.Popen(base, env=env, stdout=self.log_path.open("w"), stderr=subprocess.STDOUT,
                                     start_new_session=True)
        self.started = time.time()

    def wait_ready(self, timeout: float = 420) -> float:
        while time.time() - self.started < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}; tail:\n{self.tail()}")
            try:
                if requests.get(f"{self.url}/health_generate", timeout=5).status_code == 200:
                    return time.time() - self.started
            except requests.RequestException:
                pass
            time.sleep(2)
        raise TimeoutError(f"server not ready after {timeout} s; tail:\n{self.tail()}")

    def tail(self, n: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()

    def generate(self, input_ids: list[int], max_new_tokens: int, rid: str | None = None, ignore_eos: bool = True,
                 **extra: Any) -> dict:
        body = {"input_ids": input_ids, "sampling_params": {"temperature": 0, "max_new_tokens": max_new_tokens,
                                                            "ignore_eos": ignore_eos}, **extra}
        if rid is not None:
            body["rid"] = rid
        r = requests.post(f"{self.url}/generate", json=body, timeout=300)
        r.raise_for_status()
        return r.json()

    def metrics_text(self) -> str:
        return requests.get(f"{self.url}/metrics", timeout=10).text

    def metrics(self) -> dict[str, float]:
        """TIDE's samples and SGLang's accept length, keyed `name{label="value",...}`."""
        text = self.metrics_text()
        return {s.name + "{" + ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items())) + "}": s.value
                for family in text_string_to_metric_families(text) for s in family.samples
                if s.name.startswith(("tide_", "sglang:spec_accept_length"))}

    def draft_checksums(self) -> dict[str, str]:
        r = requests.post(f"{self.url}/weights_checker", json={"action": "checksum"}, timeout=60)
        found: dict[str, str] = {}

        def walk(node: Any) -> None:
            if isinstance(node, dict):
                for k, v in node.items():
                    if k == "checksums" and isinstance(v, dict):
                        found.update({n[len("draft."):]: h for n, h in v.items() if n.startswith("draft.")})
                    else:
                        walk(v)
            elif isinstance(node, list):
                for v in node:
                    walk(v)

        walk(r.json())
        return found


_POOL: list[list[int]] = []


def prompts(tokenizer: Any, n: int, offset: int = 0) -> list[list[int]]:
    """`n` chat-templated prompts, interleaving writing, code, math and chat (snapshots of seed 0), from `offset`."""
    if not _POOL:
        by_domain = [load_workload(name, 256, 0) for name in ("writing", "code", "math", "chat")]
        _POOL.extend(chat_ids(tokenizer, p.text) for group in itertools.zip_longest(*by_domain)
                     for p in filter(None, group))
    return [_POOL[(offset + i) % len(_POOL)][:768] for i in range(n)]


def chat_ids(tokenizer: Any, text: str) -> list[int]:
    """One user turn, chat-templated as a client of SGLang's chat endpoint would send it."""
    ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)


def run_many(server: Server, ids: list[list[int]], max_new_tokens: int, concurrency: int,
             **extra: Any) -> tuple[list[dict | Exception], float]:
    start = time.perf_counter()
    with cf.ThreadPoolExecutor(concurrency) as pool:
        futures = [pool.submit(server.generate, x, max_new_tokens, f"r{i}-{time.time_ns()}", **extra)
                   for i, x in enumerate(ids)]
        results: list[dict | Exception] = []
        for f in futures:
            try:
                results.append(f.result())
            except Exception as e:  # recorded: the swap check counts failed requests
                results.append(e)
    return results, time.perf_counter() - start


def captured_rows(client: Any) -> dict[str, dict[int, tuple[torch.Tensor, int]]]:
    """rid -> position -> (aux hidden row, emitted token), from every entry of the hidden-state stream."""
    rows: dict[str, dict[int, tuple[torch.Tensor, int]]] = {}
    for _, fields in client.xrange(keys.hidden_states(NAMESPACE, DEPLOYMENT)):
        batch = codec.decode(fields)
        for r in range(batch.num_tokens):
            rid = batch.rids[int(batch.req_index[r])]
            rows.setdefault(rid, {})[int(batch.positions[r])] = (batch.hidden[r], int(batch.token_ids[r]))
    return rows


def phase_truth(server: Server, tok: Any, client: Any) -> dict:
    ids = prompts(tok, 8)
    client.delete(keys.hidden_states(NAMESPACE, DEPLOYMENT))
    results, _ = run_many(server, ids, 48, 8, return_hidden_states=True)
    time.sleep(3)  # the finisher thread and the writer flush asynchronously
    got = captured_rows(client)
    compared = mismatched = missing = token_errors = 0
    max_diff = 0.0
    for x, res in zip(ids, results, strict=True):
        if isinstance(res, Exception):
            raise res
        rid, meta = res["meta_info"]["id"], res["meta_info"]
        hs = meta.get("hidden_states") or []
        prompt_len = len(x)
        truth = {}  # position -> row, from SGLang's own output
        if hs and isinstance(hs[0], list) and hs[0] and isinstance(hs[0][0], list):
            truth.update(enumerate(hs[0]))  # prefill rows of the whole prompt (radix cache off)
            decode = hs[1:]
        else:
            decode = hs
        truth.update({prompt_len + j: row for j, row in enumerate(decode)})
        outputs = res.get("output_ids") or []
        mine = got.get(rid, {})
        for pos, row in truth.items():
            if pos not in mine:
                missing += 1
                continue
            hidden, token = mine[pos]
            diff = (hidden.float() - torch.tensor(row, dtype=torch.float32)).abs().max().item()
            max_diff = max(max_diff, diff)
            compared += 1
            mismatched += diff > 0
            j = pos - prompt_len + 1
            if 0 <= j < len(outputs) and outputs[j] != token:
                token_errors += 1
    return {"requests": len(ids), "rows_compared": compared, "rows_mismatched": mismatched,
            "rows_missing_in_capture": missing, "max_abs_diff": max_diff, "token_mismatches": token_errors,
            "captured_rids": len(got), "ok": compared > 0 and mismatched == 0 and token_errors == 0}


def registry_checksums(version_dir: Path) -> dict[str, str]:
    """SGLang's checksum (weight_checker: tensor_hash on the GPU) of each registry tensor, by SGLang's name."""
    from safetensors.torch import load_file
    from sglang.srt.managers.mm_utils import tensor_hash

    t = {k: v.cuda() for k, v in load_file(version_dir / "model.safetensors").items()}
    fused = {"midlayer.self_attn.qkv_proj.weight": ["q_proj", "k_proj", "v_proj"],
             "midlayer.mlp.gate_up_proj.weight": ["gate_proj", "up_proj"]}
    for name, parts in fused.items():
        prefix = name.rsplit(".", 2)[0]
        names = [f"{prefix}.{p}.weight" for p in parts]
        if all(n in t for n in names):
            t[name] = torch.cat([t.pop(n) for n in names])
    # SGLang's LlamaForCausalLMEagle3.load_weights maps the checkpoint's "midlayer" to its "layers.0".
    return {n.replace("midlayer.", "layers.0."): f"{tensor_hash(v):016x}" for n, v in t.items()}


def metric(m: dict[str, float], name: str) -> float | None:
    vals = [v for k, v in m.items() if k.startswith(name)]
    return sum(vals) if vals else None


def phase_swap(server: Server, tok: Any, client: Any, registry: Path) -> dict:
    old, new = sorted(int(p.name[1:]) for p in registry.glob("v0*"))[-2:]
    before = server.draft_checksums()
    ids = prompts(tok, 48, offset=8)
    with cf.ThreadPoolExecutor(1) as pool:
        t0 = time.time()
        fut = pool.submit(run_many, server, ids, 192, 48)
        time.sleep(1.5)
        rollout.write_control(client, NAMESPACE, DEPLOYMENT, rollout.ControlState(stable=new))
        swapped_after = time.time() - t0
        results, wall = fut.result()
    failed = [repr(r) for r in results if isinstance(r, Exception)]
    deadline = time.time() + 30
    while time.time() < deadline and metric(server.metrics(), "tide_draft_version") != new:
        time.sleep(0.5)
    m = server.metrics()
    time.sleep(2 * HEARTBEAT_S)  # the heartbeat reports the version copied, at the next beat
    beats = rollout.read_heartbeats(client, NAMESPACE, DEPLOYMENT, now=time.time(), heartbeat_s=HEARTBEAT_S)
    heartbeat = beats[POD].model_dump() if POD in beats else None
    after = server.draft_checksums()
    expected = registry_checksums(registry / f"v{new:06d}")
    names = {n: next((e for e in expected if n == e or n == f"model.{e}"), None) for n in after}
    matched = sorted(n for n, e in names.items() if e is not None and expected[e] == after[n])
    unmatched = sorted(n for n, e in names.items() if e is not None and expected[e] != after[n])
    changed = sorted(n for n in after if before.get(n) != after[n])
    # A corrupt version: same manifest, one flipped byte in the weights. Refused; serving goes on.
    bad = new + 1
    shutil.copytree(registry / f"v{new:06d}", registry / f"v{bad:06d}")
    manifest = json.loads((registry / f"v{bad:06d}" / "manifest.json").read_text())
    manifest["version"], manifest["parent"] = bad, new
    (registry / f"v{bad:06d}" / "manifest.json").write_text(json.dumps(manifest))
    weights = registry / f"v{bad:06d}" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-100] ^= 0xFF
    weights.write_bytes(bytes(data))
    failures_before = metric(m, "tide_draft_swap_failures_total") or 0.0
    rollout.write_control(client, NAMESPACE, DEPLOYMENT, rollout.ControlState(stable=bad))
    time.sleep(3)
    after_bad, _ = run_many(server, prompts(tok, 8, offset=56), 32, 8)
    m2 = server.metrics()
    stats = {v: rollout.read_stats(client, NAMESPACE, DEPLOYMENT, v) for v in (old, new, bad)}
    rollout.write_control(client, NAMESPACE, DEPLOYMENT, rollout.ControlState(stable=new))
    return {
        "old": old, "new": new, "requests_in_flight": len(ids), "failed_requests": failed, "wall_s": wall,
        "swap_written_after_s": round(swapped_after, 2), "tide_draft_version": metric(m, "tide_draft_version"),
        "heartbeat": heartbeat,
        "swap_seconds_sum": metric(m, "tide_draft_swap_seconds_sum"),
        "draft_params_changed": len(changed), "draft_params": len(after),
        "checksums_equal_registry": matched, "checksums_differ_registry": unmatched,
        "corrupt_version": bad, "version_after_corrupt": metric(m2, "tide_draft_version"),
        "swap_failures_added": (metric(m2, "tide_draft_swap_failures_total") or 0.0) - failures_before,
        "requests_failed_after_corrupt": sum(isinstance(r, Exception) for r in after_bad),
        "acceptance_by_version": {v: s.accepted / s.verify_steps if s.verify_steps else None
                                  for v, s in stats.items()},
        "stats": {v: s.model_dump() for v, s in stats.items()},
        "ok": not failed and metric(m, "tide_draft_version") == new and bool(matched) and not unmatched
        and heartbeat is not None and heartbeat["version"] == new
        and metric(m2, "tide_draft_version") == new and not any(isinstance(r, Exception) for r in after_bad),
    }


def phase_control(server: Server, tok: Any) -> dict:
    """Batch 1 then batch 48: the steps SGLang runs per slot (its accept lengths) against TIDE's decisions."""
    out: dict[str, Any] = {}
    for bs in (1, 48):
        ids = prompts(tok, bs if bs > 1 else 4, offset=64)
        results, wall = run_many(server, ids, 128, bs)
        ok = [r for r in results if not isinstance(r, Exception)]
        verify = sum(r["meta_info"].get("spec_verify_ct", 0) for r in ok)
        tokens = sum(r["meta_info"]["completion_tokens"] for r in ok)
        out[f"batch_{bs}"] = {"tokens_per_s": tokens / wall, "spec_verify_ct": verify,
                              "accept_length": tokens / verify if verify else None,
                              "failed": len(results) - len(ok)}
    m = server.metrics()
    text = server.log_path.read_text(errors="replace")
    # What SGLang itself ran: its adaptive runtime logs every switch of draft steps.
    out["sglang_step_switches"] = re.findall(r"Switch adaptive runtime state: steps (\d+) -> (\d+)", text)[-40:]
    out["tide_speculation_steps"] = {k: v for k, v in m.items() if k.startswith("tide_speculation_steps")}
    out["controller_metrics"] = {k: v for k, v in m.items() if k.startswith("tide_control")}
    return out


_DECODE_LOG = re.compile(r"Decode batch, #running-req: (\d+),.* accept len: ([\d.]+),.* gen throughput \(token/s\): "
                         r"([\d.]+)")
DECODE_LOG_INTERVAL = 40  # SGLang's --decode-log-interval: decode batches per "Decode batch" log line


def decode_log(text: str, running: int) -> dict[str, float | int | None]:
    """SGLang's own decode throughput: the mean of its "Decode batch" log lines (one per log interval) at a steady
    batch of `running` requests. Prefill and client overheads stay out of it, so it is the figure to compare.
    `steady_s` estimates the decode time those lines cover (interval tokens / throughput, summed)."""
    rows = [(float(t), float(a)) for n, a, t in _DECODE_LOG.findall(text) if int(n) == running]
    if not rows:
        return {"decode_tokens_per_s": None, "accept_length": None, "log_intervals": 0, "steady_s": 0.0}
    steady = sum(DECODE_LOG_INTERVAL * running * a / t for t, a in rows if t > 0)
    return {"decode_tokens_per_s": sum(t for t, _ in rows) / len(rows),
            "accept_length": sum(a for _, a in rows) / len(rows), "log_intervals": len(rows), "steady_s": steady}


def throughput(server: Server, ids: list[list[int]], concurrency: int, max_new: int) -> dict:
    run_many(server, ids[:concurrency], 16, concurrency)  # warm-up
    offset = server.log_path.stat().st_size
    results, wall = run_many(server, ids, max_new, concurrency)
    ok = [r for r in results if not isinstance(r, Exception)]
    tokens = sum(r["meta_info"]["completion_tokens"] for r in ok)
    with server.log_path.open(errors="replace") as f:
        f.seek(offset)
        steady = decode_log(f.read(), concurrency)
    return {"tokens_per_s": tokens / wall, "tokens": tokens, "wall_s": wall, "failed": len(results) - len(ok),
            **steady}


CAPTURE_SERVERS = {  # name -> (plugin loaded, extra environment, pinned draft steps; None: no speculation at all)
    "off": (False, {}, 3), "on": (True, {}, 3), "rate0": (True, {"TIDE_CAPTURE_SAMPLE_RATE": "0"}, 3),
    # what "speculation off" costs inside a speculative server (issue 15): SGLang's 0 steps still verify through
    # the TARGET_VERIFY graph and extend the draft every batch, unless told to skip the extend (stale draft KV)
    "nospec": (False, {}, None), "zero": (False, {}, 0),
    "zeroskip": (False, {"SGLANG_SPEC_SKIP_ZERO_STEP_DRAFT_EXTEND": "1"}, 0)}


def pinned_config(out: Path, steps: int, sizes: tuple[int, ...] = (1, 8, 32, 64, 128)) -> Path:
    """SGLang's adaptive config with one candidate, `steps`, in every slot: its own switching cannot confound."""
    path = out / f"adaptive-{steps}.json"
    path.write_text(json.dumps({str(bs): {"candidate_steps": [steps]} for bs in sizes}))
    return path


def without_speculation(command: list[str]) -> list[str]:
    """SGLang's command with every --speculative-* flag (and its value) removed."""
    out: list[str] = []
    skip = False
    for arg in command:
        if skip:
            skip = False
        elif arg.startswith("--speculative-"):
            skip = "=" not in arg and arg != "--speculative-adaptive"
        else:
            out.append(arg)
    return out


WARM_BATCH, WARM_TOKENS = 16, 512  # the warm-up decode of every capture server (phase_capture), ~5 s
WAVE_TOKENS = 1536  # new tokens per request at most: decode slows as contexts grow (triton attention on the H200:
# 2,300 -> 540 tokens/s at batch 8 between 1k and 6k tokens per request), so longer waves measure the context


def capture_wave(server: Server, tok: Any, batch: int, seconds: float, offset: int, sizes: dict[int, int]) -> dict:
    """Rounds of `batch` identical-length requests (ignore_eos, at most WAVE_TOKENS new tokens each), enough for
    about `seconds` of decode at a steady batch. The first server sizes them with a short probe wave and records the
    total in `sizes`; every later server decodes the same rounds (a longer wave decodes at longer contexts, slower:
    on the H200, waves sized per server differed by up to 40 % and moved the on/off ratio by +-14 %)."""
    if batch not in sizes:
        probe = throughput(server, prompts(tok, batch, offset=offset), batch, 256)
        per_request = (probe.get("decode_tokens_per_s") or probe["tokens_per_s"]) / batch
        sizes[batch] = int(min(12_000, max(256, per_request * seconds * 1.15)))
    rounds = -(-sizes[batch] // WAVE_TOKENS)
    max_new = -(-sizes[batch] // rounds)
    parts = [throughput(server, prompts(tok, batch, offset=offset + r * batch), batch, max_new) for r in range(rounds)]
    steady = sum(p["steady_s"] for p in parts)
    rates = [(p["decode_tokens_per_s"], p["steady_s"]) for p in parts if p["decode_tokens_per_s"]]
    tokens, wall = sum(p["tokens"] for p in parts), sum(p["wall_s"] for p in parts)
    accepts = [p["accept_length"] for p in parts if p["accept_length"]]
    return {"batch": batch, "max_new_tokens": max_new, "rounds": rounds, "tokens_per_s": tokens / wall,
            "tokens": tokens, "wall_s": wall, "failed": sum(p["failed"] for p in parts),
            # SGLang's decode rate over the steady seconds of every round, weighted by them
            "decode_tokens_per_s": sum(r * t for r, t in rates) / sum(t for _, t in rates) if rates else None,
            "accept_length": sum(accepts) / len(accepts) if accepts else None,
            "log_intervals": sum(p["log_intervals"] for p in parts), "steady_s": steady}


def phase_capture(name: str, out: Path, args: list[str], env: dict[str, str], tok: Any, batches: list[int],
                  seconds: float, sizes: dict[int, int], partial: dict, on_row: Any) -> dict:
    """Capture cost: one server (no plugin, plugin capturing, or plugin at sample rate 0) at each steady batch.
    `partial` holds the rows so far; `on_row` saves them (a run cut off by the call's time limit keeps its rows)."""
    plugin, extra, steps = CAPTURE_SERVERS[name.rstrip("0123456789")]
    args = [*args, "--speculative-adaptive-config", str(pinned_config(out, 3 if steps is None else steps))]
    server = Server(f"capture-{name}", out, args, {**env, **extra}, plugin=plugin, speculative=steps is not None)
    rows = partial.setdefault("rows", [])
    partial.update(server=name, plugin=plugin)
    try:
        startup = server.wait_ready()
        # A few seconds of decode before the first figure: on the H200 the server measured second ran 5-6 % faster
        # at 1 and 8 running requests whichever it was (2026-12-02), so a cold server reads slower than a warm one.
        run_many(server, prompts(tok, WARM_BATCH, offset=900), WARM_TOKENS, WARM_BATCH)
        for i, b in enumerate(batches):
            try:
                need(seconds + 20, f"capture {name} batch {b}")
            except OutOfTime as e:
                log(str(e))
                partial["skipped"] = str(e)
                break
            before = server.metrics() if plugin else {}
            rows.append(capture_wave(server, tok, b, seconds, 1000 + 200 * i, sizes))
            if plugin:  # TIDE's scheduler-thread time per decode batch, during this wave only
                after = server.metrics()
                d = {k: (metric(after, k) or 0.0) - (metric(before, k) or 0.0)
                     for k in ("tide_plugin_scheduler_seconds_sum", "tide_plugin_scheduler_seconds_count",
                               "tide_capture_drops_total", "tide_captured_tokens_total")}
                n = d["tide_plugin_scheduler_seconds_count"]
                by_reason = {k: v - before.get(k, 0.0) for k, v in after.items()
                             if k.startswith("tide_capture_drops_total") and v != before.get(k, 0.0)}
                rows[-1].update(tide_us_per_batch=1e6 * d["tide_plugin_scheduler_seconds_sum"] / n if n else None,
                                tide_batches=n, drops=d["tide_capture_drops_total"], drops_by_reason=by_reason,
                                captured_tokens=d["tide_captured_tokens_total"])
            log(f"capture {name} batch {b}: {rows[-1].get('decode_tokens_per_s')} tok/s, "
                f"{rows[-1].get('steady_s', 0):.0f} s steady")
            on_row()
        m = server.metrics() if plugin else {}
        if plugin:  # what the dashboards' sglang:* expressions are checked against (tests/test_dashboards_e2e.py)
            (out / "sglang-metrics.prom").write_text(server.metrics_text())
    finally:
        server.stop()
    return {"server": name, "plugin": plugin, "env": extra, "startup_s": startup, "rows": rows,
            "tide_scheduler_seconds_sum": metric(m, "tide_plugin_scheduler_seconds_sum"),
            "tide_scheduler_batches": metric(m, "tide_plugin_scheduler_seconds_count"),
            "captured_tokens": metric(m, "tide_captured_tokens_total"),
            "capture_drops": metric(m, "tide_capture_drops_total")}


def phase_static(out: Path, args: list[str], env: dict[str, str], tok: Any, draft: Path, evals: Path) -> dict:
    """The static draft (`python -m tide_sglang.bench.static train`) served by SGLang alone (no plugin) at 3
    pinned steps on the evaluation prompts it never trained on, to natural ends (EOS or 256 tokens), 16 at a time.
    Accept length = completion tokens / verify steps, SGLang's own counts per request."""
    texts = [p["text"] for p in json.loads(evals.read_text())]
    i = args.index("--speculative-draft-model-path")
    server = Server("static", out, [*args[:i + 1], str(draft), *args[i + 2:]], env, plugin=False)
    try:
        startup = server.wait_ready()
        results, wall = run_many(server, [chat_ids(tok, t) for t in texts], 256, 16, ignore_eos=False)
    finally:
        server.stop()
    ok = [r for r in results if not isinstance(r, Exception)]
    tokens = sum(r["meta_info"]["completion_tokens"] for r in ok)
    verify = sum(r["meta_info"].get("spec_verify_ct", 0) for r in ok)
    return {"draft": str(draft), "prompts": len(texts), "failed": len(results) - len(ok), "startup_s": startup,
            "tokens": tokens, "spec_verify_ct": verify, "accept_length": tokens / verify if verify else None,
            "tokens_per_s": tokens / wall}


def phase_collect(out: Path, args: list[str], env: dict[str, str], tok: Any, redis_url: str, requests: int,
                  steps: int, seconds: float, static_after: bool) -> dict:
    """A static draft from SGLang's own captures (`bench.static train --stream-url`): a server with the plugin
    capturing is sent bench.static's "train" prompts (natural ends or 256 new tokens, COLLECT_CONCURRENCY at a
    time), stops (its capture helper flushes), and the trainer reads the stream, trains, scores on the "eval"
    prompts and publishes into $GPU_RUN_HOME/static-reg, writing $GPU_RUN_HOME/static (what the static phase
    serves). SGLang generates in seconds what transformers' `generate` needs minutes for."""
    from tide_sglang.bench import static

    texts = [p.text for p in static.train_prompts(requests)]
    collect_env = {**env, "TIDE_STREAM_BUDGET_MIB": "16384", "TIDE_STREAM_QUEUE_ENTRIES": "4096",
                   "TIDE_CAPTURE_RING_SLOTS": "64"}  # keep every row: the stream is read once, after serving
    # Decode CUDA graphs up to the requests in flight: past --cuda-graph-max-bs (64) SGLang decodes eagerly, and
    # 4,000 prompts at 256 in flight took 180 s (4,700 tokens/s) where graphed batches of 64 ran 8,800 tokens/s.
    server = Server("collect", out, [*args, "--cuda-graph-max-bs", str(COLLECT_CONCURRENCY)], collect_env,
                    plugin=True)
    try:
        startup = server.wait_ready()
        results, wall = run_many(server, [chat_ids(tok, t) for t in texts], 256, COLLECT_CONCURRENCY,
                                 ignore_eos=False)
        m = server.metrics()
        # The dashboards' sglang:* expressions are checked against this snapshot (tests/test_dashboards_e2e.py).
        (out / "sglang-metrics.prom").write_text(server.metrics_text())
    finally:
        server.stop()
    ok = [r for r in results if not isinstance(r, Exception)]
    served = {"prompts": len(texts), "failed": len(results) - len(ok), "startup_s": startup, "wall_s": wall,
              "tokens": sum(r["meta_info"]["completion_tokens"] for r in ok),
              "captured_tokens": metric(m, "tide_captured_tokens_total"),
              "capture_drops": metric(m, "tide_capture_drops_total")}
    log(f"collect: {json.dumps(served)}")
    # Leave the static phase (when it runs in this call) a server start and its serving, and the draft's scoring
    # and publishing a minute; never less than a minute of training.
    left = DEADLINE - time.monotonic() - 45 - ((SERVER_START_S + 60) if static_after else 0)
    seconds = max(60.0, min(seconds, left))
    plan = static.StaticPlan(requests=requests, steps=steps, seconds=seconds)
    trained = static.train_static(HOME / "static-reg", HOME / "static", "cuda", plan, DEFAULT_TARGET,
                                  stream=(redis_url, DEPLOYMENT))
    return {"served": served, "trained": trained}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--phases", default="truth,swap,throughput")
    ap.add_argument("--no-cuda-graph", action="store_true")
    ap.add_argument("--repeats", type=int, default=2, help="throughput: on/off pairs")
    ap.add_argument("--concurrency", default="8,64")
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--control-profile", type=Path, default=None)
    ap.add_argument("--sglang-arg", action="append", default=[], help="extra SGLang argument (repeatable)")
    ap.add_argument("--throughput-arg", action="append", default=[], help="extra SGLang argument, throughput only")
    ap.add_argument("--capture-servers", default="off,on,rate0,off2",
                    help="capture phase: servers in order (off: no plugin, on: capturing, rate0: sample rate 0; "
                         "nospec: no speculation, zero: 0 pinned steps, zeroskip: 0 steps skipping the draft extend)")
    ap.add_argument("--capture-batches", default="1,8,32,64,128")
    ap.add_argument("--capture-seconds", type=float, default=22.0, help="steady decode per batch size")
    ap.add_argument("--collect-requests", type=int, default=4000, help="collect phase: train prompts served")
    ap.add_argument("--collect-steps", type=int, default=6000, help="collect phase: optimizer steps at most")
    ap.add_argument("--collect-seconds", type=float, default=150.0, help="collect phase: training time at most")
    ap.add_argument("--static-dir", type=Path, default=None,
                    help="static phase: the OUT of `python -m tide_sglang.bench.static train` (static-draft.json, "
                         "eval-prompts.json)")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="seconds this run may take (the call's limit less a margin): a server start, a capture "
                         "batch or the collect phase's training that would outlast it is skipped or shortened, "
                         "and what ran is saved")
    a = ap.parse_args()
    if a.budget_s is not None:
        global DEADLINE
        DEADLINE = time.monotonic() + a.budget_s
    a.out.mkdir(parents=True, exist_ok=True)
    phases = a.phases.split(",")
    model = resolve(DEFAULT_TARGET)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    registry = HOME / "registry"
    old = sorted(registry.glob("v0*"))[-2]
    redis = LocalRedis().start()
    client = connect_url(redis.url)
    env = {"TIDE_DEPLOYMENT": DEPLOYMENT, "TIDE_REDIS_URL": redis.url, "TIDE_POD_NAME": POD,
           "TIDE_HEARTBEAT_S": str(HEARTBEAT_S),
           "TIDE_REGISTRY_DIR": str(registry), "TIDE_SWAP_POLL_S": "0.5", "TIDE_STATS_FLUSH_S": "1",
           "TIDE_SYNC_INTERVAL_BATCHES": "4", "TIDE_CAPTURE_RING_SLOTS": "16"}
    args = ["--model-path", str(model), "--dtype", "bfloat16", "--attention-backend", "triton",
            "--sampling-backend", "pytorch", "--grammar-backend", "none", "--speculative-draft-model-path", str(old),
            "--speculative-num-steps", "3", "--speculative-num-draft-tokens", "4", "--mem-fraction-static", "0.3",
            "--cuda-graph-max-bs", "64", "--tide-candidate-steps", "1,3", *a.sglang_arg]
    if a.no_cuda_graph:
        args.append("--disable-cuda-graph")
    import importlib.metadata as md

    versions = {p: md.version(p) for p in ("sglang", "sglang-kernel", "torch", "transformers", "tide-sglang")}
    report: dict[str, Any] = {"args": args, "device": torch.cuda.get_device_name(0), "versions": versions,
                              "date": time.strftime("%Y-%m-%d"), "phases": {}}

    def save() -> None:
        (a.out / "sglang-run.json").write_text(json.dumps(report, indent=1, default=str))

    def run_phase(name: str, fn: Any) -> None:
        log(f"phase {name}")
        try:
            report["phases"][name] = fn()
            log(f"phase {name}: {json.dumps(report['phases'][name], default=str)[:1500]}")
        except Exception as e:  # recorded, next phase still runs
            report["phases"][name] = {"error": f"{type(e).__name__}: {e}"}
            log(f"phase {name} FAILED: {e}")
        save()

    if "truth" in phases or "swap" in phases:
        rollout.delete_control(client, NAMESPACE, DEPLOYMENT)
        try:
            server = Server("main", a.out, [*args, "--enable-return-hidden-states", "--disable-radix-cache"], env)
        except OutOfTime as e:
            report["phases"]["main_server"] = {"error": str(e)}
            phases = [p for p in phases if p not in ("truth", "swap")]
    if "truth" in phases or "swap" in phases:
        try:
            report["startup_s"] = server.wait_ready()
            log(f"server ready in {report['startup_s']:.0f} s")
            if "truth" in phases:
                run_phase("truth", lambda: phase_truth(server, tok, client))
            if "swap" in phases:
                run_phase("swap", lambda: phase_swap(server, tok, client, registry))
        except Exception as e:
            report["phases"]["main_server"] = {"error": str(e)}
            log(f"main server FAILED: {e}")
        finally:
            server.stop()
            save()
    if "control" in phases:
        rollout.delete_control(client, NAMESPACE, DEPLOYMENT)
        profile = a.control_profile or HOME / "profile.json"
        try:
            server = Server("control", a.out, args, {**env, "TIDE_CONTROL_PROFILE": str(profile)})
        except OutOfTime as e:
            report["phases"]["control"] = {"error": str(e)}
            phases = [p for p in phases if p != "control"]
    if "control" in phases:
        try:
            server.wait_ready()
            run_phase("control", lambda: phase_control(server, tok))
        except Exception as e:
            report["phases"]["control"] = {"error": str(e)}
        finally:
            server.stop()
            save()
    if "capture" in phases:
        cargs = [*args, "--cuda-graph-max-bs", "128",
                 "--decode-log-interval", str(DECODE_LOG_INTERVAL), "--max-running-requests", "128"]
        servers = report["phases"].setdefault("capture", {"servers": []})["servers"]
        sizes: dict[int, int] = {}  # batch -> tokens per request, the same for every server
        for name in a.capture_servers.split(","):
            rollout.delete_control(client, NAMESPACE, DEPLOYMENT)
            partial: dict[str, Any] = {}
            servers.append(partial)
            try:
                batches = [int(b) for b in a.capture_batches.split(",")]
                servers[-1] = phase_capture(name, a.out, cargs, env, tok, batches, a.capture_seconds, sizes, partial,
                                            save)
            except Exception as e:  # recorded, the next server still runs
                servers[-1] = {"server": name, "rows": partial.get("rows", []), "error": f"{type(e).__name__}: {e}"}
                log(f"capture {name} FAILED: {e}")
            save()
    if "collect" in phases:
        rollout.delete_control(client, NAMESPACE, DEPLOYMENT)
        run_phase("collect", lambda: phase_collect(a.out, args, env, tok, redis.url, a.collect_requests,
                                                   a.collect_steps, a.collect_seconds, "static" in phases))
        a.static_dir = a.static_dir or HOME / "static"
    if "static" in phases:
        if a.static_dir is None:
            ap.error("the static phase needs --static-dir (or the collect phase before it)")
        trained = json.loads((a.static_dir / "static-draft.json").read_text())
        draft = DirectoryRegistry(Path(trained["registry"])).path(trained["version"])
        pinned = pinned_config(a.out, 3)
        run_phase("static", lambda: {"trained": trained, **phase_static(
            a.out, [*args, "--speculative-adaptive-config", str(pinned)], env, tok, draft,
            a.static_dir / "eval-prompts.json")})
    if "throughput" in phases:
        rollout.delete_control(client, NAMESPACE, DEPLOYMENT)
        ids = prompts(tok, 128, offset=128)
        rows: list[dict] = []
        for rep in range(a.repeats):
            for plugin in (True, False):
                name = f"tput-{'on' if plugin else 'off'}-{rep}"
                try:
                    server = Server(name, a.out, [*args, *a.throughput_arg], env, plugin=plugin)
                except OutOfTime as e:
                    rows.append({"plugin": plugin, "repeat": rep, "error": str(e)})
                    continue
                try:
                    server.wait_ready()
                    for c in (int(x) for x in a.concurrency.split(",")):
                        row = {"plugin": plugin, "repeat": rep, "concurrency": c,
                               **throughput(server, ids, c, a.max_new_tokens)}
                        rows.append(row)
                        log(json.dumps(row))
                    if plugin:
                        m = server.metrics()
                        rows[-1]["captured_tokens"] = metric(m, "tide_captured_tokens_total")
                        rows[-1]["capture_drops"] = metric(m, "tide_capture_drops_total")
                except Exception as e:
                    rows.append({"plugin": plugin, "repeat": rep, "error": str(e)})
                finally:
                    server.stop()
                report["phases"]["throughput"] = {"rows": rows}
                save()
        summary: dict[int, dict[str, dict[str, float]]] = {}
        for c in {r["concurrency"] for r in rows if "concurrency" in r}:
            for figure in ("decode_tokens_per_s", "tokens_per_s"):
                on = [r[figure] for r in rows if r.get("concurrency") == c and r["plugin"] and r.get(figure)]
                off = [r[figure] for r in rows if r.get("concurrency") == c and not r["plugin"] and r.get(figure)]
                if on and off:
                    mean_on, mean_off = sum(on) / len(on), sum(off) / len(off)
                    summary.setdefault(c, {})[figure] = {"on": mean_on, "off": mean_off,
                                                         "loss_pct": 100 * (1 - mean_on / mean_off)}
        report["phases"]["throughput"]["summary"] = summary
        save()
    redis.close()
    log("done")


def connect_url(url: str) -> Any:
    from tide_sglang.settings import TideSettings

    return connect(TideSettings(redis_url=url, deployment=DEPLOYMENT))


if __name__ == "__main__":
    main()
