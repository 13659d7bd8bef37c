"""Writer and reader against a real redis-server (started per test on a free loopback port)."""

import multiprocessing as mp
import os
import signal
import time

import pytest
import redis

from tests.helpers import make_batch, wait_for
from tide_sglang import keys
from tide_sglang.settings import TideSettings
from tide_sglang.stream import StreamReader, StreamWriter, connect, decode
from tide_sglang.stream.server import LocalRedis

STREAM, DEAD = keys.hidden_states("default", "test"), keys.dead_letter("default", "test")


def _writer(settings: TideSettings, **kw) -> StreamWriter:
    return StreamWriter(lambda: connect(settings, check=False), STREAM, **kw)


def _reader(settings: TideSettings, consumer: str, **kw) -> StreamReader:
    return StreamReader(connect(settings), STREAM, DEAD, consumer, **kw)


def test_written_batches_arrive_intact_and_in_order(settings):
    batches = [make_batch(seed=i, version=i) for i in range(20)]
    with _writer(settings) as w:
        assert all(w.submit(b) for b in batches)
        assert w.flush()
        assert w.stats.sent_entries == 20 and w.stats.dropped == 0
    got = []
    r = _reader(settings, "t1", block_ms=100)
    while len(got) < 20:
        got += r.read()
    assert [e.batch.draft_version for e in got] == list(range(20))
    assert all((e.batch.hidden == b.hidden).all() for e, b in zip(got, batches, strict=True))


def test_a_reader_told_not_to_wait_returns_at_once_when_nothing_is_new(settings):
    """The trainer reads without waiting while it has rows to train on: its load must not depend on whether an
    engine is capturing (a 10 s wait here would be the reader's block time)."""
    with _writer(settings) as w:
        assert w.submit(make_batch(seed=0)) and w.flush()
    r = _reader(settings, "t1", block_ms=10_000)
    assert len(r.read(wait=False)) == 1  # what is there is taken
    t0 = time.monotonic()
    assert r.read(wait=False) == []
    assert time.monotonic() - t0 < 5.0


def test_writer_never_blocks_while_redis_is_killed_and_restarted(redis_server: LocalRedis, settings):
    w = _writer(settings, queue_entries=8, backoff_s=(0.01, 0.2))
    batch = make_batch(n=64, hidden=256)
    worst = 0.0

    def submit_for(seconds: float) -> None:
        nonlocal worst
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            t = time.perf_counter()
            w.submit(batch)
            worst = max(worst, time.perf_counter() - t)
            time.sleep(0.001)

    submit_for(0.3)
    redis_server.stop()
    submit_for(0.5)  # Redis is down: the caller keeps going, batches are dropped and counted
    down = w.stats
    assert not down.connected and down.dropped > 0 and down.redis_errors > 0
    sent_before = w.stats.sent_entries  # read while Redis is down: nothing can be sent meanwhile
    redis_server.start()
    submit_for(0.3)
    wait_for(lambda: w.stats.sent_entries > sent_before + 10, what="writer to resume after restart")
    w.close()
    s = w.stats
    assert s.connected
    assert s.submitted == s.sent_entries + s.dropped  # nothing unaccounted for
    # Waiting on Redis would take the 5 s connect timeout; 0.5 s leaves room for a loaded CI machine's scheduler.
    assert worst < 0.5, f"submit() blocked for {worst * 1e3:.1f} ms"
    assert redis.Redis.from_url(redis_server.url).xlen(STREAM) == s.sent_entries - sent_before


def test_queue_full_drops_and_counts_without_blocking(settings):
    w = _writer(settings, queue_entries=2)
    w._stop.set()  # stop the sender so the queue fills (white-box: the only way to force a full queue)
    w._thread.join()
    results = [w.submit(make_batch()) for _ in range(5)]
    assert results == [True, True, False, False, False]
    assert w.stats.dropped_queue_full == 3


def test_length_bound_from_byte_budget(redis_server, settings):
    batch = make_batch(n=16, hidden=512)  # ~48 KiB per entry
    budget = 1 << 20
    with _writer(settings, budget_bytes=budget) as w:
        for _ in range(300):
            w.submit(batch)
            w.flush()
        maxlen = w.stats.maxlen
    assert 16 <= maxlen <= budget // (16 * 3 * 512 * 2)
    length = redis.Redis.from_url(redis_server.url).xlen(STREAM)
    # `MAXLEN ~` trims whole radix-tree nodes (stream-node-max-entries, 100 by default).
    assert length <= maxlen + 100 and length < 300


def test_corrupt_entry_goes_to_dead_letter_and_reader_continues(redis_server, settings):
    client = redis.Redis.from_url(redis_server.url)
    with _writer(settings) as w:
        w.submit(make_batch(seed=1))
        w.flush()
        client.xadd(STREAM, {b"h": b"garbage", b"i": b"", b"x": b""})
        client.xadd(STREAM, {b"something": b"else"})
        w.submit(make_batch(seed=2))
    r = _reader(settings, "t1", block_ms=100)
    got = []
    for _ in range(5):
        entries = r.read()
        got += entries
        r.ack(entries)
    assert len(got) == 2 and r.stats.dead_lettered == 2
    dead = client.xrange(DEAD)
    assert len(dead) == 2
    assert b"header is truncated" in dead[0][1][b"tide_error"]
    assert r.pending() == 0  # corrupt entries are acked after being moved aside


def test_restarted_consumer_rereads_its_own_unacked_entries(settings):
    with _writer(settings) as w:
        for i in range(5):
            w.submit(make_batch(seed=i, version=i))
    r = _reader(settings, "trainer-0", block_ms=100)
    first = r.read()
    assert len(first) == 5  # used but never acked: the trainer "crashed"
    again = _reader(settings, "trainer-0", block_ms=100).read()
    assert [e.id for e in again] == [e.id for e in first]


def _consume_without_ack(url: str, ready) -> None:
    r = StreamReader(redis.Redis.from_url(url), STREAM, DEAD, "doomed", count=7, block_ms=100)
    r.read()  # takes 7 entries into its pending list and dies before acking them
    ready.set()
    time.sleep(60)


def test_dead_consumers_pending_entries_are_claimed_and_acked_once(redis_server, settings):
    total = 25
    with _writer(settings) as w:
        for i in range(total):
            w.submit(make_batch(seed=i, version=i))
    ctx = mp.get_context("spawn")
    ready = ctx.Event()
    doomed = ctx.Process(target=_consume_without_ack, args=(redis_server.url, ready))
    doomed.start()
    assert ready.wait(30)
    os.kill(doomed.pid, signal.SIGKILL)
    doomed.join()

    survivor = _reader(settings, "survivor", count=5, block_ms=50, claim_idle_ms=200)
    assert survivor.pending() == 7
    seen: list[int] = []
    deadline = time.monotonic() + 20
    while (len(seen) < total or survivor.pending()) and time.monotonic() < deadline:
        entries = survivor.read()
        seen += [e.batch.draft_version for e in entries]
        survivor.ack(entries)
    assert sorted(seen) == list(range(total)), "every entry processed exactly once"
    assert survivor.stats.claimed == 7 and survivor.stats.acked == total
    assert survivor.pending() == 0


def test_entries_decode_with_the_codec(redis_server, settings):
    with _writer(settings) as w:
        w.submit(make_batch(seed=3))
    (_id, fields), = redis.Redis.from_url(redis_server.url).xrange(STREAM)
    assert decode(fields).rids == make_batch(seed=3).rids


@pytest.mark.parametrize("password", ["s3cret"])
def test_password_settings_and_wrong_password(password, tmp_path):
    with LocalRedis(password=password) as server:
        url = f"redis://127.0.0.1:{server.port}/0"
        secret = tmp_path / "password"
        secret.write_text(password + "\n")
        connect(TideSettings(redis_url=url, redis_password_file=secret)).ping()
        connect(TideSettings(redis_url=url, redis_password=password)).ping()
        from tide_sglang.stream import RedisUnavailable

        with pytest.raises(RedisUnavailable, match=r"rejected the credentials.*TIDE_REDIS_PASSWORD"):
            connect(TideSettings(redis_url=url, redis_password="wrong"))
        with pytest.raises(RedisUnavailable, match="requires a password"):
            connect(TideSettings(redis_url=url))
        with pytest.raises(RedisUnavailable) as e:
            connect(TideSettings(redis_url=f"redis://:wrong@127.0.0.1:{server.port}/0"))
        assert "wrong" not in str(e.value)  # the password never reaches logs


def test_unreachable_redis_is_a_clear_error():
    from tide_sglang.stream import RedisUnavailable
    from tide_sglang.stream.server import free_port

    with pytest.raises(RedisUnavailable, match=r"cannot reach Redis at redis://127\.0\.0\.1"):
        connect(TideSettings(redis_url=f"redis://127.0.0.1:{free_port()}/0", redis_timeout_s=0.5))


def test_resume_delivers_each_pending_entry_once_even_without_acks(settings):
    """A trainer acks at checkpoints, long after reading: resuming must not hand it the same entries again."""
    with _writer(settings) as w:
        for i in range(10):
            w.submit(make_batch(seed=i, version=i))
    _reader(settings, "trainer-0", count=4, block_ms=50).read()  # 4 pending, then the trainer dies
    resumed = _reader(settings, "trainer-0", count=3, block_ms=50)
    seen = []
    for _ in range(6):
        seen += [e.batch.draft_version for e in resumed.read()]  # no ack in between
    assert seen == list(range(10))  # the 4 pending ones once, in order, then the new ones
