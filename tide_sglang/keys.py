"""Redis key names shared by engines, trainers and the operator (DESIGN.md, "Fixed names").

Namespace and deployment form one hash tag (`{<namespace>/<deployment>}`), so a Redis Cluster keeps all keys of
one deployment on one slot (pipelines and multi-key commands need it) and two namespaces never share keys.
Outside Kubernetes the namespace is `default`.
"""

import re

TRAINER_GROUP = "trainers"

_NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")  # a Kubernetes object name (RFC 1123 subdomain)
_NAMESPACE = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")  # a Kubernetes namespace (RFC 1123 label)


def _tag(namespace: str, deployment: str) -> str:
    if not _NAMESPACE.match(namespace):
        raise ValueError(
            f"invalid namespace {namespace!r}: use a Kubernetes namespace name "
            "(lower-case letters, digits and '-', at most 63 characters)"
        )
    if not _NAME.match(deployment):
        raise ValueError(
            f"invalid deployment name {deployment!r}: use a Kubernetes object name "
            "(lower-case letters, digits, '-' and '.', at most 253 characters)"
        )
    return f"tide:{{{namespace}/{deployment}}}"


def hidden_states(namespace: str, deployment: str) -> str:
    return f"{_tag(namespace, deployment)}:hs"


def dead_letter(namespace: str, deployment: str) -> str:
    return f"{_tag(namespace, deployment)}:hs:dead"


def control(namespace: str, deployment: str) -> str:
    return f"{_tag(namespace, deployment)}:ctl"


def events(namespace: str, deployment: str) -> str:
    return f"{_tag(namespace, deployment)}:events"


def stats(namespace: str, deployment: str, version: int) -> str:
    return f"{_tag(namespace, deployment)}:stats:{version}"


def stats_pattern(namespace: str, deployment: str) -> str:
    """SCAN pattern of every version's stats key (names hold no glob characters)."""
    return f"{_tag(namespace, deployment)}:stats:*"


def pods(namespace: str, deployment: str) -> str:
    return f"{_tag(namespace, deployment)}:pods"


def all_fixed(namespace: str, deployment: str) -> tuple[str, ...]:
    """Every key of a deployment except the per-version stats."""
    return (hidden_states(namespace, deployment), dead_letter(namespace, deployment), control(namespace, deployment),
            events(namespace, deployment), pods(namespace, deployment))
