"""The SGLang plugin: capture, hot-swap and speculation-control hooks (docs/sglang.md).

Registered through the `sglang.srt.plugins` entry point, so `load_plugins()` calls `register()` first thing in
every SGLang process (scheduler processes included). This package is the only part of TIDE that imports SGLang,
and it does so only when `register()` runs, so `tide --help` works without SGLang installed.
"""

import logging
import os

from tide_sglang.plugin import versions

log = logging.getLogger("tide.plugin")


ENABLED = "TIDE_ENABLED"  # `tide serve` and the operator set it to 1: installing the package patches nothing


def register() -> None:
    """Entry point: with TIDE_ENABLED=1, check the SGLang version, register and apply every hook, check each was
    patched. Without it, nothing is patched and the SGLang version is not looked at.

    SGLang's loader logs and swallows exceptions from plugins, which would leave a server running without TIDE
    while the operator believes it has it; so a failure here exits the process (SystemExit is not caught).
    """
    if os.environ.get(ENABLED) != "1":
        log.debug("TIDE plugin installed but not enabled (%s=1 enables it)", ENABLED)
        return
    try:
        version = versions.check(versions.installed())
    except versions.UnsupportedSGLang as e:
        log.critical("%s", e)
        raise SystemExit(f"tide plugin: {e}") from e
    from tide_sglang.plugin.hooks import HOOKS, PluginPatchError, install

    try:
        install(HOOKS, version)
    except PluginPatchError as e:
        log.critical("%s", e)
        raise SystemExit(f"tide plugin: {e}") from e
    log.info("TIDE hooks active on SGLang %s", version)
