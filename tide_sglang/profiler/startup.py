"""The profile a server starts with: the registry's for its target, GPU and SGLang version, else measured once.

`tide serve` is a thin adapter over these (it needs a GPU); the functions are tested against `tide engine`.
"""

import json
import logging
import os
import sys
from pathlib import Path

from pydantic import BaseModel

from tide_sglang.control import Profile
from tide_sglang.draft.registry import DraftRegistry, ProfileKey
from tide_sglang.profiler.measure import Plan, ProfileRun, measure
from tide_sglang.profiler.server import Load, Server
from tide_sglang.settings import TideSettings
from tide_sglang.stream import connect

log = logging.getLogger("tide.profiler")


def profile_server(settings: TideSettings, plan: Plan, *, metrics_url: str, pod: str, load: Load | None = None,
                   point_timeout_s: float = 120.0, device: str = "") -> ProfileRun:
    """Profile one pod of the deployment `settings` names, from outside."""
    server = Server(connect(settings), settings.namespace, settings.deployment, pod, metrics_url,
                    min_samples=plan.min_samples, load=load, point_timeout_s=point_timeout_s)
    return measure(plan, server.force, server.run, device=device)


class StartupProfile(BaseModel):
    """What `tide serve` adds before it starts SGLang: environment for the plugin, and the `tide profile` command to
    run beside the server when the registry holds no profile yet (None: the registry's is used)."""

    env: dict[str, str]
    child: list[str] | None


def _value(argv: list[str], flag: str, default: str) -> str:
    """An SGLang flag's value, as `--flag value` or `--flag=value` (the last one wins, as argparse does)."""
    value = default
    for i, arg in enumerate(argv):
        if arg == flag and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith(flag + "="):
            value = arg.split("=", 1)[1]
    return value


def pinned_steps(argv: list[str]) -> bool:
    """Whether the user's own `--speculative-adaptive-config` gives every batch-size slot a single candidate: the
    steps are pinned and the controller has nothing to choose, so no profile is needed (and a start-up profile
    would force other step counts on the server while it serves). A config that cannot be read is an error."""
    path = _value(argv, "--speculative-adaptive-config", "")
    if not path:
        return False
    try:
        slots = json.loads(Path(path).read_text())
        return bool(slots) and all(len(set(slot["candidate_steps"])) == 1 for slot in slots.values())
    except (KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"--speculative-adaptive-config {path}: not SGLang's adaptive config ({e!r})") from None


def startup_profile(argv: list[str], settings: TideSettings, registry: DraftRegistry, *, gpu: str, sglang: str,
                    path: Path, steps: list[int]) -> StartupProfile:
    """The registry's profile for this target, GPU and SGLang version, written to `path`; else a pending profile:
    the plugin starts its controller once `path` exists, which the returned `tide profile` command (run beside
    the server, against it) writes after timing `steps` at every adaptive slot size, storing it in the registry."""
    key = ProfileKey(target=_value(argv, "--model-path", ""), gpu=gpu, sglang=sglang)
    stored = registry.get_profile(key)
    if stored is not None:
        try:
            Profile.model_validate_json(stored).save(path)
            return StartupProfile(env={"TIDE_CONTROL_PROFILE": str(path)}, child=None)
        except ValueError as e:
            log.warning("the stored profile %s in %s is unusable, measuring again: %s", key.file_name(),
                        registry.location, e)
    host, port = _value(argv, "--host", "127.0.0.1"), _value(argv, "--port", "30000")
    base = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"
    child = [sys.executable, "-m", "tide_sglang.cli", "profile", "--url", base, "--metrics-url", f"{base}/metrics",
             "--pod", settings.pod_name, "--steps", ",".join(str(g) for g in steps), "--out", str(path),
             "--store", "--target", key.target, "--gpu", gpu, "--sglang-version", sglang, "--wait-s", "1800",
             "--server-pid", str(os.getpid())]  # `tide serve` execs into SGLang: this pid is the server's
    return StartupProfile(env={"TIDE_CONTROL_PROFILE": str(path), "TIDE_CONTROL_PROFILE_PENDING": "1"},
                          child=child)
