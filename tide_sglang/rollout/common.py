"""What every part of the rollout protocol shares: its error, Redis field decoding, the Redis failures."""

import redis
from redis.exceptions import RedisClusterException

from tide_sglang.stream.connection import RedisUnavailable

# What a Redis call may raise when the server is away; callers that must never crash catch these.
UNAVAILABLE = (redis.RedisError, RedisClusterException, RedisUnavailable, OSError)


class RolloutError(ValueError):
    """A rollout key holds something the protocol does not allow; the message says which key and what."""


def text(x: bytes | str) -> str:
    return x.decode() if isinstance(x, bytes) else str(x)


def fields_of(raw: dict) -> dict[str, str]:
    """A hash or stream entry as Redis returns it (bytes or str) with str keys and values."""
    return {text(k): text(v) for k, v in raw.items()}
