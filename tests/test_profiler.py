"""`tide profile` against the real reference engine as a black box: `tide engine --http-port` in its own process,
driven by `tide profile` through /generate at 1 and 4 concurrent requests, its steps forced through the control
state on a real redis-server, its decode steps timed from its own /metrics; the profile stored beside the draft
and found there by the next pod."""

import json
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from tests.helpers import untrained_draft
from tests.prometheus import free_port
from tide_sglang.cli import main
from tide_sglang.control import Profile
from tide_sglang.draft import DirectoryRegistry
from tide_sglang.draft.target import load_target
from tide_sglang.profiler.server import STEP_METRIC, delta, scrape, step_totals
from tide_sglang.profiler.startup import startup_profile
from tide_sglang.rollout import read_control
from tide_sglang.settings import TideSettings
from tide_sglang.stream import connect

POD = "pod-p"


def test_step_totals_read_one_deployment_over_versions() -> None:
    page = "\n".join([
        f'{STEP_METRIC}_sum{{deployment="d",draft_version="0",batch_size="4",draft_steps="3"}} 1.5',
        f'{STEP_METRIC}_count{{deployment="d",draft_version="0",batch_size="4",draft_steps="3"}} 10',
        f'{STEP_METRIC}_sum{{deployment="d",draft_version="1",batch_size="4",draft_steps="3"}} 0.5',
        f'{STEP_METRIC}_count{{deployment="d",draft_version="1",batch_size="4",draft_steps="3"}} 2',
        f'{STEP_METRIC}_bucket{{deployment="d",draft_version="1",batch_size="4",draft_steps="3",le="0.1"}} 2',
        f'{STEP_METRIC}_count{{deployment="other",draft_version="0",batch_size="4",draft_steps="3"}} 99',
        f'{STEP_METRIC}_count{{deployment="d",draft_version="0",batch_size="8",draft_steps="0"}} 7',
        f'{STEP_METRIC}_sum{{deployment="d",draft_version="0",batch_size="8",draft_steps="0"}} 0.7',
    ])
    totals = step_totals(f"# TYPE {STEP_METRIC} histogram\n{page}\n", "d")
    assert totals == {(4, 3): (2.0, 12), (8, 0): (0.7, 7)}
    assert delta({(4, 3): (1.0, 10)}, totals, 3) == {4: (1.0, 2)}
    assert delta(totals, totals, 3) == {}


@pytest.fixture
def engine(settings: TideSettings, tmp_path: Path) -> Iterator[tuple[str, str]]:
    """`tide engine` serving /generate and /metrics; --steps 2, so any other step count it runs was forced."""
    target = load_target()
    draft = untrained_draft(target)
    registry = DirectoryRegistry(tmp_path / "registry", create=True)
    registry.store_initial(draft.config, draft.vocab, draft.draft_tensors())
    del target, draft
    http, metrics = free_port(), free_port()
    env = {**os.environ, "TIDE_REDIS_URL": settings.redis_url, "TIDE_NAMESPACE": settings.namespace,
           "TIDE_DEPLOYMENT": settings.deployment, "TIDE_POD_NAME": POD, "TIDE_SWAP_POLL_S": "0.1",
           "TIDE_ENGINE_METRICS_PORT": str(metrics), "TIDE_CAPTURE_SAMPLE_RATE": "0"}
    log = (tmp_path / "engine.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "tide_sglang.cli", "engine", "--registry", registry.location,
                             "--version", "0", "--steps", "2", "--batch-size", "4", "--max-new-tokens", "8",
                             "--http-port", str(http)], env=env, stdout=log, stderr=subprocess.STDOUT)
    url, metrics_url = f"http://127.0.0.1:{http}", f"http://127.0.0.1:{metrics}/metrics"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, (tmp_path / "engine.log").read_text()[-3000:]
            try:
                request = urllib.request.Request(url + "/generate", data=json.dumps({"text": "Hi"}).encode())
                with urllib.request.urlopen(request, timeout=60) as response:
                    assert json.load(response)["meta_info"]["completion_tokens"] > 0
                scrape(metrics_url)
                break
            except OSError:
                assert time.monotonic() < deadline, "tide engine did not answer"
                time.sleep(0.5)
        yield url, metrics_url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_profile_of_a_live_engine_forced_through_the_control_state(engine, settings: TideSettings, tmp_path: Path,
                                                                   monkeypatch) -> None:
    """`tide profile --store`, the command `tide serve` runs beside a starting server, against `tide engine`."""
    url, metrics_url = engine
    registry = DirectoryRegistry(tmp_path / "profiles", create=True)
    for name, value in {"TIDE_REDIS_URL": settings.redis_url, "TIDE_NAMESPACE": settings.namespace,
                        "TIDE_DEPLOYMENT": settings.deployment, "TIDE_REGISTRY_DIR": str(registry.root)}.items():
        monkeypatch.setenv(name, value)
    out = tmp_path / "profile.json"
    result = CliRunner().invoke(main, [
        "profile", "--url", url, "--metrics-url", metrics_url, "--pod", POD, "--steps", "3", "--batches", "1,4",
        "--min-samples", "3", "--point-timeout-s", "60", "--max-new-tokens", "8", "--prompt", "A poem on the sea.",
        "--out", str(out), "--store", "--target", "smollm2-135m", "--gpu", "cpu", "--sglang-version", "none"])
    assert result.exit_code == 0, result.output
    assert "4 points in" in result.output  # and how long it took: what `tide serve` reports it added
    profile = Profile.load(out)  # what TIDE_CONTROL_PROFILE reads
    timed = {(t.batch, t.steps): t.seconds for t in profile.steps}
    assert set(timed) == {(1, 0), (1, 3), (4, 0), (4, 3)}  # times themselves: a shared 2-core CPU is too noisy
    assert [p.n for p in profile.target] == [1, 4]
    assert read_control(connect(settings), settings.namespace, settings.deployment) is None  # released
    # the engine runs 2 steps by itself: 3 ran only while forced
    ran = step_totals(scrape(metrics_url), settings.deployment)
    assert sum(n for (_, g), (_, n) in ran.items() if g == 3) >= 6

    # the next pod of this target, GPU and SGLang version (a restart) starts with it and measures nothing
    started = startup_profile(["--model-path", "smollm2-135m"], settings, DirectoryRegistry(registry.root),
                              gpu="cpu", sglang="none", path=tmp_path / "next.json", steps=[3])
    assert started.child is None and Profile.load(tmp_path / "next.json") == profile
