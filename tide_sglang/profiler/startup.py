"""The profile a server starts with: the registry's for its target, GPU and SGLang version, else measured once.

`tide serve` is a thin adapter over these (it needs a GPU); the functions are tested against `tide engine`.
"""

import logging
from collections.abc import Callable

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


def stored_or_measured(registry: DraftRegistry, key: ProfileKey,
                       run: Callable[[], ProfileRun]) -> tuple[Profile, float | None]:
    """The registry's profile for `key`, or `run()`'s, stored there for the next pod; with the seconds the
    measurement added (None: it came from the registry). A stored profile that no longer parses is measured
    again and replaced."""
    text = registry.get_profile(key)
    if text is not None:
        try:
            return Profile.model_validate_json(text), None
        except ValueError as e:
            log.warning("the stored profile %s in %s is unusable, measuring again: %s", key.file_name(),
                        registry.location, e)
    result = run()
    registry.put_profile(key, result.profile.model_dump_json(indent=2))
    log.info("profiled %s in %.1f s (stored in %s)", key.file_name(), result.seconds, registry.location)
    return result.profile, result.seconds
