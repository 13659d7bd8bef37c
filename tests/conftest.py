"""Shared fixtures. Every Redis test talks to a real `redis-server` started here on a free loopback port."""

from collections.abc import Iterator

import pytest

from tide_sglang.settings import TideSettings
from tide_sglang.stream.server import LocalRedis


@pytest.fixture
def redis_server() -> Iterator[LocalRedis]:
    with LocalRedis() as server:
        yield server


@pytest.fixture
def settings(redis_server: LocalRedis) -> TideSettings:
    return TideSettings(redis_url=redis_server.url, deployment="test")
