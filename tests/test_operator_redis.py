"""The operator's Redis adapter against a real redis-server (no Kubernetes involved)."""

import json

import pytest
import redis
from tide_operator import redis_io
from tide_operator.models import Counters

from tide_sglang import keys
from tide_sglang.rollout import StatsReporter, read_control
from tide_sglang.stream.server import LocalRedis

NS, DEP = "team-a", "chat"


@pytest.fixture
def client(redis_server: LocalRedis) -> redis.Redis:
    c = redis_io.client_for(DEP, redis_server.url, None, False, 2.0)
    yield c
    c.close()


@pytest.mark.parametrize(("fields", "expected"), [
    ({"version": "3", "parent": "2", "metrics": '{"accept_length": 2.5}'}, (3, 2, {"accept_length": 2.5})),
    ({"version": "1", "parent": "", "metrics": "{}"}, (1, None, {})),
    ({"version": "1"}, (1, None, {})),
    # what the trainer publishes: nested per-domain counts are not metrics
    ({"version": "4", "parent": "3", "metrics": '{"steps": 7, "domains": {"code": 10}, "ok": true}'},
     (4, 3, {"steps": 7.0})),
    ({"parent": "1"}, None),
    ({"version": "x"}, None),
    ({"version": "-1"}, None),
    ({"version": "2", "metrics": "not json"}, None),
])
def test_parse_event(fields: dict, expected: tuple | None) -> None:
    got = redis_io.parse_event("1-0", fields)
    assert (None if got is None else (got.version, got.parent, got.metrics)) == expected


def test_events_are_read_after_the_cursor_and_bad_entries_skipped(client: redis.Redis) -> None:
    stream = keys.events(NS, DEP)
    first = client.xadd(stream, {"version": 1, "parent": "", "metrics": json.dumps({"a": 1})}).decode()
    client.xadd(stream, {"garbage": "yes"})
    client.xadd(stream, {"version": 2, "parent": 1, "metrics": "{}"})
    entries = redis_io.read_events(client, NS, DEP, "0-0")
    assert [e.version if e else None for _, e in entries] == [1, None, 2]
    after = redis_io.read_events(client, NS, DEP, first)
    assert [e.version if e else None for _, e in after] == [None, 2]
    assert redis_io.read_events(client, NS, DEP, entries[-1][0]) == []


def test_stats_read_what_the_engines_report(client: redis.Redis) -> None:
    reporter = StatsReporter(client, NS, DEP, interval_s=3600)  # the engines' own writer
    reporter.add(2, tokens=100, accepted=70, verify_steps=30)
    reporter.add(3, tokens=10, accepted=2, swap_failures=1)
    reporter.flush()
    stats = redis_io.read_stats(client, NS, DEP, [2, 3, 4])
    assert stats[2] == Counters(tokens=100, accepted=70, verify_steps=30)
    assert stats[3].swap_failures == 1 and stats[3].acceptance == 0.2
    assert stats[4] == Counters()


def test_control_hash_as_the_engines_read_it(client: redis.Redis) -> None:
    client.hset(keys.control(NS, DEP), "train", "1")  # written by the engines' training trigger: kept
    redis_io.write_control(client, NS, DEP, 1, 2)
    assert read_control(client, NS, DEP).canary == 2
    redis_io.write_control(client, NS, DEP, 2, None)
    state = read_control(client, NS, DEP)
    assert (state.stable, state.canary, state.version_for("any-pod")) == (2, None, 2)
    assert client.hget(keys.control(NS, DEP), "train") == b"1"
    redis_io.forget(client, NS, DEP, [1, 2])
    assert client.keys("*") == []


def test_unreachable_redis_is_reported_not_raised_as_a_crash(redis_server: LocalRedis) -> None:
    redis_server.stop()
    with pytest.raises(redis_io.Unavailable):
        redis_io.client_for(DEP, redis_server.url, None, False, 0.5)
