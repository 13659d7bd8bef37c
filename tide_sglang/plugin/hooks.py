"""The hook functions on SGLang's targets (targets.py) and the per-process runtime they share. Imports SGLang.

Capture and observation hooks never fail a batch: an error is logged (and, on the publishing rank, counted as a
drop). The sync hook is not guarded: a copy that fails after all ranks agreed would leave ranks serving different
drafts, so it stops the engine instead; it also builds the runtime, so a bad TIDE_CONTROL_PROFILE stops the engine
at its first batch instead of serving without the controller.

This module is imported when the plugin registers, in every SGLang process and before SGLang's launcher sets
PROMETHEUS_MULTIPROC_DIR: it must not import prometheus_client (which picks single- or multi-process values once,
at import), or the server process's own metrics (the tokenizer manager's: time to first token, request latency,
prompt and generation tokens) would never reach /metrics. The runtime's wiring (build.py) is imported with the
first hook call, in a scheduler process.
"""

from __future__ import annotations

import functools
import logging
import pkgutil
import random
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from sglang.srt.plugins.hook_registry import HookRegistry, HookType

from tide_sglang.plugin import targets
from tide_sglang.plugin.capture import FLAGS, TAG, flags

if TYPE_CHECKING:
    from tide_sglang.plugin.runtime import Runtime
    from tide_sglang.plugin.speculation import StepDecider
    from tide_sglang.settings import TideSettings

log = logging.getLogger("tide.plugin")

_runtime: Runtime | None = None
_decider: StepDecider | None = None
_thread_ns = time.thread_time_ns


class PluginPatchError(RuntimeError):
    """A hook target was not patched; the message names the targets and the SGLang version."""


def set_step_decider(decider: StepDecider | None) -> None:
    """Install the controller whose decisions override SGLang's adaptive steps (before the first batch)."""
    global _decider
    _decider = decider


def get_runtime(draft_worker: Any) -> Runtime:
    """The process's runtime, built on the first hook call (inside the scheduler process, after spawn)."""
    global _runtime
    if _runtime is None:
        _runtime = build_runtime(None, draft_worker)
    return _runtime


def use_runtime(runtime: Runtime | None) -> None:
    """Install a runtime built elsewhere (tests, or an embedding that wires its own pieces)."""
    global _runtime
    _runtime = runtime


def build_runtime(settings: TideSettings | None, draft_worker: Any) -> Runtime:
    """The runtime for `settings` (None: from the environment) around SGLang's draft worker (build.py)."""
    from tide_sglang.plugin import build
    from tide_sglang.settings import TideSettings

    return build.runtime(settings or TideSettings(), draft_worker, _decider, _trigger_report)


def _trigger_report() -> dict[str, float | bool | str]:
    """The training trigger's state for the heartbeat; empty while TIDE's controller is off."""
    controller = _runtime.controller if _runtime is not None else None
    return controller.trigger.report() if controller is not None else {}


def reset_runtime() -> None:
    """Close and forget the runtime (the next hook call builds a new one from the environment)."""
    global _runtime
    if _runtime is not None:
        _runtime.close()
    _runtime = None


TIME_EVERY = 16  # calls of a hook per timed one: reading a thread's CPU clock is a system call, not a vDSO read


def _timed(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Adds the scheduler thread's CPU time in `fn` to what the next tick reports (tide_plugin_scheduler_seconds):
    one call in TIME_EVERY of each hook is timed and counts TIME_EVERY times. Each hook has its own counter, from
    a random phase: with one counter shared by hooks that run a fixed number of times per batch, the same hook
    would be the timed one batch after batch."""
    calls = [random.randrange(TIME_EVERY)]

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        if calls[0] % TIME_EVERY:
            return fn(*args, **kwargs)
        t0 = _thread_ns()
        try:
            return fn(*args, **kwargs)
        finally:
            if _runtime is not None and _runtime.capturer is not None:
                _runtime.capturer.ns += (_thread_ns() - t0) * TIME_EVERY

    return wrapper


def _guarded(fn: Callable[..., None]) -> Callable[..., None]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        try:
            fn(*args, **kwargs)
        except Exception:
            log.exception("TIDE %s failed; the batch goes on without it", fn.__name__)
            if _runtime is not None and _runtime.capturer is not None:
                _runtime.capturer.dropped += 1

    return _timed(wrapper)


# -- hooks (signatures: HookRegistry's BEFORE fn(*args), AFTER fn(result, *args), AROUND fn(original, *args)) ---


@_guarded
def before_admit(scheduler: Any, req: Any, *args: Any, **kwargs: Any) -> None:
    """Once per request (and again after a retraction): its tag and rid go to the capture helper."""
    worker = scheduler.draft_worker
    if worker is not None and worker.draft_worker is not None:
        rt = get_runtime(worker.draft_worker)
        if rt.capturer is not None:
            rt.capturer.on_admit(req)


@_guarded
def after_idle(_: Any, scheduler: Any, *args: Any, **kwargs: Any) -> None:
    """Idle: post the slots of the last batches (their copies finish after the last commit hook ran); the next
    decode result follows idle time, which is no batch's."""
    if _runtime is not None:
        _runtime.idle()
    if _runtime is not None and _runtime.capturer is not None:
        _runtime.capturer.post_ready()


@_guarded
def after_verify(result: Any, worker: Any, batch: Any, *args: Any, **kwargs: Any) -> None:
    rt = get_runtime(worker.draft_worker)
    if rt.capturer is not None and not batch.forward_mode.is_idle():
        nd = result.speculative_num_draft_tokens or worker.speculative_num_draft_tokens
        rt.capturer.on_verify(batch, result, nd)


@_guarded
def before_prefill(draft_worker: Any, batch: Any, target_hidden_states: torch.Tensor, next_token_ids: torch.Tensor,
                   *args: Any, **kwargs: Any) -> None:
    rt = get_runtime(draft_worker)
    if rt.capturer is not None and not batch.forward_mode.is_idle():
        rt.capturer.on_prefill(batch, target_hidden_states, next_token_ids)


@_guarded
def before_commit(processor: Any, batch: Any, result: Any, *args: Any, **kwargs: Any) -> None:
    """Which requests commit this result, decided before SGLang's processing marks this batch's finishes."""
    if _runtime is None or (_runtime.capturer is None and _runtime.controller is None):
        return
    setattr(result, FLAGS, flags(batch.reqs))


@_guarded
def after_commit(_: Any, processor: Any, batch: Any, result: Any, *args: Any, **kwargs: Any) -> None:
    """Every rank: SGLang has waited for the result's device-to-host copy (`copy_done`) and turned the accept
    lengths into the host list `num_correct_drafts_per_req_cpu`, so reading them adds no GPU sync. The verify ran
    `speculative_num_draft_tokens - 1` draft steps (adaptive speculation runs topk 1: a chain)."""
    fin, committed = result.__dict__.pop(FLAGS, (None, None))
    correct, nd = result.num_correct_drafts_per_req_cpu, result.speculative_num_draft_tokens
    if _runtime is None or fin is None or nd is None:
        return
    if correct is not None:
        _runtime.observe(correct, committed, nd - 1)
    if _runtime.capturer is not None:
        _runtime.capturer.on_committed(result, batch.reqs, fin, committed, correct, nd)


@_timed
def before_forward(worker: Any, batch: Any, *args: Any, **kwargs: Any) -> None:
    draft_worker = worker.draft_worker
    if draft_worker is None:  # this pipeline stage hosts no draft: nothing to swap or steer
        return
    controller = worker.adaptive_controller
    get_runtime(draft_worker).sync(None if controller is None else _slots(controller.params))


_slots_of: tuple[Any, dict[int, list[int]]] | None = None  # (SGLang's adaptive params, their slots), built once


def _slots(params: Any) -> dict[int, list[int]]:
    """{batch size: candidate steps} of SGLang's adaptive slots; they are fixed at startup, so the dict is built
    once per params object instead of before every batch."""
    global _slots_of
    if _slots_of is None or _slots_of[0] is not params:
        _slots_of = (params, {bs: list(slot.candidate_steps) for bs, slot in params._slots.items()})
    return _slots_of[1]


@_timed
def _agreed_steps(params: Any, batch_size: int) -> int | None:
    """TIDE's agreed steps for the slot SGLang routes `batch_size` to; None before an agreement."""
    if _runtime is None:
        return None
    slot = params._route(batch_size)
    key = next((bs for bs, s in params._slots.items() if s is slot), None)
    return None if key is None else _runtime.steps.steps(key)


def around_steps(original: Callable[..., int], params: Any, batch_size: int, *args: Any, **kwargs: Any) -> int:
    default = original(params, batch_size, *args, **kwargs)
    agreed = _agreed_steps(params, batch_size)
    return default if agreed is None else agreed


def around_adaptive_update(original: Callable[..., int | None], params: Any, num_correct_drafts_per_req: Any,
                           batch_size: int, *args: Any, **kwargs: Any) -> int | None:
    """Once TIDE decides a slot, SGLang's own EMA must not switch it: its switch after a verify would only be
    undone before the next batch (`get_steps_for_batch`), rebuilding the runtime state twice per verify."""
    if _agreed_steps(params, batch_size) is not None:
        return None
    return original(params, num_correct_drafts_per_req, batch_size, *args, **kwargs)


HOOKS: tuple[tuple[targets.Target, Callable[..., Any]], ...] = (
    (targets.ADMIT, before_admit),
    (targets.IDLE, after_idle),
    (targets.VERIFY, after_verify),
    (targets.PREFILL, before_prefill),
    (targets.COMMIT, before_commit),
    (targets.COMMITTED, after_commit),
    (targets.FORWARD, before_forward),
    (targets.STEPS, around_steps),
    (targets.ADAPTIVE_UPDATE, around_adaptive_update),
)


def is_patched(path: str, hook: Callable[..., Any]) -> bool:
    """Whether the function at `path` is a HookRegistry wrapper chain that calls `hook`."""
    obj_path, attr = path.rsplit(".", 1)
    fn = pkgutil.resolve_name(obj_path).__dict__.get(attr)
    fn = getattr(fn, "__func__", fn)  # classmethod/staticmethod wrappers
    while fn is not None:
        if any(cell.cell_contents is hook for cell in getattr(fn, "__closure__", None) or ()):
            return True
        fn = getattr(fn, "__wrapped__", None)
    return False


def install(hooks: tuple[tuple[targets.Target, Callable[..., Any]], ...], sglang_version: str) -> None:
    """Register and apply `hooks`; raise `PluginPatchError` naming every target that was not patched
    (`apply_hooks` only logs a failure, and a silently missing hook would serve without TIDE)."""
    from sglang.srt.managers.schedule_batch import Req

    if not hasattr(Req, TAG):
        setattr(Req, TAG, -1)  # requests admitted before the plugin saw them are unregistered, not an error
    for target, hook in hooks:
        if not is_patched(target.path, hook):
            HookRegistry.register(target.path, hook, HookType[target.hook_type])
    HookRegistry.apply_hooks()
    missing = [t.path for t, hook in hooks if not _safe_is_patched(t.path, hook)]
    if missing:
        raise PluginPatchError(f"TIDE could not patch SGLang {sglang_version}: {missing} (supported SGLang: "
                               "see docs/sglang.md); refusing to serve without its hooks")


def _safe_is_patched(path: str, hook: Callable[..., Any]) -> bool:
    try:
        return is_patched(path, hook)
    except (ImportError, AttributeError, ValueError):
        return False
