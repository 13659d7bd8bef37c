"""Semantic validation and status conditions (pure).

The CRD schema rejects malformed objects; what it cannot express (two fields that must differ, a Secret
that must exist, a pinned version that must be known) becomes a `Problem`, shown as the Degraded
condition. A problem never raises: the operator keeps the object's status current and retries on its
timer, so a wrong spec shows a clear message instead of a crash loop.
"""

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from tide_operator.builders import FETCH_PREFIX, IMPORT_DRAFT, RESERVED_ENV
from tide_operator.models import SECRET_LABEL, Condition, RegistrySpec, SecretKeyRef, TideDeploymentSpec, seconds
from tide_operator.rollout import Fleet, Routing, parse_time
from tide_sglang.sources import ModelSourceError, parse_model_source

# Child names append "-trainer" and pods append ~16 characters: keep host names within 63.
MAX_NAME = 40
_NAME = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


@dataclass(frozen=True)
class Problem:
    reason: str
    message: str


def parse(name: str, raw: Mapping[str, Any]) -> tuple[TideDeploymentSpec | None, list[Problem]]:
    """The typed spec and what is wrong with it; None when it does not even parse."""
    problems = []
    if len(name) > MAX_NAME or not _NAME.match(name):
        problems.append(Problem("InvalidName", f"name {name!r} must be a DNS-1035 label of at most "
                                               f"{MAX_NAME} characters (it prefixes Service and pod names)"))
    try:
        spec = TideDeploymentSpec.model_validate(raw)
    except ValidationError as e:
        detail = "; ".join(f"spec.{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())
        return None, [*problems, Problem("InvalidSpec", detail)]
    return spec, problems + check(spec)


def check(spec: TideDeploymentSpec) -> list[Problem]:
    out = []
    tr, inf = spec.training, spec.inference
    if tr.enabled and tr.separate_pool and tr.node_selector == inf.node_selector:
        out.append(Problem("SamePool", f"training.nodeSelector {tr.node_selector} equals inference.nodeSelector: "
                                       "select the training GPU pool, or set training.separatePool: false"))
    r = spec.redis
    if sum((r.url is not None, r.url_secret_ref is not None, r.managed.enabled)) != 1:
        out.append(Problem("InvalidRedis", "set exactly one of redis.url, redis.urlSecretRef, "
                                           "redis.managed.enabled"))
    if r.managed.enabled and r.password_secret_ref is not None:
        out.append(Problem("InvalidRedis", "redis.passwordSecretRef does not apply to the managed Redis: the "
                                           "operator generates its password into the Secret <name>-redis"))
    out += _registry_problems(spec.registry)
    for field, text in (("model.path", spec.model.path), ("draft.initialPath", spec.draft.initial_path)):
        try:
            parse_model_source(text)
        except ModelSourceError as e:
            out.append(Problem("InvalidModel", f"{field}: {e}"))
    reserved = sorted({e.name for e in (*inf.env, *tr.env)} & RESERVED_ENV)
    if reserved:
        out.append(Problem("ReservedEnv", f"env sets {reserved}, which the operator sets from the spec"))
    if spec.rollout.min_tokens > spec.rollout.max_tokens:
        out.append(Problem("InvalidRollout", "rollout.minTokens exceeds rollout.maxTokens: no canary could "
                                             "ever be decided"))
    if not seconds(spec.rollout.heartbeat_interval):
        out.append(Problem("InvalidRollout", "rollout.heartbeatInterval must be longer than zero"))
    return out


def _registry_problems(reg: RegistrySpec) -> list[Problem]:
    if (reg.claim_name is None) == (reg.url is None):
        return [Problem("InvalidRegistry", "set exactly one of registry.claimName, registry.url")]
    s3 = reg.url is not None and reg.url.startswith("s3://")
    if not s3 and (reg.endpoint or reg.region or reg.access_key_id_secret_ref or reg.secret_access_key_secret_ref):
        return [Problem("InvalidRegistry", "registry.endpoint, region and the key Secret references apply to an "
                                           "s3:// registry.url only")]
    if (reg.access_key_id_secret_ref is None) != (reg.secret_access_key_secret_ref is None):
        return [Problem("InvalidRegistry", "set both registry.accessKeyIdSecretRef and "
                                           "registry.secretAccessKeySecretRef, or neither")]
    return []


def secret_refs(spec: TideDeploymentSpec) -> list[tuple[str, SecretKeyRef]]:
    """(field, ref) of every Secret key the pods and the operator read."""
    refs = [("redis.urlSecretRef", spec.redis.url_secret_ref), ("redis.passwordSecretRef",
                                                                spec.redis.password_secret_ref),
            ("model.hubTokenSecretRef", spec.model.hub_token_secret_ref),
            ("registry.accessKeyIdSecretRef", spec.registry.access_key_id_secret_ref),
            ("registry.secretAccessKeySecretRef", spec.registry.secret_access_key_secret_ref)]
    return [(field, ref) for field, ref in refs if ref is not None]


def check_secret(field: str, ref: SecretKeyRef, secret: Mapping[str, Any] | None) -> Problem | None:
    """`secret` as the operator may see it: None when it does not exist or is not labelled for TIDE."""
    if secret is None:
        return Problem("SecretNotFound", f"{field}: Secret {ref.name!r} does not exist or is not labelled "
                                         f'{SECRET_LABEL}: "true" (the operator reads, and hands to pods, only '
                                         f"Secrets labelled for TIDE)")
    if ref.key not in (secret.get("data") or {}) and ref.key not in (secret.get("stringData") or {}):
        return Problem("SecretKeyNotFound", f"{field}: Secret {ref.name!r} has no key {ref.key!r}")
    return None


def init_failures(pods: list[Mapping[str, Any]]) -> list[Problem]:
    """The init containers of these pods whose last run failed (a fetch that cannot reach its source, an import
    refused): reason ModelFetchFailed or DraftImportFailed, the message naming the pod, the container and the end
    of its log (the builders set terminationMessagePolicy: FallbackToLogsOnError). One problem per container."""
    out: dict[str, Problem] = {}
    for pod in pods:
        for st in (pod.get("status") or {}).get("initContainerStatuses") or []:
            state = st.get("state") or {}
            ended = state.get("terminated") if "terminated" in state else (st.get("lastState") or {}).get("terminated")
            if not ended or ended.get("exitCode", 0) == 0 or st["name"] in out:
                continue
            reason = "ModelFetchFailed" if st["name"].startswith(FETCH_PREFIX) else \
                "DraftImportFailed" if st["name"] == IMPORT_DRAFT else "InitContainerFailed"
            lines = [line for line in (ended.get("message") or "").splitlines() if line.strip()]
            why = lines[-1].strip()[-400:] if lines else ended.get("reason") or "no message"
            out[st["name"]] = Problem(reason, f"pod {pod['metadata']['name']}: init container {st['name']} exited "
                                              f"{ended.get('exitCode')}: {why}")
    return list(out.values())


def check_pin(spec: TideDeploymentSpec, known: set[int]) -> list[Problem]:
    pinned = spec.draft.version
    if pinned is None or pinned in known:
        return []
    return [Problem("UnknownVersion", f"spec.draft.version pins v{pinned}, but no DraftVersion has it; "
                                      f"known: {sorted(known)}")]


@dataclass(frozen=True)
class Pods:
    """Desired and ready replicas of one child workload."""

    desired: int
    ready: int


def conditions(generation: int, problems: list[Problem], pods: Mapping[str, Pods], route: Routing,
               pending: str | None, fleet: Fleet | None, spec: TideDeploymentSpec | None, old: list[Condition],
               now: str) -> list[Condition]:
    """Ready, Progressing, Degraded, RolloutPaused, Swapped and Conflict, keeping lastTransitionTime where status
    holds.
    `pending` is the phase (Promoting, RollingBack) of a rollout the pods have not confirmed yet; `fleet` is
    None when the heartbeats could not be read."""
    previous = {c.type: c for c in old}
    waiting = [f"{n} {p.ready}/{p.desired} ready" for n, p in pods.items() if p.ready < p.desired]
    degraded = ("True", problems[0].reason, "; ".join(p.message for p in problems)) if problems else \
        ("False", "AsExpected", "")
    if problems:
        ready = ("False", "Degraded", "see the Degraded condition")
    else:
        ready = ("False", "PodsNotReady", ", ".join(waiting)) if waiting else ("True", "AllPodsReady", "")
    if pending is not None:
        progressing = ("True", pending, f"v{route.stable} routed to every pod; see the Swapped condition")
    elif route.canary is not None:
        progressing = ("True", "Canary", f"canary v{route.canary} on {', '.join(route.canary_pods)} against "
                                         f"stable v{route.stable}")
    else:
        progressing = ("True", "PodsStarting", ", ".join(waiting)) if waiting else \
            ("False", "Stable", f"serving v{route.stable}")
    new = {"Ready": ready, "Progressing": progressing, "Degraded": degraded, "RolloutPaused": _paused(spec, problems),
           "Swapped": _swapped(route, fleet, spec, previous.get("Swapped"), now), "Conflict": _conflict(problems)}
    out = []
    for kind, (status, reason, message) in new.items():
        prev = previous.get(kind)
        since = prev.last_transition_time if prev is not None and prev.status == status else now
        out.append(Condition(type=kind, status=status, reason=reason, message=message,  # type: ignore[arg-type]
                             observed_generation=generation, last_transition_time=since))
    return out


def _swapped(route: Routing, fleet: Fleet | None, spec: TideDeploymentSpec | None, prev: Condition | None,
             now: str) -> tuple[str, str, str]:
    """Whether every live pod serves the version the routing gives it; after `rollout.swapTimeout` of not,
    reason SwapTimeout. Either way the message names the pods that lag."""
    if fleet is None or spec is None:
        return "Unknown", "NoHeartbeats", "the pods' heartbeats could not be read"
    if not fleet.loaded and not fleet.ready:
        return "Unknown", "NoLivePods", "no inference pod is ready or reporting"
    if fleet.serves(route):
        canary = f", canary v{route.canary} on {', '.join(route.canary_pods)}" if route.canary is not None else ""
        return "True", "AllPodsSwapped", f"{len(fleet.loaded)} pod(s) serve stable v{route.stable}{canary}"
    lag = [f"{p} serves v{v}, not v{route.version_for(p)}" for p, v in fleet.lagging(route).items()]
    lag += [f"{fleet.silent} ready pod(s) not reporting"] if fleet.silent else []
    since = prev.last_transition_time if prev is not None and prev.status == "False" else now
    late = (parse_time(now) - parse_time(since)).total_seconds() >= seconds(spec.rollout.swap_timeout)
    return "False", "SwapTimeout" if late else "Swapping", "; ".join(lag)


def _conflict(problems: list[Problem]) -> tuple[str, str, str]:
    """True while an object the operator would write belongs to someone else (it is left unchanged)."""
    foreign = [p.message for p in problems if p.reason == "Conflict"]
    return ("True", "NotOwned", "; ".join(foreign)) if foreign else ("False", "AllOwned", "")


def _paused(spec: TideDeploymentSpec | None, problems: list[Problem]) -> tuple[str, str, str]:
    if problems or spec is None:
        return "True", "Degraded", "rollouts wait until the Degraded condition clears"
    if spec.draft.version is not None:
        return "True", "Pinned", f"spec.draft.version pins v{spec.draft.version}"
    if spec.draft.policy == "manual":
        return "True", "ManualPolicy", "draft.policy is manual: pin a version to roll it out"
    return "False", "Automatic", ""
