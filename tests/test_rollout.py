"""The rollout protocol (tide_sglang.rollout) against a real redis-server: every model through its read and write
functions, what a malformed key does, and which keys a deleted deployment leaves behind (none)."""

import json

import pytest
import redis

from tide_sglang import keys
from tide_sglang.rollout import (
    ControlState,
    Heartbeat,
    Published,
    RolloutError,
    Stats,
    StatsReporter,
    add_stats,
    append_event,
    delete_deployment_keys,
    read_control,
    read_event_page,
    read_events,
    read_heartbeats,
    read_stats,
    write_control,
    write_forced_steps,
    write_heartbeat,
)
from tide_sglang.stream.server import LocalRedis

NS, DEP = "team-a", "chat"


@pytest.fixture
def client(redis_server: LocalRedis) -> redis.Redis:
    c = redis.Redis.from_url(redis_server.url)
    yield c
    c.close()


@pytest.mark.parametrize(("state", "pod", "version", "role"), [
    (ControlState(), "a", 0, "stable"),  # version 0, the imported draft, is a real version
    (ControlState(stable=3, canary=4, canary_pods=("a",)), "a", 4, "canary"),
    (ControlState(stable=3, canary=4, canary_pods=("a",)), "b", 3, "stable"),
    (ControlState(stable=3, canary_pods=("a",)), "a", 3, "stable"),  # no canary runs: named pods serve stable
    (ControlState(stable=3, canary=0, canary_pods=("a",)), "a", 0, "canary"),  # a pin back to v0 as a canary
])
def test_version_and_role_of_a_pod(state: ControlState, pod: str, version: int, role: str) -> None:
    assert (state.version_for(pod), state.role_of(pod)) == (version, role)


def test_control_round_trip_and_whole_hash_replaced(client: redis.Redis) -> None:
    assert read_control(client, NS, DEP) is None  # no operator has written it yet
    state = ControlState(stable=2, canary=3, canary_pods=("p-1", "p-2"), train=False, collect=True)
    write_control(client, NS, DEP, state)
    assert read_control(client, NS, DEP) == state
    write_control(client, NS, DEP, ControlState(stable=3))
    assert read_control(client, NS, DEP) == ControlState(stable=3)  # canary and its pods gone, train back on
    assert b"canary" not in client.hgetall(keys.control(NS, DEP))
    assert read_control(client, "default", DEP) is None  # another namespace, another key


def test_forced_steps_per_pod_survive_the_routing_writer(client: redis.Redis) -> None:
    """`tide profile` forces one pod while the operator keeps rewriting the routing: neither undoes the other."""
    write_forced_steps(client, NS, DEP, "p-1", 3)  # before any routing exists: the defaults route
    assert read_control(client, NS, DEP) == ControlState(force_steps={"p-1": 3})
    write_control(client, NS, DEP, ControlState(stable=2, canary=3, canary_pods=("p-2",)))
    write_forced_steps(client, NS, DEP, "p-2", 0)
    state = read_control(client, NS, DEP)
    assert state is not None and state.stable == 2 and state.force_steps == {"p-1": 3, "p-2": 0}
    assert (state.forced_steps("p-1"), state.forced_steps("p-2"), state.forced_steps("p-3")) == (3, 0, None)
    write_control(client, NS, DEP, ControlState(stable=4))  # the operator's reconcile
    assert read_control(client, NS, DEP) == ControlState(stable=4, force_steps={"p-1": 3, "p-2": 0})
    write_forced_steps(client, NS, DEP, "p-1", None)
    write_forced_steps(client, NS, DEP, "p-2", None)
    assert read_control(client, NS, DEP) == ControlState(stable=4)
    with pytest.raises(ValueError, match=">= 0"):
        write_forced_steps(client, NS, DEP, "p-1", -1)


@pytest.mark.parametrize(("fields", "problem"), [
    ({"stable": "x"}, "stable"),
    ({"stable": "-1"}, "stable"),
    ({"stable": "1", "canary_pods": "p-1,p-2"}, "canary_pods"),
    ({"stable": "1", "train": "yes"}, "train must be 0 or 1"),
    ({"stable": "1", "role": "canary"}, "role"),  # unknown field: a writer that drifted from the protocol
    ({"stable": "1", "force:p-1": "x"}, "force:p-1"),
    ({"stable": "1", "force:p-1": "-2"}, "forced draft steps"),
])
def test_malformed_control_raises_with_what_is_wrong(client: redis.Redis, fields: dict, problem: str) -> None:
    client.hset(keys.control(NS, DEP), mapping=fields)
    with pytest.raises(RolloutError, match=problem):
        read_control(client, NS, DEP)


def test_events_after_a_cursor_malformed_ones_skipped(client: redis.Redis, caplog: pytest.LogCaptureFixture) -> None:
    first = append_event(client, NS, DEP, Published(version=0, parent=None, metrics={"accept_length": 2.5}))
    stream = keys.events(NS, DEP)
    client.xadd(stream, {"garbage": "yes"})
    client.xadd(stream, {"version": "2", "parent": "", "metrics": json.dumps({"domains": {"code": 3}})})
    client.xadd(stream, {"version": "-1", "parent": "", "metrics": "{}"})
    second = append_event(client, NS, DEP, Published(version=1, parent=0))
    got = read_events(client, NS, DEP)
    assert got == [(first, Published(version=0, metrics={"accept_length": 2.5})),
                   (second, Published(version=1, parent=0))]
    assert caplog.text.count("skipping malformed events entry") == 3
    assert [e.version for _, e in read_events(client, NS, DEP, after=first)] == [1]
    assert read_events(client, NS, DEP, after=second) == []
    bad = client.xadd(stream, {"version": "x"}).decode()
    assert read_event_page(client, NS, DEP, after=second) == ([], bad)  # the cursor moves past a bad last entry


def test_stats_add_through_client_and_pipeline(client: redis.Redis) -> None:
    assert read_stats(client, NS, DEP, 0) == Stats()  # nobody reported on it
    add_stats(client, NS, DEP, 0, tokens=40, accepted=30, verify_steps=10)
    pipe = client.pipeline()
    add_stats(pipe, NS, DEP, 0, tokens=10, accepted=0, verify_steps=5, swap_failures=1)
    pipe.execute()
    got = read_stats(client, NS, DEP, 0)
    assert (got.tokens, got.accepted, got.verify_steps, got.swap_failures) == (50, 30, 15, 1)
    assert got.acceptance_rate == 0.6 and got.accept_length == 3.0 and got.updated > 0
    assert read_stats(client, NS, DEP, 1).acceptance_rate is None
    with pytest.raises(ValueError, match="unknown stats fields"):
        add_stats(client, NS, DEP, 0, tokenz=1)
    client.hset(keys.stats(NS, DEP, 2), "tokens", "lots")
    with pytest.raises(RolloutError, match="version 2"):
        read_stats(client, NS, DEP, 2)


def test_stats_reporter_adds_and_survives_redis_down(redis_server: LocalRedis, client: redis.Redis) -> None:
    reporter = StatsReporter(client, NS, DEP, interval_s=3600)
    reporter.add(3, tokens=30, accepted=12, verify_steps=10)
    reporter.add(3, tokens=3, accepted=1, verify_steps=1)
    reporter.flush()
    got = read_stats(client, NS, DEP, 3)
    assert (got.tokens, got.accepted, got.verify_steps) == (33, 13, 11) and got.updated > 0
    with pytest.raises(ValueError, match="unknown stats fields"):
        reporter.add(3, tokenz=1)
    redis_server.stop()
    reporter.add(3, tokens=5, accepted=5, verify_steps=5)
    assert not reporter.flush()  # logged, kept for later: never raises into the engine
    redis_server.start()
    assert reporter.flush()
    fresh = redis.Redis.from_url(redis_server.url)
    assert read_stats(fresh, NS, DEP, 3).tokens == 5  # the restarted (non-persistent) server got the kept counts


def test_heartbeats_live_only_malformed_skipped(client: redis.Redis, caplog: pytest.LogCaptureFixture) -> None:
    now = 1000.0
    live = Heartbeat(pod="p-1", role="canary", version=3, swap_failures=1, trigger={"train": True, "short": 0.7},
                     time=now - 14)
    write_heartbeat(client, NS, DEP, live)
    write_heartbeat(client, NS, DEP, Heartbeat(pod="p-2", role="stable", version=2, swap_failures=0, time=now - 16))
    client.hset(keys.pods(NS, DEP), mapping={"p-3": "not json", "p-4": live.model_dump_json()})
    assert read_heartbeats(client, NS, DEP, now=now, heartbeat_s=5) == {"p-1": live}  # p-2 is 16 s > 3 x 5 s old
    assert "p-3" in caplog.text and "p-4" in caplog.text
    assert set(read_heartbeats(client, NS, DEP, now=now, heartbeat_s=10)) == {"p-1", "p-2"}


def test_delete_deployment_keys_leaves_nothing_of_it(client: redis.Redis) -> None:
    for ns in (NS, "other"):
        write_control(client, ns, DEP, ControlState(stable=1))
        append_event(client, ns, DEP, Published(version=1, parent=0))
        for v in range(0, 30):
            add_stats(client, ns, DEP, v, tokens=1)
        write_heartbeat(client, ns, DEP, Heartbeat(pod="p", role="stable", version=1, swap_failures=0, time=1.0))
        client.xadd(keys.hidden_states(ns, DEP), {"x": "1"})
        client.xadd(keys.dead_letter(ns, DEP), {"x": "1"})
    delete_deployment_keys(client, NS, DEP)
    left = {k.decode() for k in client.keys("*")}
    assert left and all(k.startswith("tide:{other/") for k in left)
    assert len(left) == 5 + 30
