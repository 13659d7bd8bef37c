"""The operator's Redis adapter against a real redis-server (no Kubernetes involved). The keys and their fields
belong to tide_sglang.rollout; these tests check what the operator makes of them."""

import time

import pytest
import redis
from tide_operator import gate, redis_io
from tide_operator.models import Counters, TrainerState, TrainingStatus
from tide_operator.rollout import Routing

from tide_sglang import keys
from tide_sglang.rollout import (
    Heartbeat,
    Published,
    StatsReporter,
    append_event,
    read_control,
    write_heartbeat,
)
from tide_sglang.stream.server import LocalRedis

NS, DEP = "serving", "chat"


@pytest.fixture
def client(redis_server: LocalRedis) -> redis.Redis:
    c = redis_io.client_for(DEP, redis_server.url, None, False, 2.0)
    yield c
    c.close()


def test_events_after_the_cursor_and_past_malformed_entries(client: redis.Redis) -> None:
    first = append_event(client, NS, DEP, Published(version=1, metrics={"a": 1}))
    client.xadd(keys.events(NS, DEP), {"garbage": "yes"})
    events, cursor = redis_io.read_events(client, NS, DEP, "0-0", 100)
    assert [e.version for e in events] == [1] and cursor > first  # the cursor moved past the bad entry
    assert redis_io.read_events(client, NS, DEP, cursor, 100) == ([], cursor)
    append_event(client, NS, DEP, Published(version=2, parent=1))
    events, _ = redis_io.read_events(client, NS, DEP, cursor, 100)
    assert [(e.version, e.parent) for e in events] == [(2, 1)]


def test_stats_read_what_the_engines_report(client: redis.Redis) -> None:
    reporter = StatsReporter(client, NS, DEP, interval_s=None)  # the engines' own writer
    reporter.add(2, tokens=100, accepted=70, verify_steps=30)
    reporter.add(3, tokens=10, accepted=2, swap_failures=1)
    reporter.flush()
    stats = redis_io.read_stats(client, NS, DEP, [2, 3, 4])
    assert stats[2] == Counters(tokens=100, accepted=70, verify_steps=30)
    assert stats[3].swap_failures == 1 and stats[3].acceptance == 0.2
    assert stats[4] == Counters()


def test_live_heartbeats_only(client: redis.Redis) -> None:
    now = time.time()
    for pod, age in (("chat-a", 1.0), ("chat-b", 20.0)):  # b has been silent for more than 3 intervals
        write_heartbeat(client, NS, DEP, Heartbeat(pod=pod, role="stable", version=3, time=now - age))
    assert set(redis_io.read_heartbeats(client, NS, DEP, heartbeat_s=5.0)) == {"chat-a"}


def test_control_state_as_the_engines_read_it_and_forget(client: redis.Redis) -> None:
    idle = TrainingStatus(state=TrainerState.IDLE, reason="NoTrigger", since="2026-11-25T18:00:00Z")
    state = gate.control_state(Routing(1, 2, ("chat-a",)), idle, gate.Votes(live=2, reporting=2, collect=("chat-a",)))
    redis_io.write_control(client, NS, DEP, state)
    got = read_control(client, NS, DEP)
    assert (got.version_for("chat-a"), got.version_for("chat-b"), got.train, got.collect) == (2, 1, False, True)
    redis_io.forget(client, NS, DEP)
    assert client.keys("*") == []


def test_malformed_stats_are_a_protocol_error_not_a_crash(client: redis.Redis) -> None:
    client.hset(keys.stats(NS, DEP, 1), "tokens", "many")
    with pytest.raises(redis_io.Malformed):
        redis_io.read_stats(client, NS, DEP, [1])


def test_unreachable_redis_is_reported_not_raised_as_a_crash(redis_server: LocalRedis) -> None:
    redis_server.stop()
    with pytest.raises(redis_io.Unavailable):
        redis_io.client_for(DEP, redis_server.url, None, False, 0.5)
