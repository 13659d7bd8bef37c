"""Stream: the Redis Streams transport of captured hidden states (engine -> trainer).

Names are imported lazily, so `tide_sglang.stream.connection` (which the operator uses, with
`tide_sglang.rollout`) loads without torch: the operator image carries no torch.
"""

import importlib
from typing import Any

_EXPORTS = {
    "CodecError": "codec",
    "decode": "codec",
    "encode": "codec",
    "RedisUnavailable": "connection",
    "connect": "connection",
    "ReaderStats": "reader",
    "StreamEntry": "reader",
    "StreamReader": "reader",
    "StreamWriter": "writer",
    "WriterStats": "writer",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
