"""Entry point, hook targets and their signatures, and registration through SGLang's real HookRegistry."""

import inspect
import os
import pkgutil
import re
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest
from sglang.srt.plugins.hook_registry import HookRegistry

import tide_sglang.plugin
from tide_sglang.plugin import hooks, targets, versions


def _original(path: str):
    obj_path, attr = path.rsplit(".", 1)
    return inspect.unwrap(getattr(pkgutil.resolve_name(obj_path), attr))


def test_entry_point_loads_register() -> None:
    found = [ep for ep in entry_points(group="sglang.srt.plugins") if ep.name == "tide"]
    assert [ep.value for ep in found] == ["tide_sglang.plugin:register"]
    assert found[0].load() is tide_sglang.plugin.register


@pytest.mark.parametrize("target", targets.ALL, ids=lambda t: t.path.rsplit(".", 2)[-2] + "." + t.hook_type)
def test_every_target_exists_with_the_expected_signature(target: targets.Target) -> None:
    params = list(inspect.signature(_original(target.path)).parameters)
    assert params[: len(target.params)] == list(target.params), f"{target.path}{params}"


def test_register_applies_every_hook_through_hook_registry_once() -> None:
    tide_sglang.plugin.register()
    tide_sglang.plugin.register()  # SGLang calls load_plugins() more than once per process: idempotent
    for target, hook in hooks.HOOKS:
        assert hooks.is_patched(target.path, hook), target.path
        registered = [h for _, h, _ in HookRegistry._hooks[target.path] if h is hook]
        assert len(registered) == 1, f"{target.path} registered {len(registered)} times"
        assert target.path in HookRegistry._patched


def test_registering_leaves_sglangs_own_metrics_in_multiprocess_mode(tmp_path: Path) -> None:
    """SGLang's launcher runs the entry point first, then sets PROMETHEUS_MULTIPROC_DIR, then creates the server
    process's metrics (the tokenizer manager's: time to first token, request latency, prompt and generation tokens).
    prometheus_client picks single- or multi-process values when it is first imported; had registering imported it,
    those metrics would stay in-process and never reach /metrics (seen in a GPU run's /metrics, 2026-12-02)."""
    code = ("import os, sys, tide_sglang.plugin as p\n"
            "p.register()\n"
            "print('prometheus_client' in sys.modules)\n"
            f"os.environ['PROMETHEUS_MULTIPROC_DIR'] = {str(tmp_path)!r}\n"  # what SGLang's launcher does next
            "from prometheus_client import Counter\n"
            "Counter('sglang_x_total', 'a server-process metric').inc()\n")
    env = {**os.environ, "TIDE_ENABLED": "1"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[-2] == "False"
    assert [f.name for f in tmp_path.iterdir()], "the counter did not go to the multiprocess directory"


def test_a_target_that_cannot_be_patched_fails_loudly_naming_the_version(monkeypatch) -> None:
    bogus = targets.Target("sglang.srt.speculative.eagle_worker_v2.EAGLEWorkerV2.no_such_method", "AFTER",
                           ("self",), "test")
    monkeypatch.setattr(hooks, "HOOKS", (*hooks.HOOKS, (bogus, hooks.after_verify)))
    with pytest.raises(SystemExit, match=rf"SGLang {re.escape(versions.installed())}.*no_such_method"):
        tide_sglang.plugin.register()
    HookRegistry._hooks.pop(bogus.path, None)


@pytest.mark.parametrize(("text", "ok"), [("0.5.17", True), ("0.5.23", True), ("0.5.20.post1", True),
                                          ("0.5.16", False), ("0.5.24", False), ("0.6.0", False), (None, False)])
def test_supported_versions(text: str | None, ok: bool) -> None:
    if ok:
        assert versions.check(text) == text
    else:
        with pytest.raises(versions.UnsupportedSGLang, match=r"0\.5\.17 through 0\.5\.23"):
            versions.check(text)


def test_installed_sglang_is_the_pinned_release() -> None:
    """The release the environment was built for (scripts/sglang-contract-env.sh records the requirements' pin)."""
    pin = Path(sys.prefix) / ".sglang-pin"
    if not pin.is_file():
        pytest.skip(f"{sys.prefix} was not built by scripts/sglang-contract-env.sh")
    assert versions.check(versions.installed()) == pin.read_text().strip()
