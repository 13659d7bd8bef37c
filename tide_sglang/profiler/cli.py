"""`tide profile`: measure the controller's cost profile on a live server, write it, store it in the registry."""

import os
import signal
import sys
import threading
import time
from pathlib import Path

import click

from tide_sglang.plugin.cli import SLOTS, int_list


@click.command("profile")
@click.option("--metrics-url", default="http://127.0.0.1:30000/metrics", show_default=True,
              help="The server's Prometheus page (SGLang's /metrics with --enable-metrics; `tide engine`: "
              "TIDE_ENGINE_METRICS_PORT).")
@click.option("--url", help="The server's base URL: drive --batches concurrent /generate requests. Without it, "
              "the server's own traffic is timed.")
@click.option("--pod", help="The pod to force (its TIDE_POD_NAME). [TIDE_POD_NAME]")
@click.option("--steps", default="0,1,2,3,5", show_default=True, help="Draft step counts to time (0 is added).")
@click.option("--batches", default=",".join(str(b) for b in SLOTS), show_default=True,
              help="Concurrent requests to drive, with --url.")
@click.option("--min-samples", type=click.IntRange(1), default=16, show_default=True,
              help="Decode steps timed per batch size and step count.")
@click.option("--point-timeout-s", type=click.FloatRange(min=1), default=120, show_default=True,
              help="Longest wait for one batch size and step count (what was timed by then is kept).")
@click.option("--max-new-tokens", type=click.IntRange(1), default=256, show_default=True)
@click.option("--prompt", default="Write a long story about a lighthouse keeper.", show_default=True)
@click.option("--wait-s", type=click.FloatRange(min=0), default=0, show_default=True,
              help="Wait this long for the server's /metrics to answer first (a server still starting).")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=Path("tide-profile.json"),
              show_default=True, help="Where the profile goes (what TIDE_CONTROL_PROFILE reads).")
@click.option("--store", is_flag=True, help="Also store it in the draft registry under --target, --gpu and "
              "--sglang-version, where `tide serve` looks. [TIDE_REGISTRY_DIR or TIDE_REGISTRY_URL]")
@click.option("--target", help="The served model (SGLang's --model-path), for --store.")
@click.option("--gpu", default="", help="The GPU's name as torch.cuda.get_device_name() gives it, for --store.")
@click.option("--sglang-version", default="", help="The server's SGLang version, for --store.")
@click.option("--server-pid", type=click.IntRange(1), default=None,
              help="Stop (exit 3) when this process, the server profiled, exits: another server could come up on "
              "the same port and be profiled in its place. `tide serve` passes its own.")
def profile(metrics_url: str, url: str | None, pod: str | None, steps: str, batches: str, min_samples: int,
            point_timeout_s: float, max_new_tokens: int, prompt: str, wait_s: float, out: Path, store: bool,
            target: str | None, gpu: str, sglang_version: str, server_pid: int | None) -> None:
    """Time a live server's decode steps at every candidate step count, forced one after another through the
    control state (Redis, deployment and namespace from the TIDE_* variables), and write the cost profile."""
    from tide_sglang.draft.registry import ProfileKey, open_registry
    from tide_sglang.profiler.measure import Plan
    from tide_sglang.profiler.server import GenerateLoad, wait_until_up
    from tide_sglang.profiler.startup import profile_server
    from tide_sglang.settings import TideSettings

    if server_pid is not None:
        stop_with(server_pid)
    settings = TideSettings()
    registry = None
    if store:
        if settings.registry is None or not target or not gpu or not sglang_version:
            raise click.UsageError("--store needs a registry (TIDE_REGISTRY_DIR or TIDE_REGISTRY_URL), --target, "
                                   "--gpu and --sglang-version")
        registry = open_registry(settings.registry)
    if not wait_until_up(metrics_url, wait_s):
        raise click.ClickException(f"{metrics_url} did not answer within {wait_s:g} s")
    plan = Plan(steps=int_list(steps), batches=int_list(batches) if url else None, min_samples=min_samples)
    load = GenerateLoad(url, prompt, max_new_tokens) if url else None
    run = profile_server(settings, plan, metrics_url=metrics_url, pod=pod or settings.pod_name, load=load,
                         point_timeout_s=point_timeout_s, device=gpu)
    if load is not None and load.errors:
        click.echo(f"tide profile: {load.errors} /generate requests failed (retried)", err=True)
    run.profile.save(out)
    if registry is not None:
        registry.put_profile(ProfileKey(target=target, gpu=gpu, sglang=sglang_version),
                             run.profile.model_dump_json(indent=2))
    click.echo(f"tide profile: {len(run.samples)} points in {run.seconds:.0f} s -> {out}"
               + (f" and {registry.location}" if registry is not None else ""))


SERVER_GONE = 3  # exit status when the profiled server exited first


def stop_with(pid: int, poll_s: float = 1.0) -> None:
    """Exit when process `pid` is gone: a watcher thread signals this process, whose handler raises SystemExit in
    the main thread, so the profile's `finally` blocks still run (the forced steps are cleared)."""

    def gone(*_: object) -> None:
        click.echo(f"tide profile: the server (pid {pid}) exited; stopping", err=True)
        sys.exit(SERVER_GONE)

    def watch() -> None:
        while True:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                os.kill(os.getpid(), signal.SIGUSR1)
                return
            except PermissionError:  # alive, owned by another user
                pass
            time.sleep(poll_s)

    signal.signal(signal.SIGUSR1, gone)
    threading.Thread(target=watch, name="tide-profile-server-watch", daemon=True).start()
