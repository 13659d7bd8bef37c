"""The plugin's runtime, wired from TIDE's settings around SGLang's draft worker, in a scheduler process.

Imported by the first hook call (hooks.build_runtime), never when the plugin registers: it pulls in
prometheus_client, which must not be imported before SGLang's launcher sets PROMETHEUS_MULTIPROC_DIR (hooks.py).
"""

import logging
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from tide_sglang.control import SpeculationController
from tide_sglang.draft.registry import MANIFEST, Manifest, open_registry
from tide_sglang.plugin.capture import Capturer
from tide_sglang.plugin.link import HelperLink
from tide_sglang.plugin.metrics import PluginMetrics
from tide_sglang.plugin.runtime import ControllerFactory, Runtime
from tide_sglang.plugin.slab import Slab
from tide_sglang.plugin.speculation import StepDecider, StepTable, load_profile
from tide_sglang.plugin.swap import SwapRefused, baseline_from_dir
from tide_sglang.plugin.swapper import DraftHandle, Swapper
from tide_sglang.rollout import StatsReporter
from tide_sglang.settings import TideSettings
from tide_sglang.sources import local_dir
from tide_sglang.stream import connect

log = logging.getLogger("tide.plugin")

TriggerReport = Callable[[], dict[str, float | bool | str]]
_metrics: dict[str, PluginMetrics] = {}  # Prometheus metrics exist once per process (a rebuilt runtime reuses them)


def _is_publisher() -> bool:
    """Attention-TP rank 0 of the last pipeline stage; a process without torch.distributed is alone."""
    if not dist.is_initialized():
        return True
    from sglang.srt.runtime_context import get_parallel

    parallel = get_parallel()
    return parallel.attn_tp_rank == 0 and parallel.pp_group.is_last_rank


def _pipelined() -> bool:
    """Pipeline parallelism: SGLang processes a result rebuilt from tensors relayed between stages, not the one
    the verify returned, so a decode capture never learns its commit; capture is off (logged), the rest works."""
    if not dist.is_initialized():
        return False
    from sglang.srt.runtime_context import get_parallel

    if get_parallel().pp_size <= 1:
        return False
    log.warning("TIDE capture is off: SGLang runs with pipeline parallelism (--pp-size > 1), which it does not "
                "support; hot swap and speculation control still run")
    return True


def _all_reduce_min(vector: torch.Tensor) -> None:
    if not dist.is_initialized():
        return
    from sglang.srt.runtime_context import get_parallel

    group = get_parallel().tp_group.cpu_group  # gloo: the vector stays on the host, no CUDA sync
    if dist.get_world_size(group) > 1:
        dist.all_reduce(vector, op=dist.ReduceOp.MIN, group=group)


def runtime(settings: TideSettings, draft_worker: Any, decider: StepDecider | None, trigger: TriggerReport) -> Runtime:
    """`draft_worker`: SGLang's EagleDraftWorker, None on pipeline stages that do not host the draft; `decider`: one
    an embedding installed (hooks.set_step_decider), else TIDE's controller when TIDE_CONTROL_PROFILE is set;
    `trigger`: the training trigger's state for the heartbeat."""
    metrics = _metrics.get(settings.deployment) or _metrics.setdefault(settings.deployment,
                                                                       PluginMetrics(settings.deployment))
    client = connect(settings, check=False)  # lazy: connects on first command, from the swapper's thread
    publisher = draft_worker is not None and _is_publisher()
    capturer = _capturer(settings, draft_worker) if publisher and not _pipelined() else None
    # Swap failures are rare: the publishing rank adds each at once, from the swapper's thread.
    stats = (StatsReporter(lambda: client, settings.namespace, settings.deployment, interval_s=0.0)
             if publisher else None)
    swapper = _swapper(settings, draft_worker, metrics, stats, client, trigger)
    if swapper is not None and capturer is not None:
        capturer.version = swapper.current
    steps = StepTable(decider)
    return Runtime(settings, metrics, capturer, swapper, steps, _all_reduce_min, _controller(settings, decider))


def _capturer(settings: TideSettings, draft_worker: Any) -> Capturer:
    """The publishing rank's capture: a slab shared with a helper process that writes rows and counts to Redis."""
    runner = draft_worker.draft_runner
    slab = Slab.create(settings.capture_ring_slots, settings.capture_slot_mib << 20)
    device = str(draft_worker.device)
    if device.startswith("cuda"):
        slab.pin()
    config = {"slab": slab.name, "slots": slab.slots, "slot_bytes": slab.slot_bytes,
              "aux_layers": _aux_layers(runner.model),
              "vocab_size": int(draft_worker.target_worker.model_config.vocab_size)}
    return Capturer(slab, HelperLink(slab, config), device, collect=settings.capture_sample_rate > 0)


def _controller(settings: TideSettings, decider: StepDecider | None) -> ControllerFactory | None:
    """TIDE's controller when TIDE_CONTROL_PROFILE is set and no decider was installed; the profile is read now,
    so a bad file fails here (a pending one when it appears). registry=None: SGLang's scheduler runs Prometheus in
    multiprocess mode."""
    if settings.control_profile is None:
        return None
    if decider is not None:
        log.warning("a step decider was installed with set_step_decider: TIDE_CONTROL_PROFILE is ignored")
        return None
    path = settings.control_profile
    if settings.control_profile_pending and not path.exists():
        # `tide serve`'s start-up profile is measuring this server; its file appears (whole: written aside and
        # renamed) when it is done, and the controller starts at the next sync point after that
        return lambda candidates: (SpeculationController(load_profile(path), settings, candidates=candidates,
                                                         registry=None) if path.exists() else None)
    profile = load_profile(path)
    return lambda candidates: SpeculationController(profile, settings, candidates=candidates, registry=None)


def _aux_layers(model: Any) -> int:
    """K: target layers the EAGLE-3 draft fuses (SGLang resolved it into its LlamaModel)."""
    return int(getattr(getattr(model, "model", None), "num_aux_hidden_states", 3))


def _swapper(settings: TideSettings, draft_worker: Any, metrics: PluginMetrics, stats: StatsReporter | None,
             client: Any, trigger: TriggerReport) -> Swapper | None:
    if settings.registry is None or draft_worker is None:
        return None
    served = draft_worker.server_args.speculative_draft_model_path
    path = local_dir(served) if served else None  # a hub id: the snapshot SGLang downloaded
    if path is None:
        log.error("hot-swap disabled: the draft %r is not a local checkpoint directory (or a hub id in the local "
                  "cache) to compare versions with", served)
        return None
    try:
        baseline = baseline_from_dir(path)
        registry = open_registry(settings.registry)
    except (SwapRefused, OSError, ValueError) as e:
        log.error("hot-swap disabled: %s", e)
        return None
    manifest = path / MANIFEST
    version = Manifest.model_validate_json(manifest.read_bytes()).version if manifest.is_file() else 0
    model = draft_worker.draft_runner.model
    hot = {id(t): t for t in (draft_worker.hot_token_id, model.hot_token_id) if t is not None}
    handle = DraftHandle(load_weights=model.load_weights, param_names=[n for n, _ in model.named_parameters()],
                         shared={"lm_head.weight"} if getattr(model, "load_lm_head_from_target", False) else set(),
                         hot_token_ids=list(hot.values()), pin=torch.cuda.is_available())
    swapper = Swapper(registry, baseline, handle, version, pod=settings.pod_name, namespace=settings.namespace,
                      deployment=settings.deployment, client=lambda: client, metrics=metrics, stats=stats,
                      allow_vocab_change=settings.swap_allow_vocab_change, trigger=trigger)
    # One heartbeat per pod: the publishing rank's (the one given `stats`).
    swapper.start(settings.swap_poll_s, settings.heartbeat_s if stats is not None else None)
    return swapper
