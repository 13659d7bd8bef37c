"""The draft rollout state machine (pure): DraftVersion phases and what the pods report in, phase changes out.

    Candidate ──► Canary ──► Promoting ──► Promoted        canary acceptance ≥ stable + minImprovement
        │            ├─────► RollingBack ─► RolledBack     ≤ stable − rollbackThreshold, or swaps failed
        │            └─────► Rejected                       undecided after maxTokens or canaryTimeout
        └──────────────────► Rejected                       superseded by a newer candidate, or not newer than stable

Promoting and RollingBack are confirmed against the pods: a version becomes Promoted or RolledBack only once
every live pod (at least as many heartbeats as the Deployment has ready replicas) reports the version the
routing gives it. A new canary starts only on a fleet that serves what it is told to.

All rollout state lives in the DraftVersion statuses, so an operator restarted mid-rollout resumes from
them: the stable version is the Promoted or Promoting one with the highest `promotion` number (version 0, the
initial draft, when none is), the canary is the one in phase Canary, loaded by the pods its status names.
Each `step` makes at most one decision, so a crash between two writes never leaves two decisions
half-applied. Stable is judged on the same time window as the canary (its counters minus a baseline taken
when the canary started), so a shift in traffic during the canary moves both sides alike.
"""

import datetime
import math
from collections.abc import Mapping
from dataclasses import dataclass

from tide_operator.models import (
    Baseline,
    Counters,
    DraftSpec,
    DraftVersionStatus,
    Phase,
    RolloutSpec,
    seconds,
)

Versions = Mapping[int, DraftVersionStatus]
PENDING = (Phase.PROMOTING, Phase.ROLLING_BACK)
_SERVED = (Phase.PROMOTED, Phase.PROMOTING)


@dataclass(frozen=True)
class Routing:
    """What the control state says: pods named in `canary_pods` load `canary` while it is set, all others
    `stable`."""

    stable: int
    canary: int | None = None
    canary_pods: tuple[str, ...] = ()

    def version_for(self, pod: str) -> int:
        return self.canary if self.canary is not None and pod in self.canary_pods else self.stable


@dataclass(frozen=True)
class Fleet:
    """What the pods report: the version each live heartbeat says its pod serves, and the inference
    Deployment's ready replicas (a ready pod without a live heartbeat has not reported yet)."""

    loaded: Mapping[str, int]
    ready: int

    def lagging(self, route: Routing) -> dict[str, int]:
        """Live pods not serving the version the routing gives them: pod -> the version it serves."""
        return {p: v for p, v in sorted(self.loaded.items()) if v != route.version_for(p)}

    @property
    def silent(self) -> int:
        """Ready pods without a live heartbeat."""
        return max(self.ready - len(self.loaded), 0)

    def serves(self, route: Routing) -> bool:
        return bool(self.loaded) and not self.silent and not self.lagging(route)


def routing(versions: Versions) -> Routing:
    served = [(s.promotion or 0, v) for v, s in versions.items() if s.phase in _SERVED]
    canaries = [v for v, s in versions.items() if s.phase == Phase.CANARY]
    if not canaries:
        return Routing(stable=max(served)[1] if served else 0)
    canary = max(canaries)
    return Routing(stable=max(served)[1] if served else 0, canary=canary,
                   canary_pods=tuple(versions[canary].canary_pods))


def canary_count(rollout: RolloutSpec, live: int) -> int:
    """Canary pods for `live` live pods: never all of them while more than one is live."""
    wanted = math.ceil(live * rollout.canary_percent / 100) if rollout.canary_percent else rollout.canary_replicas
    return min(max(wanted, 1), live - 1) if live > 1 else live


def pick_canary_pods(rollout: RolloutSpec, live: list[str], named: list[str]) -> list[str]:
    """The canary pods: those already named that are still live, topped up (or cut) to the wanted count in
    name order, so a pod that died or was scaled away is replaced and the others keep their version."""
    count = canary_count(rollout, len(live))
    kept = [p for p in named if p in live][:count]
    return sorted(kept + [p for p in sorted(live) if p not in kept][: count - len(kept)])


def window(now: Counters, base: Counters) -> Counters:
    """Counters accumulated since `base`; a counter below its baseline means Redis lost its data, so the
    whole current value is the window."""
    if now.tokens < base.tokens or now.accepted < base.accepted:
        return now
    return Counters(tokens=now.tokens - base.tokens, accepted=now.accepted - base.accepted,
                    verify_steps=max(0, now.verify_steps - base.verify_steps),
                    swap_failures=max(0, now.swap_failures - base.swap_failures))


def step(draft: DraftSpec, rollout: RolloutSpec, versions: Versions, stats: Mapping[int, Counters],
         fleet: Fleet, now: datetime.datetime) -> dict[int, DraftVersionStatus]:
    """The phase changes to make now (version -> new status); empty when nothing is due."""
    route = routing(versions)
    if draft.version is not None:
        return _pin(draft.version, versions, route, stamp(now)) or _confirm(versions, route, fleet, stamp(now))
    if any(s.phase in PENDING for s in versions.values()):
        return _confirm(versions, route, fleet, stamp(now))
    if route.canary is not None:
        return _judge(route, versions, rollout, stats, fleet, now)
    if draft.policy == "manual" or not fleet.serves(route):
        return {}  # candidates wait for a human to pin one, or for every pod to serve stable
    return _start(versions, route.stable, stats, rollout, fleet, stamp(now))


def stamp(now: datetime.datetime) -> str:
    return now.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(text: str) -> datetime.datetime:
    return datetime.datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=datetime.UTC)


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
        out[pinned] = _to(versions[pinned], Phase.PROMOTING, "Pinned", why, now,
                          promotion=_next_promotion(versions), canary_pods=[])
        if pinned < route.stable:
            out[route.stable] = _to(versions[route.stable], Phase.ROLLING_BACK, "ManualRollback", why, now)
    if route.canary is not None and route.canary != pinned:
        out[route.canary] = _to(versions[route.canary], Phase.ROLLING_BACK, "Pinned", why, now, canary_pods=[])
    return out


def _confirm(versions: Versions, route: Routing, fleet: Fleet, now: str) -> dict[int, DraftVersionStatus]:
    """Promoting -> Promoted and RollingBack -> RolledBack, once every pod serves what the routing says."""
    pending = {v: s for v, s in versions.items() if s.phase in PENDING}
    if not pending or not fleet.serves(route):
        return {}
    served = f"confirmed: {len(fleet.loaded)} pod(s) serve v{route.stable}"
    return {v: _to(s, Phase.PROMOTED if s.phase == Phase.PROMOTING else Phase.ROLLED_BACK, s.reason,
                   f"{s.message}; {served}", now) for v, s in pending.items()}


def _start(versions: Versions, stable: int, stats: Mapping[int, Counters], rollout: RolloutSpec, fleet: Fleet,
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
    pods = pick_canary_pods(rollout, list(fleet.loaded), [])
    out[newest] = _to(versions[newest], Phase.CANARY, "Observing",
                      f"canary on {', '.join(pods)} against stable v{stable}", now,
                      baseline=Baseline(version=stable, **base.model_dump()), canary=Counters(), canary_pods=pods)
    return out


def _judge(route: Routing, versions: Versions, rollout: RolloutSpec, stats: Mapping[int, Counters], fleet: Fleet,
           now: datetime.datetime) -> dict[int, DraftVersionStatus]:
    canary = route.canary
    assert canary is not None
    status = versions[canary]
    base = status.baseline or Baseline()
    seen = stats.get(canary, Counters())
    pods = pick_canary_pods(rollout, list(fleet.loaded), status.canary_pods) if fleet.loaded \
        else status.canary_pods  # no heartbeat at all (Redis restarted?): keep the pods named
    solo = bool(fleet.loaded) and set(fleet.loaded) <= set(pods)
    # With one live pod, it is the canary and stable serves nothing: stable is judged on its counters before.
    stable = Counters(**base.model_dump(exclude={"version"})) if solo \
        else window(stats.get(base.version, Counters()), base)
    fields = {"canary": seen, "acceptance": rounded(seen.acceptance),
              "stable_acceptance": rounded(stable.acceptance), "canary_pods": pods}
    verdict = _verdict(seen, stable, rollout) or _timeout(status, seen, stable, rollout, route, fleet, now)
    if verdict is None:
        progress = f"{min(seen.tokens, stable.tokens)}/{rollout.min_tokens} tokens observed on each side"
        new = _to(status, Phase.CANARY, "Observing", f"canary on {', '.join(pods) or 'no pod'}: {progress}",
                  stamp(now), **fields)
    else:
        phase, reason, message = verdict
        extra = {"promotion": _next_promotion(versions)} if phase == Phase.PROMOTING else {}
        new = _to(status, phase, reason, message, stamp(now), **{**fields, "canary_pods": []}, **extra)
    return {} if new == status else {canary: new}


def _verdict(canary: Counters, stable: Counters, rollout: RolloutSpec) -> tuple[Phase, str, str] | None:
    if canary.swap_failures > rollout.max_swap_failures:
        return Phase.ROLLING_BACK, "SwapFailed", f"{canary.swap_failures} swap failure(s) on canary pods"
    if canary.tokens < rollout.min_tokens or stable.tokens < rollout.min_tokens:
        return None
    a, b = canary.accepted / canary.tokens, stable.accepted / stable.tokens
    detail = f"acceptance {a:.4f} vs stable {b:.4f} over {canary.tokens}/{stable.tokens} tokens"
    if a - b >= rollout.min_improvement:
        return Phase.PROMOTING, "BetterAcceptance", detail
    if b - a >= rollout.rollback_threshold:
        return Phase.ROLLING_BACK, "WorseAcceptance", detail
    if canary.tokens >= rollout.max_tokens:
        return Phase.REJECTED, "Inconclusive", detail
    return None


def _timeout(status: DraftVersionStatus, canary: Counters, stable: Counters, rollout: RolloutSpec,
             route: Routing, fleet: Fleet, now: datetime.datetime) -> tuple[Phase, str, str] | None:
    """Rejected after `canaryTimeout` in Canary, saying why no decision came."""
    since = parse_time(status.last_transition_time) if status.last_transition_time else now
    if (now - since).total_seconds() < seconds(rollout.canary_timeout):
        return None
    never = [p for p in route.canary_pods if fleet.loaded.get(p) != route.canary]
    why = (f"canary pods never loaded v{route.canary}: {', '.join(never)}" if never and not canary.tokens else
           f"too little traffic: {canary.tokens} canary and {stable.tokens} stable tokens of {rollout.min_tokens}")
    return Phase.REJECTED, "CanaryTimeout", f"undecided after {rollout.canary_timeout}: {why}"


def retired(draft: DraftSpec, versions: Versions) -> list[int]:
    """Versions whose DraftVersion and registry files can go: all but version 0, the routed and pinned ones,
    those still rolling out, and the newest `draft.keepVersions`."""
    route = routing(versions)
    keep = {0, route.stable, draft.version, *sorted(versions)[-draft.keep_versions:]}
    if route.canary is not None:
        keep.add(route.canary)
    active = (Phase.CANDIDATE, Phase.CANARY, *PENDING)
    return [v for v, s in sorted(versions.items()) if v not in keep and s.phase not in active]


def rounded(x: float | None) -> float | None:
    return None if x is None else round(x, 4)

