"""The capture hook, driven with tensors shaped as SGLang's verify produces them and real ScheduleBatch/Req
objects, delivers exactly the accepted rows of committed requests to a real redis-server.

Mocked, because it needs a GPU: `run_eagle_verify` (the target's verify forward) returns a real
GenerationBatchResult built here. The worker objects are minimal (their real constructors load models onto a GPU)
and carry exactly the attributes the patched `verify` and the hooks read.
"""

import types
from collections.abc import Iterator

import pytest
import redis
import sglang.srt.speculative.eagle_worker_v2 as eagle
import torch
from sglang.srt.layers.logits_processor import LogitsProcessorOutput
from sglang.srt.managers.schedule_batch import FINISH_LENGTH, Req, ScheduleBatch
from sglang.srt.managers.utils import GenerationBatchResult
from sglang.srt.model_executor.forward_batch_info import ForwardMode
from sglang.srt.sampling.sampling_params import SamplingParams

import tide_sglang.plugin
from tests.helpers import wait_for
from tide_sglang import keys
from tide_sglang.capture import CaptureBatch
from tide_sglang.plugin import hooks
from tide_sglang.stream import StreamReader, connect
from tide_sglang.stream.server import LocalRedis

K, H, ND = 3, 32, 4
VOCAB = 2048  # the target's vocabulary size, as SGLang's target ModelConfig reports it


@pytest.fixture
def tide_env(redis_server: LocalRedis, monkeypatch) -> Iterator[LocalRedis]:
    tide_sglang.plugin.register()
    for name, value in {"TIDE_REDIS_URL": redis_server.url, "TIDE_DEPLOYMENT": "test",
                        "TIDE_STATS_FLUSH_S": "0.05"}.items():
        monkeypatch.setenv(name, value)
    hooks.reset_runtime()
    yield redis_server
    hooks.reset_runtime()


def draft_worker() -> types.SimpleNamespace:
    return types.SimpleNamespace(draft_runner=types.SimpleNamespace(
        model=types.SimpleNamespace(model=types.SimpleNamespace(num_aux_hidden_states=K))), device="cpu",
        target_worker=types.SimpleNamespace(model_config=types.SimpleNamespace(vocab_size=VOCAB)))


def eagle_worker() -> eagle.EAGLEWorkerV2:
    worker = object.__new__(eagle.EAGLEWorkerV2)  # __init__ builds the draft model runner on a GPU
    worker.__dict__.update(_target_worker=None, _draft_worker=draft_worker(), req_to_token_pool=None,
                           token_to_kv_pool_allocator=None, plan_stream=None, plan_stream_ctx=None, topk=1,
                           speculative_num_draft_tokens=ND, device="cpu",
                           # 0.5.17's verify also passes num_steps=self.speculative_num_steps to run_eagle_verify
                           # (0.5.23 no longer does); both set it in __init__ from the server args.
                           speculative_num_steps=ND - 1)
    return worker


def reqs(n: int) -> list[Req]:
    return [Req(f"r{i}", "", [1, 2, 3], SamplingParams(max_new_tokens=64)) for i in range(n)]


def read_all(server: LocalRedis, count: int) -> list[CaptureBatch]:
    reader = StreamReader(connect_for(server), keys.hidden_states("default", "test"),
                          keys.dead_letter("default", "test"), "t", block_ms=50)
    got: list[CaptureBatch] = []
    wait_for(lambda: bool(got.extend(e.batch for e in reader.read())) or len(got) >= count, what="captured rows")
    return got


def connect_for(server: LocalRedis):
    from tide_sglang.settings import TideSettings

    return connect(TideSettings(redis_url=server.url, deployment="test"))


def test_verify_capture_emits_exactly_accepted_rows_of_committed_requests(tide_env, monkeypatch) -> None:
    accept = torch.tensor([1, 3, 4, 2], dtype=torch.int32)  # [bs], bonus token included
    bs = len(accept)
    hidden = torch.randn(bs * ND, K * H).to(torch.bfloat16)  # [bs*nd, K*H]: EAGLE-3 aux states
    next_ids = torch.arange(bs * ND, dtype=torch.int32) + 1000  # [bs*nd]
    batch = ScheduleBatch(reqs=reqs(bs), seq_lens=torch.tensor([10, 20, 30, 40]), forward_mode=ForwardMode.DECODE)
    result = GenerationBatchResult(logits_output=LogitsProcessorOutput(next_token_logits=None, hidden_states=hidden),
                                   next_token_ids=next_ids, accept_lens=accept, speculative_num_draft_tokens=ND)
    monkeypatch.setattr(eagle, "run_eagle_verify", lambda batch, **kw: result)

    assert eagle.EAGLEWorkerV2.verify(eagle_worker(), batch) is result  # the patched method, through the hook
    batch.reqs[2].finished_reason = FINISH_LENGTH(64)  # finished in the previous batch (overlap scheduling)
    hooks.before_commit(None, batch, result)

    [got] = read_all(tide_env, 1)
    rows = [0, 4, 5, 6, 12, 13]  # r0: 1 row, r1: 3 rows, r2: finished, r3: 2 rows
    assert got.rids == ["r0", "r1", "r3"]
    assert got.req_index.tolist() == [0, 1, 1, 1, 2, 2]
    assert got.positions.tolist() == [10, 20, 21, 22, 40, 41]
    assert got.token_ids.tolist() == next_ids[rows].tolist()
    assert torch.equal(got.hidden, hidden[rows]) and got.aux_layers == K
    assert got.acceptance == [0.0, 2.0, 1.0]
    assert not got.is_prompt.any() and got.vocab_size == VOCAB  # accepted decode rows: generated
    wait_for(lambda: b"tokens" in redis.Redis.from_url(tide_env.url).hgetall(keys.stats("default", "test", 0)),
             what="stats flush")
    stats = redis.Redis.from_url(tide_env.url).hgetall(keys.stats("default", "test", 0))
    # 3 committed requests x (ND - 1) draft tokens verified; accepted drafts exclude each bonus token.
    assert (int(stats[b"tokens"]), int(stats[b"accepted"]), int(stats[b"verify_steps"])) == (3 * (ND - 1), 3, 3)


def test_prefill_capture_emits_prompt_rows_and_leaves_out_a_chunks_last_row(tide_env) -> None:
    batch = ScheduleBatch(reqs=reqs(2), seq_lens=torch.tensor([3, 7]), forward_mode=ForwardMode.EXTEND)
    batch.extend_lens, batch.prefix_lens = [3, 2], [0, 5]
    batch.input_ids = torch.tensor([11, 12, 13, 14, 15])  # [sum extend_lens]
    batch.chunked_req = batch.reqs[1]  # its prompt continues in the next chunk
    hidden = torch.randn(5, K * H)  # [sum extend_lens, K*H]: full capture during prefill
    hooks.before_prefill(draft_worker(), batch, hidden, torch.tensor([99, 98]))

    [got] = read_all(tide_env, 1)
    assert got.rids == ["r0", "r1"]
    assert got.positions.tolist() == [0, 1, 2, 5]
    assert got.token_ids.tolist() == [12, 13, 99, 15]  # next prompt token, then the sampled one
    assert torch.equal(got.hidden, hidden[[0, 1, 2, 3]])
    assert got.is_prompt.all() and got.vocab_size == VOCAB


def test_no_rows_when_every_request_was_retracted(tide_env, monkeypatch) -> None:
    batch = ScheduleBatch(reqs=reqs(2), seq_lens=torch.tensor([5, 6]), forward_mode=ForwardMode.DECODE)
    result = GenerationBatchResult(
        logits_output=LogitsProcessorOutput(next_token_logits=None, hidden_states=torch.randn(2 * ND, K * H)),
        next_token_ids=torch.zeros(2 * ND, dtype=torch.int64), accept_lens=torch.tensor([2, 2]),
        speculative_num_draft_tokens=ND)
    monkeypatch.setattr(eagle, "run_eagle_verify", lambda batch, **kw: result)
    eagle.EAGLEWorkerV2.verify(eagle_worker(), batch)
    for r in batch.reqs:
        r.is_retracted = True
    hooks.before_commit(None, batch, result)
    rt = hooks._runtime
    wait_for(lambda: rt.capturer.ring.in_flight == 0, what="finisher")
    assert rt.capturer.writer.stats.submitted == 0 and rt.capturer.dropped == 0


def test_a_full_ring_drops_and_counts_instead_of_blocking(tide_env, monkeypatch) -> None:
    monkeypatch.setenv("TIDE_CAPTURE_RING_SLOTS", "1")
    hooks.reset_runtime()
    batch = ScheduleBatch(reqs=reqs(1), seq_lens=torch.tensor([5]), forward_mode=ForwardMode.DECODE)

    def result() -> GenerationBatchResult:
        return GenerationBatchResult(
            logits_output=LogitsProcessorOutput(next_token_logits=None, hidden_states=torch.randn(ND, K * H)),
            next_token_ids=torch.zeros(ND, dtype=torch.int64), accept_lens=torch.tensor([3]),
            speculative_num_draft_tokens=ND)

    first, second = result(), result()
    monkeypatch.setattr(eagle, "run_eagle_verify", lambda batch, **kw: first)
    eagle.EAGLEWorkerV2.verify(eagle_worker(), batch)
    monkeypatch.setattr(eagle, "run_eagle_verify", lambda batch, **kw: second)
    eagle.EAGLEWorkerV2.verify(eagle_worker(), batch)  # the only slot still waits for the first commit
    capturer = hooks._runtime.capturer
    assert capturer.dropped == 1 and not hasattr(second, "_tide_capture")
    hooks.before_commit(None, batch, first)
    [got] = read_all(tide_env, 1)
    assert got.positions.tolist() == [5, 6, 7]
