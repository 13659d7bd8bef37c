"""Redis key names shared by engines, trainers and the operator (DESIGN.md, "Fixed names").

The deployment name is a hash tag (`{...}`) so a Redis Cluster keeps all keys of one deployment on one slot,
which pipelines and multi-key commands need.
"""

import re

TRAINER_GROUP = "trainers"

_NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")


def _tag(deployment: str) -> str:
    if not _NAME.match(deployment):
        raise ValueError(
            f"invalid deployment name {deployment!r}: use a Kubernetes object name "
            "(lower-case letters, digits, '-' and '.', at most 253 characters)"
        )
    return f"tide:{{{deployment}}}"


def hidden_states(deployment: str) -> str:
    return f"{_tag(deployment)}:hs"


def dead_letter(deployment: str) -> str:
    return f"{_tag(deployment)}:hs:dead"


def control(deployment: str) -> str:
    return f"{_tag(deployment)}:ctl"


def events(deployment: str) -> str:
    return f"{_tag(deployment)}:events"


def stats(deployment: str, version: int) -> str:
    return f"{_tag(deployment)}:stats:{version}"
