"""A private `redis-server` on a free loopback port, for the demo, benchmarks and tests.

Production uses the Redis the TideDeployment names; this exists so that nothing local relies on a server left
running. No persistence: the stream is a transport, and the demo's data lives for one run.
"""

import random
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

import redis


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def free_port(cluster_bus: bool = False) -> int:
    """A free loopback port; for a cluster node also its bus port (+10000), so below 55536."""
    if not cluster_bus:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(20000, 45000)
        if _bindable(port) and _bindable(port + 10000):
            return port
    raise RuntimeError("no free port pair for a Redis Cluster node")


def _binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise RuntimeError(f"{name} is not installed: run `make redis` (apt-get install redis-server)")
    return path


class LocalRedis:
    """One `redis-server` process; `stop()` then `start()` restarts it on the same port (fault tests)."""

    def __init__(self, port: int | None = None, password: str | None = None, *extra: str) -> None:
        self.port = port or free_port()
        self.password = password
        self.extra = extra
        self._dir = Path(tempfile.mkdtemp(prefix=f"tide-redis-{self.port}-"))
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self) -> "LocalRedis":
        args = [_binary("redis-server"), "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "no", "--dir", str(self._dir), "--protected-mode", "no", *self.extra]
        if self.password:
            args += ["--requirepass", self.password]
        self._proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        client = redis.Redis(port=self.port, password=self.password, socket_connect_timeout=0.2)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                return self
            except redis.ConnectionError:
                if self._proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server on port {self.port} did not start") from None
                time.sleep(0.02)
            finally:
                client.close()

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
        self._proc = None

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> "LocalRedis":
        return self.start()

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.close()


class LocalRedisCluster:
    """A Redis Cluster of `nodes` masters on loopback, created with `redis-cli --cluster create`."""

    def __init__(self, nodes: int = 3) -> None:
        self.servers = [LocalRedis(free_port(cluster_bus=True), None, "--cluster-enabled", "yes") for _ in range(nodes)]

    @property
    def url(self) -> str:
        return self.servers[0].url

    def __enter__(self) -> "LocalRedisCluster":
        for s in self.servers:
            s.start()
        addrs = [f"127.0.0.1:{s.port}" for s in self.servers]
        subprocess.run([_binary("redis-cli"), "--cluster", "create", *addrs, "--cluster-replicas", "0",
                        "--cluster-yes"], check=True, capture_output=True, timeout=60)
        deadline = time.monotonic() + 30
        for s in self.servers:
            client = redis.Redis(port=s.port)
            while client.cluster("info").get("cluster_state") != "ok":
                if time.monotonic() > deadline:
                    raise RuntimeError("local Redis Cluster did not reach cluster_state:ok")
                time.sleep(0.05)
            client.close()
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        for s in self.servers:
            s.close()
