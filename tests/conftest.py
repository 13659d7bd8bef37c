"""Shared fixtures. Every Redis test talks to a real `redis-server` started here on a free loopback port, every
S3 test to a real SeaweedFS `weed server`."""

import uuid
from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

from tide_sglang.settings import TideSettings
from tide_sglang.stream.server import LocalRedis

if TYPE_CHECKING:
    from tests.s3server import LocalS3


@pytest.fixture
def redis_server() -> Iterator[LocalRedis]:
    with LocalRedis() as server:
        yield server


@pytest.fixture
def settings(redis_server: LocalRedis) -> TideSettings:
    return TideSettings(redis_url=redis_server.url, deployment="test")


@pytest.fixture(scope="session")
def s3_server() -> Iterator["LocalS3"]:
    """One real SeaweedFS S3 gateway for the session; tests keep apart by prefix (`s3_location`). Imported here:
    the SGLang contract venvs have no boto3."""
    from tests.s3server import LocalS3

    with LocalS3() as server:
        yield server


@pytest.fixture
def s3_location(s3_server: "LocalS3", monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh s3:// registry location, with the AWS_* variables that reach it set for this test (and the
    processes it starts)."""
    for name, value in s3_server.env.items():
        monkeypatch.setenv(name, value)
    from tests.s3server import BUCKET

    return f"s3://{BUCKET}/{uuid.uuid4().hex[:12]}/default/test"
