"""The draft rollout state machine (pure): DraftVersion phases in, phase changes out.

    Candidate ──► Canary ──► Promoted        canary acceptance ≥ stable + minImprovement
        │            ├─────► RolledBack      ≤ stable − rollbackThreshold, or swaps failed
        │            └─────► Rejected        undecided after maxTokens canary tokens
        └──────────────────► Rejected        superseded by a newer candidate, or not newer than stable

All rollout state lives in the DraftVersion statuses, so an operator restarted mid-rollout resumes from
them: the stable version is the Promoted one with the highest `promotion` number (version 0, the initial
draft, when none is), the canary is the one in phase Canary. Each `step` makes at most one decision, so a
crash between two writes never leaves two decisions half-applied. Stable is judged on the same time window
as the canary (its counters minus a baseline taken when the canary started), so a shift in traffic during
the canary moves both sides alike.
"""

from collections.abc import Mapping
from dataclasses import dataclass

from tide_operator.models import Baseline, Counters, DraftSpec, DraftVersionStatus, Phase, RolloutSpec

Versions = Mapping[int, DraftVersionStatus]


@dataclass(frozen=True)
class Routing:
    """What the control hash says: every pod loads `stable`, canary pods load `canary` when set."""

    stable: int
    canary: int | None


def routing(versions: Versions) -> Routing:
    promoted = [(s.promotion or 0, v) for v, s in versions.items() if s.phase == Phase.PROMOTED]
    canaries = [v for v, s in versions.items() if s.phase == Phase.CANARY]
    return Routing(stable=max(promoted)[1] if promoted else 0, canary=max(canaries) if canaries else None)


def window(now: Counters, base: Counters) -> Counters:
    """Counters accumulated since `base`; a counter below its baseline means Redis lost its data, so the
    whole current value is the window."""
    if now.tokens < base.tokens or now.accepted < base.accepted:
        return now
    return Counters(tokens=now.tokens - base.tokens, accepted=now.accepted - base.accepted,
                    verify_steps=max(0, now.verify_steps - base.verify_steps),
                    swap_failures=max(0, now.swap_failures - base.swap_failures))


def step(draft: DraftSpec, rollout: RolloutSpec, versions: Versions, stats: Mapping[int, Counters],
         now: str) -> dict[int, DraftVersionStatus]:
    """The phase changes to make now (version -> new status); empty when nothing is due."""
    route = routing(versions)
    if draft.version is not None:
        return _pin(draft.version, versions, route, now)
    if route.canary is not None:
        return _judge(route.canary, versions, rollout, stats, now)
    if draft.policy == "manual":
        return {}  # candidates wait for a human to pin one
    return _start(versions, route.stable, stats, now)


def _next_promotion(versions: Versions) -> int:
    return max((s.promotion or 0 for s in versions.values()), default=0) + 1


def _to(status: DraftVersionStatus, phase: Phase, reason: str, message: str, now: str,
        **fields: object) -> DraftVersionStatus:
    changed = phase != status.phase
    return status.model_copy(update={"phase": phase, "reason": reason, "message": message,
                                     "last_transition_time": now if changed else status.last_transition_time,
                                     **fields})


def _pin(pinned: int, versions: Versions, route: Routing, now: str) -> dict[int, DraftVersionStatus]:
    if pinned not in versions:
        return {}  # reported as a Degraded condition (UnknownVersion); nothing to roll to
    out: dict[int, DraftVersionStatus] = {}
    why = f"spec.draft.version pins v{pinned}"
    if pinned != route.stable:
        out[pinned] = _to(versions[pinned], Phase.PROMOTED, "Pinned", why, now,
                          promotion=_next_promotion(versions))
        if pinned < route.stable:
            out[route.stable] = _to(versions[route.stable], Phase.ROLLED_BACK, "ManualRollback", why, now)
    if route.canary is not None and route.canary != pinned:
        out[route.canary] = _to(versions[route.canary], Phase.ROLLED_BACK, "Pinned", why, now)
    return out


def _start(versions: Versions, stable: int, stats: Mapping[int, Counters],
           now: str) -> dict[int, DraftVersionStatus]:
    candidates = sorted(v for v, s in versions.items() if s.phase == Phase.CANDIDATE)
    if not candidates:
        return {}
    newest = candidates[-1]
    out = {v: _to(versions[v], Phase.REJECTED, "Superseded", f"v{newest} is newer", now) for v in candidates[:-1]}
    if newest <= stable:
        out[newest] = _to(versions[newest], Phase.REJECTED, "Stale", f"not newer than stable v{stable}", now)
        return out
    base = stats.get(stable, Counters())
    baseline = Baseline(version=stable, **base.model_dump())
    out[newest] = _to(versions[newest], Phase.CANARY, "Observing", f"canary against stable v{stable}", now,
                      baseline=baseline, canary=Counters())
    return out


def _judge(canary: int, versions: Versions, rollout: RolloutSpec, stats: Mapping[int, Counters],
           now: str) -> dict[int, DraftVersionStatus]:
    status = versions[canary]
    base = status.baseline or Baseline()
    seen = stats.get(canary, Counters())
    stable = window(stats.get(base.version, Counters()), base)
    fields = {"canary": seen, "acceptance": rounded(seen.acceptance), "stable_acceptance": rounded(stable.acceptance)}
    verdict = _verdict(seen, stable, rollout)
    if verdict is None:
        progress = f"{min(seen.tokens, stable.tokens)}/{rollout.min_tokens} tokens observed on each side"
        new = _to(status, Phase.CANARY, "Observing", progress, now, **fields)
    else:
        phase, reason, message = verdict
        extra = {"promotion": _next_promotion(versions)} if phase == Phase.PROMOTED else {}
        new = _to(status, phase, reason, message, now, **fields, **extra)
    return {} if new == status else {canary: new}


def _verdict(canary: Counters, stable: Counters, rollout: RolloutSpec) -> tuple[Phase, str, str] | None:
    if canary.swap_failures > rollout.max_swap_failures:
        return Phase.ROLLED_BACK, "SwapFailed", f"{canary.swap_failures} swap failure(s) on canary pods"
    if canary.tokens < rollout.min_tokens or stable.tokens < rollout.min_tokens:
        return None
    a, b = canary.accepted / canary.tokens, stable.accepted / stable.tokens
    detail = f"acceptance {a:.4f} vs stable {b:.4f} over {canary.tokens}/{stable.tokens} tokens"
    if a - b >= rollout.min_improvement:
        return Phase.PROMOTED, "BetterAcceptance", detail
    if b - a >= rollout.rollback_threshold:
        return Phase.ROLLED_BACK, "WorseAcceptance", detail
    if canary.tokens >= rollout.max_tokens:
        return Phase.REJECTED, "Inconclusive", detail
    return None


def rounded(x: float | None) -> float | None:
    return None if x is None else round(x, 4)
