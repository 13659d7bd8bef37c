"""What the stream keeps and refuses: pure decisions as tables, then the same against a real redis-server."""

import time

import pytest
from pydantic import ValidationError

from tests.helpers import make_batch, wait_for
from tide_sglang import keys
from tide_sglang.settings import TideSettings, redacted
from tide_sglang.stream import CodecError, StreamReader, StreamWriter, connect, decode, encode
from tide_sglang.stream.reader import DEAD_LETTERS_KEPT, dead_letter_fields
from tide_sglang.stream.trim import oldest_unacked, trim_point

STREAM, DEAD = keys.hidden_states("default", "test"), keys.dead_letter("default", "test")


@pytest.mark.parametrize(("pending_min", "last_delivered", "expected"), [
    (None, "0-0", (0, 1)),  # a new group owes everything
    (None, "17-3", (17, 4)),  # all delivered acked: everything after the last delivered
    ("12-0", "17-3", (12, 0)),  # the oldest pending one
    (b"5-1", b"4-0", (4, 1)),
])
def test_oldest_unacked(pending_min, last_delivered, expected):
    assert oldest_unacked(pending_min, last_delivered) == expected


@pytest.mark.parametrize(("unacked", "now_ms", "retention_s", "expected"), [
    (None, 10_000, 5, (5_000, 0)),  # no group: only the retention time trims
    ((7_000, 2), 10_000, 5, (7_000, 2)),  # acked entries go, unacked ones stay
    ((1_000, 0), 10_000, 5, (5_000, 0)),  # ... unless older than the retention time
])
def test_trim_point(unacked, now_ms, retention_s, expected):
    assert trim_point(unacked, now_ms, retention_s) == expected


def test_dead_letters_keep_the_entry_only_within_their_share_of_the_budget():
    fields = {b"h": b"x" * 100, b"i": b"", b"x": b"y" * 5000}
    small = dead_letter_fields(fields, "1-0", "invalid", "why", entry_cap=16 << 10)
    assert small[b"x"] == fields[b"x"] and small[b"tide_reason"] == "invalid" and small[b"tide_source_id"] == "1-0"
    big = dead_letter_fields(fields, "1-0", "invalid", "why" * 1000, entry_cap=4 << 10)
    assert b"x" not in big and big[b"tide_bytes"] == "5100" and len(big[b"tide_error"]) == 1024


def test_decode_bounds_the_vocabulary_and_the_size():
    fields = {k: bytes(v) for k, v in encode(make_batch()).items()}
    assert decode(fields, vocab_size=49152).num_tokens == 8
    with pytest.raises(CodecError, match="vocabulary of 49152 tokens, this reader's target has 1000"):
        decode(fields, vocab_size=1000)
    with pytest.raises(CodecError, match="over the 100-byte limit"):
        decode(fields, max_bytes=100)


def test_passwords_are_redacted_in_repr_errors_and_urls():
    s = TideSettings(redis_url="redis://u:hunter2@r:6379/0")
    assert "hunter2" not in repr(s) and "hunter2" not in str(s) and "u:***@r:6379" in repr(s)
    with pytest.raises(ValidationError) as e:
        TideSettings(redis_url="http://u:hunter2@r:6379")
    assert "hunter2" not in str(e.value) and "must start with redis://" in str(e.value)
    assert redacted("unix:///run/redis.sock?db=0&password=hunter2") == "unix:///run/redis.sock?db=0&password=***"
    assert redacted("redis://r:6379") == "redis://r:6379"


def test_retention_trims_by_time_even_entries_never_acked(settings):
    s = settings.model_copy(update={"stream_retention_s": 0.3})
    client = connect(s)
    reader = StreamReader.from_settings(client, s, STREAM, DEAD, "t", block_ms=10, claim_idle_ms=0)
    with StreamWriter.from_settings(s, STREAM) as w:
        w.submit(make_batch(seed=1))
        assert w.flush()
        assert len(reader.read()) == 1  # delivered, never acked
        time.sleep(0.6)
        w.submit(make_batch(seed=2))  # the writer trims what is past the retention time
        assert w.flush()
    wait_for(lambda: client.xlen(STREAM) == 1, timeout=5, what="the expired entry to be trimmed")
    reader.read()  # its claim sees the pending entry gone
    assert reader.stats.trimmed_unread >= 1


def test_dead_letter_stream_is_bounded_in_entries_and_bytes(settings):
    s = settings.model_copy(update={"stream_dead_letter_mib": 1})
    client = connect(s)
    reader = StreamReader.from_settings(client, s, STREAM, DEAD, "t", block_ms=10)
    for _ in range(DEAD_LETTERS_KEPT + 20):
        client.xadd(STREAM, {b"h": b"TIDE", b"i": b"", b"x": b"z" * (64 << 10)})
    while reader.read() or reader.stats.dead_lettered < DEAD_LETTERS_KEPT + 20:
        pass
    assert client.xlen(DEAD) == DEAD_LETTERS_KEPT
    assert client.memory_usage(DEAD, samples=0) <= 1 << 20


def test_an_entry_claimed_again_and_again_goes_to_the_dead_letters(settings):
    """Trainers that die on one entry hand it to each other by XAUTOCLAIM: each claim is a delivery."""
    s = settings.model_copy(update={"stream_max_deliveries": 2})
    client = connect(s)
    first = StreamReader.from_settings(client, s, STREAM, DEAD, "a", block_ms=10, claim_idle_ms=60_000)
    client.xadd(STREAM, {k: bytes(v) for k, v in encode(make_batch()).items()})
    assert len(first.read()) == 1  # delivery 1, never acked
    got = []
    for name in ("b", "c"):  # deliveries 2 and 3, each by a claim
        time.sleep(0.02)
        r = StreamReader.from_settings(client, s, STREAM, DEAD, name, block_ms=10, claim_idle_ms=10)
        got.append(len(r.read()))
    assert got == [1, 0] and r.stats.dead_lettered == 1
    [(_, fields)] = client.xrange(DEAD)
    assert fields[b"tide_reason"] == b"delivery_limit" and b"delivered 3 times" in fields[b"tide_error"]
    assert client.xpending(STREAM, keys.TRAINER_GROUP)["pending"] == 0
