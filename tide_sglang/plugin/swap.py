"""Hot-swap of the draft: pure checks over tensors, a stager thread, and the in-place copy between batches.

Order of events for version N named by the control state `tide:{<ns>/<deployment>}:ctl` for this pod:
1. the stager thread (off the scheduler's critical path) runs `DraftRegistry.load_tensors(N)` (verify() first:
   checksums, config, tensor names/shapes/dtypes, vocabulary hash), then `plan_swap` checks the tensors against
   the checkpoint the engine serves (same names, shapes, dtypes; no embed_tokens; d2t unchanged or allowed to
   change) and `uncovered` checks every draft parameter gets a tensor. Any failure refuses N: the old weights stay,
   the error is logged, counted and added to N's stats hash (`swap_failures`).
2. at a sync point between batches every TP rank contributes the version it could load (staged or current);
   an all-reduce MIN of (v, -v) gives min and max, and only when all ranks agree on a staged N do they copy.
3. the copy goes through SGLang's own `load_weights` (each parameter's weight_loader copies into the existing
   storage, sharding for TP), so CUDA graphs that captured those pointers stay valid.
"""

from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict
from safetensors import safe_open

from tide_sglang.rollout import ControlState

MAPS = ("d2t", "t2d")  # vocabulary maps: d2t feeds hot_token_id, t2d is unused by SGLang


class SwapRefused(ValueError):
    """A version cannot replace the serving draft; the message says which tensors and why."""


class Baseline(BaseModel):
    """The checkpoint the engine serves: every tensor's shape and dtype, and its d2t."""

    model_config = ConfigDict(arbitrary_types_allowed=True, frozen=True)

    specs: dict[str, tuple[tuple[int, ...], torch.dtype]]
    d2t: torch.Tensor | None


class SwapPlan(BaseModel):
    model_config = ConfigDict(arbitrary_types_allowed=True, frozen=True)

    version: int
    weights: dict[str, torch.Tensor]  # checkpoint names, without maps and embed_tokens
    hot_token_id: torch.Tensor | None  # new d2t + arange, when the vocabulary changes in place
    # the manifest's held-out accept lengths, the version's and its parent's (None: not recorded), for the trigger
    held_out: tuple[float | None, float | None] = (None, None)


def never_loaded(name: str) -> bool:
    """The draft's embed_tokens is the target's tensor: loading it would overwrite the target's embedding."""
    return "embed_tokens" in name


def baseline_from_dir(path: Path) -> Baseline:
    """Read the served checkpoint's tensor specs (headers only) and its d2t."""
    specs: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
    d2t = None
    for file in sorted(Path(path).glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                t = f.get_slice(name)
                specs[name] = (tuple(t.get_shape()), _dtype(t.get_dtype()))
                if name == "d2t":
                    d2t = f.get_tensor(name)
    if not specs:
        raise SwapRefused(f"no safetensors in {path}: cannot tell what a new version must match")
    return Baseline(specs=specs, d2t=d2t)


def _dtype(name: str) -> torch.dtype:
    return {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "I64": torch.int64,
            "I32": torch.int32, "BOOL": torch.bool}[name]


def plan_swap(version: int, staged: dict[str, torch.Tensor], baseline: Baseline, *,
              allow_vocab_change: bool) -> SwapPlan:
    """Check `staged` can be copied over the serving draft; raise `SwapRefused` naming every problem. The served
    checkpoint may be the user's own (imported as v0): `layers.0.*` names for `midlayer.*`, and no d2t (the whole
    vocabulary, which is what an imported v0 writes as an identity d2t)."""
    want = {_canonical(n): s for n, s in baseline.specs.items() if not never_loaded(n) and n not in MAPS}
    have = {n: (tuple(t.shape), t.dtype) for n, t in staged.items() if not never_loaded(n) and n not in MAPS}
    problems = []
    if missing := sorted(set(want) - set(have)):
        problems.append(f"missing {missing}")
    if extra := sorted(set(have) - set(want)):
        problems.append(f"unexpected {extra}")
    if wrong := sorted(n for n in set(want) & set(have) if want[n] != have[n]):
        problems.append("wrong shape/dtype " + ", ".join(f"{n}: {have[n]} != {want[n]}" for n in wrong))
    if problems:
        raise SwapRefused(f"draft v{version} does not fit the serving draft: " + "; ".join(problems))
    hot = None
    served = baseline.d2t if baseline.d2t is not None else torch.zeros_like(staged.get("d2t", torch.zeros(0)))
    if "d2t" in staged and not torch.equal(staged["d2t"], served):
        if not allow_vocab_change or baseline.d2t is None:  # without d2t SGLang keeps no hot_token_id to copy into
            raise SwapRefused(f"draft v{version} has another draft vocabulary (d2t differs); this engine keeps "
                              "the vocabulary fixed within a lineage")
        hot = staged["d2t"] + torch.arange(staged["d2t"].shape[0])
    weights = {n: t for n, t in staged.items() if n not in MAPS and not never_loaded(n)}
    return SwapPlan(version=version, weights=weights, hot_token_id=hot)


def _canonical(name: str) -> str:
    return "midlayer." + name.removeprefix("layers.0.") if name.startswith("layers.0.") else name


def sglang_name(name: str) -> str:
    """The parameter of `LlamaForCausalLMEagle3` a checkpoint tensor lands in (its load_weights mapping:
    legacy names, then q/k/v into qkv_proj and gate/up into gate_up_proj, then a `model.` prefix)."""
    for legacy, new in (("midlayer", "layers.0"), ("aux_norm_low", "fc_norm.0"), ("aux_norm_mid", "fc_norm.1"),
                        ("aux_norm_high", "fc_norm.2")):
        name = name.replace(legacy, new)
    for shard, fused in ((".q_proj", ".qkv_proj"), (".k_proj", ".qkv_proj"), (".v_proj", ".qkv_proj"),
                         (".gate_proj", ".gate_up_proj"), (".up_proj", ".gate_up_proj")):
        if shard in name:
            name = name.replace(shard, fused)
            break
    return name if name.startswith(("lm_head", "model.")) else f"model.{name}"


def uncovered(param_names: Iterable[str], checkpoint_names: Iterable[str], shared: set[str]) -> list[str]:
    """Draft parameters no checkpoint tensor loads (SGLang ignores unknown names silently, so check here).
    `shared`: parameters that are the target's tensors (embed_tokens; lm_head when taken from the target)."""
    covered = {sglang_name(n) for n in checkpoint_names if n not in MAPS}
    return sorted(p for p in param_names if p not in covered and p not in shared and not never_loaded(p))


def apply_swap(plan: SwapPlan, load_weights: Callable[[list[tuple[str, torch.Tensor]]], None],
               hot_token_ids: list[torch.Tensor]) -> None:
    """Copy in place: SGLang's weight loaders write into existing storage; hot_token_id is copied, not rebound."""
    with torch.no_grad():
        load_weights(list(plan.weights.items()))
        if plan.hot_token_id is not None:
            for t in hot_token_ids:
                t.copy_(plan.hot_token_id.to(device=t.device, dtype=t.dtype))


def agreed_version(reduced: torch.Tensor) -> int | None:
    """From [min over ranks of v, min over ranks of -v]: the version all ranks reported, None when they differ."""
    low, high = int(reduced[0]), -int(reduced[1])
    return low if low == high else None


def desired_version(ctl: ControlState | None, pod: str) -> int | None:
    """The version the control state names for this pod (version 0, the imported draft, too); None when there is
    no control state yet."""
    return None if ctl is None else ctl.version_for(pod)
