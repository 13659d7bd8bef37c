"""`tide bench faults`: fault drills against real redis-server processes, on the CPU, one row per drill.

Each drill runs a producer (a `StreamWriter` fed every 2 ms, as an engine would) and a consumer (a `StreamReader`
that acks what it reads, as the trainer does at its checkpoints) through a private redis-server, injects one
fault, ends it, and measures: the producer's longest `submit()` (its stall), entries that entered the stream and
never reached the consumer (lost), entries delivered twice (duplicates), exceptions that escaped the stream code
(crashes), and seconds from the end of the fault until an entry produced after it arrived (recovery). The
registry drill swaps a reference engine through corrupt versions instead; the trainer-killed drill SIGKILLs a
process running the trainer's checkpoint-and-ack protocol mid-write; the operator-restarted drill stops and
restarts the real operator (kopf against kmock, tide_operator/emulator.py) mid-rollout. tests/test_faults.py runs
the same drills (`DRILLS`) with `quick=True`.
"""

import asyncio
import contextlib
import hashlib
import logging
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import redis
import torch
from pydantic import BaseModel
from rich.console import Console
from rich.table import Table

from tide_sglang import keys, rollout
from tide_sglang.bench import BenchReport, goal
from tide_sglang.capture import CaptureBatch
from tide_sglang.settings import TideSettings
from tide_sglang.stream import RedisUnavailable, StreamReader, StreamWriter, connect, encode
from tide_sglang.stream.server import LocalRedis, free_port

if TYPE_CHECKING:
    from tide_operator.emulator import Cluster, Operator

    from tide_sglang.draft import DraftConfig

NS, DEP = "default", "faults"
STREAM, DEAD = keys.hidden_states(NS, DEP), keys.dead_letter(NS, DEP)
VOCAB = 1000
MIB = 1 << 20


class Drill(BaseModel):
    name: str
    injected: str
    max_stall_ms: float = 0.0
    lost: int = 0
    duplicates: int = 0
    crashes: int = 0
    recovery_s: float | None = None  # None: never recovered
    checks: dict[str, bool] = {}  # what the drill verified besides the common figures

    @property
    def ok(self) -> bool:
        return (self.lost == 0 and self.crashes == 0 and self.recovery_s is not None
                and all(self.checks.values()))


def batch(seq: int, hidden: int = 256, vocab: int = VOCAB) -> CaptureBatch:
    """One request's 8 rows; `draft_version` carries the sequence number the drills count by."""
    n = 8
    return CaptureBatch(rids=[f"r{seq}"], req_index=torch.zeros(n, dtype=torch.long), positions=torch.arange(n),
                        token_ids=torch.randint(0, vocab, (n,)), is_prompt=torch.zeros(n, dtype=torch.bool),
                        hidden=torch.randn(n, 3 * hidden, dtype=torch.bfloat16), vocab_size=vocab,
                        draft_version=seq)


def settings_for(url: str, **kw: object) -> TideSettings:
    return TideSettings(redis_url=url, namespace=NS, deployment=DEP, redis_timeout_s=0.5,
                        **kw)  # type: ignore[arg-type]


class Flow:
    """Producer and consumer threads around one Redis; `hold_acks` makes the consumer read without acking."""

    def __init__(self, settings: TideSettings, *, reader_client: redis.Redis | None = None) -> None:
        self.writer = StreamWriter.from_settings(settings, STREAM, backoff_s=(0.02, 0.2))
        client = reader_client or connect(settings)
        self.reader = StreamReader.from_settings(client, settings, STREAM, DEAD, "drill", block_ms=50,
                                                 claim_idle_ms=60_000, backoff_s=(0.02, 0.2), vocab_size=VOCAB)
        self.submitted_at: dict[int, float] = {}
        self.delivered_at: dict[int, float] = {}
        self.deliveries = 0
        self.crashes = 0
        self.max_stall = 0.0
        self.hold_acks = False
        self.held: list = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._produce, daemon=True),
                         threading.Thread(target=self._consume, daemon=True)]
        for t in self._threads:
            t.start()

    def _produce(self) -> None:
        seq = 0
        while not self._stop.is_set():
            b = batch(seq)
            t0 = time.perf_counter()
            self.writer.submit(b)
            self.max_stall = max(self.max_stall, time.perf_counter() - t0)
            self.submitted_at[seq] = time.monotonic()
            seq += 1
            time.sleep(0.002)

    def _consume(self) -> None:
        while not self._stop.is_set():
            try:
                entries = self.reader.read()
                now = time.monotonic()
                for e in entries:
                    self.deliveries += 1
                    self.delivered_at.setdefault(e.batch.draft_version, now)
                if self.hold_acks:
                    self.held += entries
                else:
                    self.reader.ack(self.held + entries)
                    self.held = []
            except Exception:  # counted: a drill fails on any exception the stream code lets through
                self.crashes += 1
                time.sleep(0.05)

    def recovery(self, since: float, timeout: float) -> float | None:
        """Seconds from `since` until an entry submitted after it was delivered."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            after = [self.delivered_at[s] for s, t in list(self.submitted_at.items())
                     if t > since and s in self.delivered_at]
            if after:
                return round(min(after) - since, 3)
            time.sleep(0.02)
        return None

    def finish(self, name: str, injected: str, recovery: float | None, **checks: bool) -> Drill:
        self._stop.set()
        self._threads[0].join()
        self.writer.flush(5)
        sent = self.writer.stats.sent_entries
        deadline = time.monotonic() + 5
        self._stop.clear()
        self._threads[1] = threading.Thread(target=self._consume, daemon=True)
        self._threads[1].start()
        while len(self.delivered_at) < sent and time.monotonic() < deadline:
            time.sleep(0.02)
        self._stop.set()
        self._threads[1].join()
        self.writer.close(1)
        return Drill(name=name, injected=injected, max_stall_ms=round(self.max_stall * 1e3, 3),
                     lost=max(0, sent - len(self.delivered_at)),
                     duplicates=self.deliveries - len(self.delivered_at), crashes=self.crashes,
                     recovery_s=recovery, checks=checks)


@contextlib.contextmanager
def _server(*extra: str) -> Iterator[LocalRedis]:
    with LocalRedis(None, None, *extra) as server:
        yield server


def _admin(server: LocalRedis, timeout: float = 10.0) -> redis.Redis:
    return redis.Redis(port=server.port, socket_timeout=timeout)


# -- the drills ----------------------------------------------------------------------------------------------------


def drill_paused(quick: bool) -> Drill:
    seconds = 1 if quick else 3
    with _server("--enable-debug-command", "local") as server:
        flow = Flow(settings_for(server.url))
        time.sleep(0.3)
        _admin(server, seconds + 5).execute_command("DEBUG", "SLEEP", seconds)  # blocks the server, and us
        end = time.monotonic()
        return flow.finish("redis-paused", f"DEBUG SLEEP {seconds}", flow.recovery(end, 10))


def drill_clients_killed(quick: bool) -> Drill:
    with _server() as server:
        flow = Flow(settings_for(server.url))
        admin = _admin(server)
        for _ in range(2 if quick else 5):
            time.sleep(0.3)
            admin.client_kill_filter(_type="normal", skipme=True)
        end = time.monotonic()
        return flow.finish("clients-killed", "CLIENT KILL TYPE normal", flow.recovery(end, 10))


def drill_maxmemory(quick: bool) -> Drill:
    hold = 0.5 if quick else 2.0
    with _server() as server:
        flow = Flow(settings_for(server.url))
        time.sleep(0.3)
        admin = _admin(server)
        admin.config_set("maxmemory", int(admin.info("memory")["used_memory"]) + 4 * MIB)
        with contextlib.suppress(redis.ResponseError):  # OOM: full
            for i in range(1000):
                admin.set(f"ballast:{i}", b"\0" * (256 << 10))
        dropped_before = flow.writer.stats.dropped_redis_error
        time.sleep(hold)
        refused = flow.writer.stats.dropped_redis_error > dropped_before
        for key in admin.scan_iter("ballast:*"):
            admin.delete(key)
        end = time.monotonic()
        recovery = flow.recovery(end, 10)
        admin.config_set("maxmemory", 0)
        return flow.finish("maxmemory", "other keys fill maxmemory, then are deleted", recovery,
                           captures_refused_while_full=refused)


def drill_backlog(quick: bool) -> Drill:
    """The consumer stops acking: the unacked backlog fills the budget; new captures are dropped and counted,
    nothing it holds is trimmed; once it acks, captures flow again."""
    with _server() as server:
        flow = Flow(settings_for(server.url, stream_budget_mib=1))
        flow.hold_acks = True
        time.sleep(1.0 if quick else 3.0)
        dropped = flow.writer.stats.dropped_backlog
        flow.hold_acks = False
        end = time.monotonic()
        recovery = flow.recovery(end, 10)
        return flow.finish("backlog-full", "consumer holds its acks; 1 MiB budget", recovery,
                           new_captures_dropped=dropped > 0,
                           nothing_unacked_trimmed=flow.reader.stats.trimmed_unread == 0)


def drill_poison(quick: bool) -> Drill:
    """Entries that must not reach training: another target's vocabulary (valid checksum), garbage, one over the
    entry bound, and one that 'crashes' its consumer on every delivery. All dead-lettered with a reason; the
    dead-letter stream stays within its byte budget however many arrive."""
    with _server() as server:
        s = settings_for(server.url, stream_max_entry_mib=1, stream_dead_letter_mib=2, stream_max_deliveries=2)
        admin = _admin(server)
        # the crasher: reads one entry, dies before acking, restarts under the same name
        admin.xadd(STREAM, encode(batch(10**6)))
        crashed = 0
        for _ in range(4):
            crasher = StreamReader.from_settings(connect(s), s, STREAM, DEAD, "crasher", block_ms=10,
                                                 vocab_size=VOCAB)
            crashed += len(crasher.read())
        flow = Flow(s)
        time.sleep(0.2)
        admin.xadd(STREAM, encode(batch(10**6 + 1, vocab=VOCAB * 2)))  # token ids beyond the reader's vocabulary
        admin.xadd(STREAM, {b"h": b"TIDE garbage", b"i": b"", b"x": b""})
        for i in range(5 if quick else 40):  # oversized, each 1.5 MiB: dead-lettered without its payload
            admin.xadd(STREAM, encode(batch(10**6 + 2 + i, hidden=1 << 15)))
        end = time.monotonic()
        recovery = flow.recovery(end, 10)
        time.sleep(0.3)
        reasons = {f[b"tide_reason"].decode() for _, f in admin.xrange(DEAD)}
        dead_bytes = int(admin.memory_usage(DEAD, samples=0) or 0)
        return flow.finish("poison", "foreign vocabulary, garbage, oversized, a consumer crashing on one entry",
                           recovery, crasher_saw_it_at_most_limit_times=crashed == 2,
                           reasons_recorded=reasons == {"invalid", "delivery_limit"},
                           dead_letters_within_budget=dead_bytes <= 2 * MIB)


def drill_tls(quick: bool) -> Drill:
    """A TLS redis-server: the right CA carries the flow; a wrong CA is a clear `RedisUnavailable`, and a writer
    with it drops and counts instead of raising."""
    tmp = Path(tempfile.mkdtemp(prefix="tide-tls-"))
    try:
        ca, wrong = _ca(tmp, "ca"), _ca(tmp, "wrong")
        cert, key = _server_cert(tmp, ca)
        port = free_port()
        with _server("--tls-port", str(port), "--tls-cert-file", str(cert), "--tls-key-file", str(key),
                     "--tls-ca-cert-file", str(ca[0]), "--tls-auth-clients", "no"):
            url = f"rediss://127.0.0.1:{port}/0"
            flow = Flow(settings_for(url, redis_tls_ca_file=ca[0]))
            start = time.monotonic()
            recovery = flow.recovery(start, 10)
            bad = settings_for(url, redis_tls_ca_file=wrong[0])
            try:
                connect(bad)
                refused = False
            except RedisUnavailable as e:
                refused = "certificate verify failed" in str(e)
            with StreamWriter.from_settings(bad, STREAM, backoff_s=(0.02, 0.1)) as w:
                w.submit(batch(0))
                w.flush(5)
                counted = w.stats.dropped_redis_error == 1 and not w.stats.connected
            return flow.finish("tls", "rediss:// with the right CA, then a wrong CA", recovery,
                               wrong_ca_refused=refused, wrong_ca_writer_counts=counted)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _ca(tmp: Path, name: str) -> tuple[Path, Path]:
    crt, key = tmp / f"{name}.crt", tmp / f"{name}.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", f"/CN={name}",
                    "-keyout", str(key), "-out", str(crt)], check=True, capture_output=True)
    return crt, key


def _server_cert(tmp: Path, ca: tuple[Path, Path]) -> tuple[Path, Path]:
    key, csr, crt, ext = tmp / "server.key", tmp / "server.csr", tmp / "server.crt", tmp / "ext.cnf"
    ext.write_text("subjectAltName=IP:127.0.0.1\n")
    subprocess.run(["openssl", "req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1", "-keyout", str(key),
                    "-out", str(csr)], check=True, capture_output=True)
    subprocess.run(["openssl", "x509", "-req", "-in", str(csr), "-CA", str(ca[0]), "-CAkey", str(ca[1]),
                    "-CAcreateserial", "-days", "1", "-extfile", str(ext), "-out", str(crt)],
                   check=True, capture_output=True)
    return crt, key


def tiny_config() -> "DraftConfig":
    from tide_sglang.draft import DraftConfig

    return DraftConfig(hidden_size=32, target_hidden_size=32, intermediate_size=64, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=8, vocab_size=100, draft_vocab_size=40, aux_layer_ids=[0, 1, 2],
                       torch_dtype="float32")


def checkpointing_consumer(url: str, directory: str, ballast_floats: int) -> None:
    """The trainer's durability protocol, without the model (trainer/service.py, trainer/state.py): resume from the
    newest checkpoint and ack the entries it lists, ingest, every 20 entries write a checkpoint holding every row
    ingested so far (`seqs`, plus `ballast` so that the write takes a while), then ack. Exits once the stream is
    drained for 1 s. Run as a process by `drill_trainer_killed`."""
    from tide_sglang.trainer import state as ckpt

    s = settings_for(url)
    reader = StreamReader.from_settings(connect(s), s, STREAM, DEAD, "trainer-0", block_ms=100, vocab_size=VOCAB)
    saved = ckpt.load_latest(Path(directory))
    seqs: list[int] = saved[1]["seqs"].tolist() if saved else []
    if saved:
        reader.ack_ids(saved[0].contained_ids)
    pending, idle = [], 0
    while idle < 10:
        entries = reader.read()
        idle = 0 if entries else idle + 1
        seqs += [e.batch.draft_version for e in entries]
        pending += entries
        if len(pending) >= 20 or (pending and not entries):
            state = ckpt.TrainerState(config=tiny_config(), vocab_sha256="-", contained_ids=[e.id for e in pending])
            ckpt.save(Path(directory), state, {"seqs": torch.tensor(seqs), "ballast": torch.zeros(ballast_floats)})
            reader.ack(pending)
            pending = []


def drill_trainer_killed(quick: bool) -> Drill:
    """SIGKILL a checkpointing consumer while it writes a checkpoint, then restart it: every entry is in the final
    checkpoint exactly once (entries of the half-written one are delivered again, entries of the last complete one
    are acked on resume and not read again)."""
    from tide_sglang.trainer import state as ckpt

    entries = 100 if quick else 400
    tmp = Path(tempfile.mkdtemp(prefix="tide-ckpt-"))
    try:
        with _server() as server:
            with StreamWriter.from_settings(settings_for(server.url), STREAM) as w:
                for i in range(entries):
                    while not w.submit(batch(i)):
                        time.sleep(0.001)
                w.flush()
            argv = [sys.executable, "-c", "from tide_sglang.bench.faults import checkpointing_consumer as c; "
                    f"c({server.url!r}, {str(tmp)!r}, {(8 if quick else 16) << 20})"]
            first = subprocess.Popen(argv)
            mid_write = False
            while first.poll() is None and not mid_write:
                mid_write = any(tmp.glob("ckpt-*")) and any(tmp.glob(".tmp-*"))
                time.sleep(0.001)
            first.kill()
            first.wait()
            killed = time.monotonic()
            crashes = int(subprocess.run(argv, timeout=120).returncode != 0)
            recovery = round(time.monotonic() - killed - 1.0, 3)  # less the 1 s that tells it the stream is drained
            saved = ckpt.load_latest(tmp)
            seqs = saved[1]["seqs"].tolist() if saved else []
            pending = int(_admin(server).xpending(STREAM, keys.TRAINER_GROUP)["pending"])
            return Drill(name="trainer-killed", injected="SIGKILL while a checkpoint is being written, restart",
                         lost=entries - len(set(seqs)), duplicates=len(seqs) - len(set(seqs)), crashes=crashes,
                         recovery_s=recovery, checks={"killed_mid_write": mid_write, "all_acked": pending == 0})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def tamper(version_dir: Path, name: str, data: bytes | None = None, link_to: Path | None = None) -> None:
    """Replace a file of a stored version (or make it a symlink to `link_to`) and make the manifest's checksum
    agree, so only the registry's deeper checks can catch it."""
    from tide_sglang.draft.registry import MANIFEST, Manifest

    path = version_dir / name
    if link_to is not None:
        path.unlink()
        path.symlink_to(link_to)
        data = link_to.read_bytes()
    else:
        assert data is not None
        path.write_bytes(data)
    manifest = Manifest.model_validate_json((version_dir / MANIFEST).read_bytes())
    entry = manifest.files[name].model_copy(update={"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)})
    (version_dir / MANIFEST).write_text(manifest.model_copy(update={"files": {**manifest.files, name: entry}})
                                        .model_dump_json())


def drill_registry(quick: bool) -> Drill:
    """A reference engine (`DraftFollower`) is told to load versions that are corrupt in every way the registry
    must catch, and a control value that is no number; it never dies, counts each failure in its heartbeat, and
    then loads a good version. Two publishers racing never take the same number."""
    from tide_sglang.draft import DirectoryRegistry, Eagle3Draft, select_vocab
    from tide_sglang.draft.registry import CONFIG, WEIGHTS
    from tide_sglang.engine.swap import DraftFollower

    config = tiny_config()
    tmp = Path(tempfile.mkdtemp(prefix="tide-registry-"))
    try:
        registry = DirectoryRegistry(tmp / "reg", create=True)
        vocab = select_vocab(torch.rand(100), 40)
        racers = [threading.Thread(target=lambda: [registry.publish(Eagle3Draft(config, vocab)) for _ in range(3)])
                  for _ in range(2)]
        for t in racers:
            t.start()
        for t in racers:
            t.join()
        distinct = registry.versions() == list(range(1, 7))

        weights = (registry.path(1) / WEIGHTS).read_bytes()
        tamper(registry.path(1), WEIGHTS, weights[: len(weights) // 2])  # truncated
        tamper(registry.path(2), CONFIG, b"[]")  # a list
        tamper(registry.path(3), WEIGHTS, link_to=registry.path(6) / WEIGHTS)  # a symlink to a valid file
        with _server() as server:
            client = connect(settings_for(server.url))
            follower = DraftFollower(client, registry, NS, DEP, "pod-0", torch.randn(100, 32), poll_s=0.0, version=0)
            crashes = 0

            def set_ctl(stable: str) -> None:
                client.hset(keys.control(NS, DEP), mapping={"stable": stable})

            for stable in ("1", "2", "3", "²"):
                set_ctl(stable)
                try:
                    follower.poll()
                except Exception:
                    crashes += 1
            set_ctl("6")
            end = time.monotonic()
            loaded = follower.poll()
            recovery = round(time.monotonic() - end, 3) if loaded is not None and loaded.version == 6 else None
            beat = follower.heartbeat()
            beats = rollout.read_heartbeats(client, NS, DEP, now=time.time(), heartbeat_s=5)
            return Drill(name="registry", injected="truncated weights, config a list, symlinked weights, ctl '²', "
                         "racing publishers", crashes=crashes, recovery_s=recovery,
                         checks={"racing_publishers_distinct": distinct,
                                 "failures_in_heartbeat": beat is not None and beats["pod-0"].swap_failures == 4})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


OPERATOR_PODS = ("faults-pod-a", "faults-pod-b")


def drill_operator_restarted(quick: bool) -> Drill:
    """The real operator (kopf against kmock, an emulated Kubernetes API; the pods are played through Redis as
    the engines would) is stopped while vN is in canary; vN's better acceptance and a new vN+1 are reported and
    published meanwhile; restarted, it promotes vN and canaries vN+1 against it, each DraftVersion made once.
    Lost: published versions with no DraftVersion; duplicates: DraftVersions created twice; crashes: exceptions
    that escaped the operator's code into kopf."""
    try:  # the operator imports tide_sglang, never the reverse: only this drill reaches into it, when it runs
        import tide_operator.emulator  # noqa: F401
    except ModuleNotFoundError as e:
        return Drill(name="operator-restarted", injected=f"not run: {e.name} is missing (the [operator] extra "
                     "brings kopf, the [dev] extra kmock; `make install` installs both)",
                     checks={"kmock_and_kopf_installed": False})
    return asyncio.run(_operator_restarted(restarts=1 if quick else 3))


async def _operator_restarted(restarts: int) -> Drill:
    import kmock as km
    from tide_operator.emulator import ApiServer, Cluster, Engines, running_operator

    crashes = _ExceptionCount()
    logging.getLogger("kopf").addHandler(crashes)
    tmp = Path(tempfile.mkdtemp(prefix="tide-operator-"))
    try:
        with _server() as server:
            client = connect(settings_for(server.url))
            async with (ApiServer() as api, km.Server(api), running_operator(api, tmp) as operator,
                        Engines(client, NS, DEP, OPERATOR_PODS).running()):
                cluster = Cluster(api)
                recoveries, checks = await _restart_cycles(cluster, operator, client, server.url, restarts)
            created = sum(r.action == km.action.CREATE and r.resource is not None
                          and r.resource.plural == "draftversions" for r in api)
            published = 1 + int(client.xlen(keys.events(NS, DEP)))  # v0, the imported draft, is no event
            made = sum(cluster.get("DraftVersion", f"{DEP}-v{v}") is not None for v in range(published))
            return Drill(name="operator-restarted", injected="operator stopped while a version is in canary, its "
                         f"stats and a new version arrive meanwhile, restarted (×{restarts})",
                         lost=published - made, duplicates=created - made,
                         crashes=crashes.count + len(operator.errors),
                         recovery_s=None if None in recoveries else max(recoveries), checks=checks)
    finally:
        logging.getLogger("kopf").removeHandler(crashes)
        shutil.rmtree(tmp, ignore_errors=True)


async def _restart_cycles(cluster: "Cluster", operator: "Operator", client: redis.Redis, url: str,
                          restarts: int) -> tuple[list[float | None], dict[str, bool]]:
    """Deploy and canary v1; then per restart: stop during vN's canary, report vN better than vN-1 and publish
    vN+1, start. Recovery: seconds from the start until vN is promoted and vN+1 in canary."""
    from tide_operator.emulator import wait_for

    recoveries: list[float | None] = []
    checks = dict.fromkeys(("canary_before_the_fault", "promoted_after_restart", "next_canary_against_promoted"),
                           False)
    against_promoted = True
    await cluster.create(_tide_deployment(url))
    try:
        await wait_for(lambda: cluster.get("Deployment", DEP), what="children")
        cluster.mark_ready(DEP)
        await wait_for(lambda: (c := rollout.read_control(client, NS, DEP)) is not None and c.stable == 0,
                       what="control state")
        rollout.append_event(client, NS, DEP, rollout.Published(version=1, parent=0))
        await wait_for(lambda: cluster.phase(DEP, 1) == "Canary", what="canary of v1")
    except TimeoutError:
        return [None], checks
    checks["canary_before_the_fault"] = True
    for v in range(1, restarts + 1):
        await operator.stop()
        rollout.add_stats(client, NS, DEP, v - 1, tokens=2_000, accepted=1_000, verify_steps=500)
        rollout.add_stats(client, NS, DEP, v, tokens=2_000, accepted=1_600, verify_steps=500)
        rollout.append_event(client, NS, DEP, rollout.Published(version=v + 1, parent=v))
        start = time.monotonic()
        await operator.start()
        try:
            await wait_for(lambda v=v: cluster.phase(DEP, v) == "Promoted" and cluster.phase(DEP, v + 1) == "Canary",
                           what=f"v{v} promoted and v{v + 1} in canary")
        except TimeoutError:
            return [*recoveries, None], checks
        recoveries.append(round(time.monotonic() - start, 3))
        baseline = ((cluster.get("DraftVersion", f"{DEP}-v{v + 1}") or {}).get("status") or {}).get("baseline") or {}
        against_promoted &= baseline.get("version") == v and baseline.get("tokens") == 2_000
    checks["promoted_after_restart"], checks["next_canary_against_promoted"] = True, against_promoted
    return recoveries, checks


def _tide_deployment(redis_url: str) -> dict[str, Any]:
    """Two inference pods, an external Redis, a registry PVC; rollout decided after 1,000 tokens each side."""
    return {"apiVersion": "tide.dev/v1alpha1", "kind": "TideDeployment", "metadata": {"name": DEP, "namespace": NS},
            "spec": {"model": {"path": "/models/target"}, "draft": {"initialPath": "/models/draft"},
                     "inference": {"replicas": len(OPERATOR_PODS), "image": "tide-inference",
                                   "nodeSelector": {"pool": "inference"}},
                     "training": {"nodeSelector": {"pool": "training"}},
                     "redis": {"url": redis_url}, "registry": {"claimName": "drafts"},
                     "rollout": {"minTokens": 1000, "maxTokens": 100_000, "heartbeatInterval": "1s"}}}


class _ExceptionCount(logging.Handler):
    """Counts log records carrying an exception: kopf logs a handler's unexpected exception with its traceback
    (a `TemporaryError`, the operator's own way to wait, comes without one)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.count += record.exc_info is not None


DRILLS: dict[str, Callable[[bool], Drill]] = {
    "redis-paused": drill_paused,
    "clients-killed": drill_clients_killed,
    "maxmemory": drill_maxmemory,
    "backlog-full": drill_backlog,
    "poison": drill_poison,
    "tls": drill_tls,
    "registry": drill_registry,
    "trainer-killed": drill_trainer_killed,
    "operator-restarted": drill_operator_restarted,
}


def _table(drills: list[Drill]) -> Table:
    table = Table(title="fault drills (real redis-server, CPU)")
    for col in ("drill", "injected", "producer max stall ms", "lost", "duplicates", "crashes", "recovery s", "checks"):
        table.add_column(col)
    for d in drills:
        table.add_row(d.name, d.injected, f"{d.max_stall_ms:.2f}", str(d.lost), str(d.duplicates), str(d.crashes),
                      "never" if d.recovery_s is None else f"{d.recovery_s:.2f}",
                      ", ".join(f"{k}: {'ok' if v else 'FAILED'}" for k, v in d.checks.items()) or "-")
    return table


def run(quick: bool, console: Console, drills: str = "all") -> BenchReport:
    names = list(DRILLS) if drills == "all" else drills.split(",")
    results = []
    with console.status("") as status:
        for name in names:
            status.update(f"drill {name}")
            results.append(DRILLS[name](quick))
    console.print(_table(results))
    return BenchReport(
        name="faults", quick=quick,
        figures={"drills": [d.model_dump() | {"ok": d.ok} for d in results]},
        goals=[
            goal("lost", sum(d.lost for d in results), "entries", "<=", 0),
            goal("crashes", sum(d.crashes for d in results), "exceptions", "<=", 0),
            goal("drills_recovered", sum(d.ok for d in results), "drills", ">=", len(results)),
            # submit() only queues; what shows here is the GIL shared with the drill's own threads
            goal("max_producer_stall_ms", max(d.max_stall_ms for d in results), "ms", "<", 50),
        ],
    )
