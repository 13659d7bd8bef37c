"""`tide serve`: SGLang's server with the TIDE plugin and TIDE's settings; SGLang's arguments pass unchanged.

TIDE adds only what is absent: EAGLE-3 with topk 1, adaptive speculation whose candidate steps include 0 (so the
controller can switch speculation off), metrics, the registry's newest draft when no draft path is given, and,
without TIDE_CONTROL_PROFILE, the registry's cost profile for this target, GPU and SGLang version, or a `tide
profile` of the starting server that stores one (profiler/startup.py).
TIDE's own settings come from TIDE_* variables (TideSettings), never from SGLang's flags.
"""

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import click

from tide_sglang.plugin import ENABLED, versions
from tide_sglang.plugin.speculation import ProfileError, load_profile
from tide_sglang.settings import TideSettings

# Batch-size slots of SGLang's adaptive config: each gets every candidate, so TIDE's decision can differ by size.
SLOTS = (1, 2, 4, 8, 16, 32, 64, 128)


def adaptive_config(candidates: list[int]) -> dict[str, dict]:
    steps = sorted({0, *candidates})
    return {str(bs): {"candidate_steps": steps} for bs in SLOTS}


def _has(argv: list[str], flag: str) -> bool:
    return any(a == flag or a.startswith(flag + "=") for a in argv)


def serve_argv(argv: list[str], *, candidates: list[int], config_path: Path, draft_path: Path | None) -> list[str]:
    """SGLang's argv: the user's, unchanged and first, plus TIDE's defaults for what the user did not set."""
    defaults = [("--speculative-algorithm", "EAGLE3"), ("--speculative-eagle-topk", "1"),
                ("--speculative-adaptive-config", str(config_path))]
    if draft_path is not None:
        defaults.append(("--speculative-draft-model-path", str(draft_path)))
    extra = [x for flag, value in defaults if not _has(argv, flag) for x in (flag, value)]
    extra += [flag for flag in ("--speculative-adaptive", "--enable-metrics") if not _has(argv, flag)]
    if not _has(argv, "--speculative-adaptive-config"):
        config_path.write_text(json.dumps(adaptive_config(candidates)))
    return [*argv, *extra]


def int_list(text: str, items: str = "integers", negative: str = "expected non-negative integers") -> list[int]:
    """A comma-separated list of non-negative integers from the command line; `items` and `negative` word the
    errors."""
    try:
        values = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a comma-separated list of {items}") from None
    if not values or min(values) < 0:
        raise click.BadParameter(negative)
    return values


@click.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True,
                                 "help_option_names": []})
@click.option("--tide-candidate-steps", default="0,1,2,3,5", show_default=True,
              help="Draft steps SGLang prepares CUDA graphs for; 0 (speculation off) is always added.")
@click.option("--tide-dry-run", is_flag=True, help="Print SGLang's command line instead of starting it.")
@click.argument("sglang_args", nargs=-1, type=click.UNPROCESSED)
def serve(tide_candidate_steps: str, tide_dry_run: bool, sglang_args: tuple[str, ...]) -> None:
    """Start SGLang's server with the TIDE plugin (capture, hot-swap, speculation control).

    Every argument not starting with --tide- goes to SGLang unchanged (`tide serve --help` shows SGLang's help).
    """
    try:
        versions.check(versions.installed())
    except versions.UnsupportedSGLang as e:
        raise click.ClickException(str(e)) from None
    settings = TideSettings()  # fail here, before SGLang starts, on a bad TIDE_* variable or cost profile
    if settings.control_profile is not None:
        try:
            load_profile(settings.control_profile)
        except ProfileError as e:
            raise click.ClickException(str(e)) from None
    argv = list(sglang_args)
    candidates = int_list(tide_candidate_steps, "step counts", "candidate steps must be non-negative integers")
    draft, registry, started = None, None, None
    if settings.registry is not None:
        from tide_sglang.draft.registry import DraftVerificationError, open_registry
        from tide_sglang.profiler.startup import pinned_steps, startup_profile

        try:
            pinned = pinned_steps(argv)
        except (OSError, ValueError) as e:
            raise click.ClickException(str(e)) from None
        try:  # verified, and on local disk (an S3 registry stages it): SGLang reads it from there
            registry = open_registry(settings.registry)
            latest = registry.latest()
            if not _has(argv, "--speculative-draft-model-path") and latest is not None:
                draft = registry.verify(latest).path
            if settings.control_profile is None and not pinned:
                # the registry's profile for this GPU, or one measured now (none when the steps are pinned)
                started = startup_profile(argv, settings, registry, gpu=gpu_name(), sglang=versions.installed() or "",
                                          path=Path(tempfile.gettempdir()) / f"tide-profile-{os.getpid()}.json",
                                          steps=candidates)
        except (DraftVerificationError, OSError, ValueError) as e:
            raise click.ClickException(f"draft registry {settings.registry}: {e}") from None
    config = Path(tempfile.gettempdir()) / f"tide-adaptive-{os.getpid()}.json"
    command = [sys.executable, "-m", "sglang.launch_server",
               *serve_argv(argv, candidates=candidates, config_path=config, draft_path=draft)]
    plugins = os.environ.get("SGLANG_PLUGINS")
    if plugins and "tide" not in plugins.split(","):
        os.environ["SGLANG_PLUGINS"] = plugins + ",tide"  # a whitelist without TIDE would skip the plugin
    if tide_dry_run:
        click.echo(" ".join(command))
        if started is not None:
            click.echo(" ".join(f"{k}={v}" for k, v in sorted(started.env.items())))
            if started.child is not None:
                click.echo(" ".join(started.child))
        return
    if started is not None:
        os.environ.update(started.env)
        if started.child is not None:
            # A process of its own, which outlives the exec below: it waits for the server SGLang becomes,
            # profiles it, stores the profile in the registry and says how long that took.
            subprocess.Popen(started.child, start_new_session=True)
    os.environ[ENABLED] = "1"  # the entry point patches SGLang only when asked (installing TIDE changes nothing)
    os.execv(sys.executable, command)


def gpu_name() -> str:
    """The GPU a cost profile is keyed by (the first visible one; `cpu` without CUDA)."""
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
