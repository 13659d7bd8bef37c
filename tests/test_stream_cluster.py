"""The stream against a real 3-node Redis Cluster (redis-server --cluster-enabled yes, redis-cli --cluster create)."""

from collections.abc import Iterator

import pytest

from tests.helpers import make_batch
from tide_sglang import keys
from tide_sglang.settings import TideSettings
from tide_sglang.stream import StreamReader, StreamWriter, connect
from tide_sglang.stream.server import LocalRedisCluster


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalRedisCluster]:
    with LocalRedisCluster(3) as c:
        yield c


def test_one_deployment_lives_on_one_slot(cluster):
    client = connect(TideSettings(redis_url=cluster.url, redis_cluster=True))
    slots = {client.keyslot(k) for k in (*keys.all_fixed("default", "a"), keys.stats("default", "a", 3))}
    assert len(slots) == 1
    assert client.keyslot(keys.hidden_states("default", "a")) != client.keyslot(keys.hidden_states("default", "b"))


@pytest.mark.parametrize("deployment", ["alpha", "beta", "gamma"])  # hash tags spread over the three nodes
def test_write_read_ack_on_cluster(cluster, deployment):
    settings = TideSettings(redis_url=cluster.url, redis_cluster=True, deployment=deployment)
    stream, dead = keys.hidden_states("default", deployment), keys.dead_letter("default", deployment)
    with StreamWriter(lambda: connect(settings, check=False), stream, queue_entries=64) as w:
        for i in range(30):
            assert w.submit(make_batch(seed=i, version=i))
        assert w.flush()
        assert w.stats.sent_entries == 30 and w.stats.dropped == 0
    reader = StreamReader(connect(settings), stream, dead, "c0", block_ms=100)
    seen: list[int] = []
    for _ in range(10):
        entries = reader.read()
        seen += [e.batch.draft_version for e in entries]
        reader.ack(entries)
    assert seen == list(range(30)) and reader.pending() == 0
