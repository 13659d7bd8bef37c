"""The capture hooks, driven with tensors shaped as SGLang's verify produces them and real ScheduleBatch/Req
objects, deliver exactly the accepted rows of committed requests to a real redis-server, through the real capture
helper process and the shared slab.

Mocked, because it needs a GPU: `run_eagle_verify` (the target's verify forward) returns a real
GenerationBatchResult built here. The worker and scheduler objects are minimal (their real constructors load
models onto a GPU) and carry exactly the attributes the patched methods and the hooks read. The admission hook is
called directly: the real `Scheduler._add_request_to_queue` it wraps needs a running scheduler (that the method
is patched is checked by `register()` and tests/contract/test_registration.py).
"""

import os
import signal
import subprocess
import sys
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
from tide_sglang.plugin import capture, hooks, slab, targets, versions, wire
from tide_sglang.stream import StreamReader, connect
from tide_sglang.stream.server import LocalRedis

K, H, ND, VOCAB = 3, 32, 4, 2000


@pytest.fixture
def tide_env(redis_server: LocalRedis, monkeypatch) -> Iterator[LocalRedis]:
    tide_sglang.plugin.register()
    for name, value in {"TIDE_REDIS_URL": redis_server.url, "TIDE_DEPLOYMENT": "test",
                        "TIDE_STATS_FLUSH_S": "0.05", "TIDE_CAPTURE_SLOT_MIB": "1"}.items():
        monkeypatch.setenv(name, value)
    hooks.reset_runtime()
    yield redis_server
    hooks.reset_runtime()


def draft_worker() -> types.SimpleNamespace:
    model = types.SimpleNamespace(model=types.SimpleNamespace(num_aux_hidden_states=K))
    return types.SimpleNamespace(draft_runner=types.SimpleNamespace(model=model), device="cpu",
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


def admitted(n: int, worker: eagle.EAGLEWorkerV2, custom_params: list[dict | None] | None = None) -> list[Req]:
    params = custom_params or [None] * n
    reqs = [Req(f"r{i}", "", [1, 2, 3], SamplingParams(max_new_tokens=64, custom_params=params[i])) for i in range(n)]
    scheduler = types.SimpleNamespace(draft_worker=worker)
    for r in reqs:
        hooks.before_admit(scheduler, r)
    return reqs


def verify_result(accept: list[int], seed: int = 0) -> GenerationBatchResult:
    bs = len(accept)
    gen = torch.Generator().manual_seed(seed)
    return GenerationBatchResult(
        logits_output=LogitsProcessorOutput(next_token_logits=None,
                                            hidden_states=torch.randn(bs * ND, K * H, generator=gen).bfloat16()),
        next_token_ids=torch.arange(bs * ND, dtype=torch.int32) + 1000,
        accept_lens=torch.tensor(accept, dtype=torch.int32),
        speculative_num_draft_tokens=ND, num_correct_drafts_per_req_cpu=[a - 1 for a in accept])


def verify(worker: eagle.EAGLEWorkerV2, batch: ScheduleBatch, result: GenerationBatchResult, monkeypatch) -> None:
    monkeypatch.setattr(eagle, "run_eagle_verify", lambda batch, **kw: result)
    assert eagle.EAGLEWorkerV2.verify(worker, batch) is result  # the patched method, through the hook


def commit(batch: ScheduleBatch, result: GenerationBatchResult, idle: bool = True) -> None:
    """SGLang's processing of a decode result; `idle`: no batch follows, so the scheduler idles (the capturer writes
    what it queued; under load it writes every FLUSH_BATCHES batches)."""
    hooks.before_commit(None, batch, result)
    hooks.after_commit(None, None, batch, result)
    if idle:
        hooks.after_idle(None, None)


def read_all(server: LocalRedis, count: int) -> list[CaptureBatch]:
    from tide_sglang.settings import TideSettings

    client = connect(TideSettings(redis_url=server.url, deployment="test"))
    reader = StreamReader(client, keys.hidden_states("default", "test"), keys.dead_letter("default", "test"), "t",
                          block_ms=50)
    got: list[CaptureBatch] = []
    wait_for(lambda: bool(got.extend(e.batch for e in reader.read())) or len(got) >= count, what="captured rows")
    return got


def settled(capturer) -> bool:
    return all(f == slab.FREE for f in capturer.slab.flags)


def test_verify_capture_emits_exactly_accepted_rows_of_committed_requests(tide_env, monkeypatch) -> None:
    worker = eagle_worker()
    batch = ScheduleBatch(reqs=admitted(4, worker), seq_lens=torch.tensor([10, 20, 30, 40]),
                          forward_mode=ForwardMode.DECODE)
    result = verify_result([1, 3, 4, 2])
    hidden = result.logits_output.hidden_states.clone()
    verify(worker, batch, result, monkeypatch)
    batch.reqs[2].finished_reason = FINISH_LENGTH(64)  # finished in the previous batch (overlap scheduling)
    commit(batch, result)

    [got] = read_all(tide_env, 1)
    rows = [0, 4, 5, 6, 12, 13]  # r0: 1 row, r1: 3 rows, r2: finished, r3: 2 rows
    assert got.rids == ["r0", "r1", "r3"]
    assert got.req_index.tolist() == [0, 1, 1, 1, 2, 2]
    assert got.positions.tolist() == [10, 20, 21, 22, 40, 41]
    assert got.token_ids.tolist() == [1000 + r for r in rows]
    assert torch.equal(got.hidden, hidden[rows]) and got.aux_layers == K
    assert got.acceptance == [0.0, 2.0, 1.0] and got.vocab_size == VOCAB and not got.is_prompt.any()
    client = redis.Redis.from_url(tide_env.url)
    wait_for(lambda: b"tokens" in client.hgetall(keys.stats("default", "test", 0)), what="stats flush")
    stats = client.hgetall(keys.stats("default", "test", 0))
    # 3 committed requests x (ND - 1) draft tokens verified; accepted drafts exclude each bonus token.
    assert (int(stats[b"tokens"]), int(stats[b"accepted"]), int(stats[b"verify_steps"])) == (3 * (ND - 1), 3, 3)


def test_rows_carry_each_requests_domain_into_per_domain_replay(tide_env, monkeypatch) -> None:
    """custom_params["tide_domain"] (tests/contract/test_domain.py shows it reaches the Req from every API): a label
    tags the request's rows; none, or one that is not a label, puts them in the default domain."""
    from tide_sglang.trainer.replay import ReplayBuffer, SequenceAssembler

    worker = eagle_worker()
    params = [{"tide_domain": "code"}, None, {"tide_domain": "not a label"}, {"tide_domain": "fr-FR", "k": 1}]
    batch = ScheduleBatch(reqs=admitted(4, worker, params), seq_lens=torch.tensor([10, 20, 30, 40]),
                          forward_mode=ForwardMode.DECODE)
    result = verify_result([2, 2, 2, 2])
    verify(worker, batch, result, monkeypatch)
    commit(batch, result)
    [got] = read_all(tide_env, 1)
    assert got.rids == ["r0", "r1", "r2", "r3"] and got.domains == ["code", "default", "default", "fr-FR"]
    replay = ReplayBuffer(recent=8, reservoir=8)
    assembler = SequenceAssembler(chunk_len=8, min_len=2)
    for chunk in assembler.add(got) + assembler.flush():
        replay.add(chunk)
    assert replay.added_rows == {"code": 2, "default": 4, "fr-FR": 2}


def test_prefill_capture_emits_prompt_rows_and_leaves_out_a_chunks_last_row(tide_env) -> None:
    worker = eagle_worker()
    batch = ScheduleBatch(reqs=admitted(2, worker), seq_lens=torch.tensor([3, 7]), forward_mode=ForwardMode.EXTEND)
    batch.extend_lens, batch.prefix_lens = [3, 2], [0, 5]
    batch.input_ids = torch.tensor([11, 12, 13, 14, 15])  # [sum extend_lens]
    batch.chunked_req = batch.reqs[1]  # its prompt continues in the next chunk
    hidden = torch.randn(5, K * H)  # [sum extend_lens, K*H]: full capture during prefill
    hooks.before_prefill(worker.draft_worker, batch, hidden, torch.tensor([99, 98]))
    hooks.after_idle(None, types.SimpleNamespace())  # the scheduler goes idle: the finished copy is posted

    [got] = read_all(tide_env, 1)
    assert got.rids == ["r0", "r1"]
    assert got.positions.tolist() == [0, 1, 2, 5]
    assert got.token_ids.tolist() == [12, 13, 99, 15]  # next prompt token, then the sampled one
    assert torch.equal(got.hidden, hidden[[0, 1, 2, 3]]) and got.is_prompt.all()


def test_no_rows_when_every_request_was_retracted(tide_env, monkeypatch) -> None:
    worker = eagle_worker()
    batch = ScheduleBatch(reqs=admitted(2, worker), seq_lens=torch.tensor([5, 6]), forward_mode=ForwardMode.DECODE)
    result = verify_result([2, 2])
    verify(worker, batch, result, monkeypatch)
    for r in batch.reqs:
        r.is_retracted = True
    commit(batch, result)
    capturer = hooks._runtime.capturer
    wait_for(lambda: settled(capturer), what="the helper to release the slot")
    assert not redis.Redis.from_url(tide_env.url).exists(keys.hidden_states("default", "test"))
    assert capturer.dropped == 0


def test_a_full_slab_drops_and_counts_instead_of_blocking_and_counts_still_arrive(tide_env, monkeypatch) -> None:
    monkeypatch.setenv("TIDE_CAPTURE_RING_SLOTS", "1")
    hooks.reset_runtime()
    worker = eagle_worker()
    batch = ScheduleBatch(reqs=admitted(1, worker), seq_lens=torch.tensor([5]), forward_mode=ForwardMode.DECODE)
    first, second = verify_result([3]), verify_result([2])
    verify(worker, batch, first, monkeypatch)
    verify(worker, batch, second, monkeypatch)  # the only slot still waits for the first commit
    capturer = hooks._runtime.capturer
    assert capturer.full == 1 and capturer.dropped == 0 and not hasattr(second, "_tide_capture")
    commit(batch, first)
    commit(batch, second)  # its rows were dropped, its counts are not
    [got] = read_all(tide_env, 1)
    assert got.positions.tolist() == [5, 6, 7]
    client = redis.Redis.from_url(tide_env.url)
    wait_for(lambda: client.hget(keys.stats("default", "test", 0), "verify_steps") == b"2", what="both batches counted")
    assert int(client.hget(keys.stats("default", "test", 0), "accepted")) == 2 + 1


def test_a_killed_helper_is_restarted_and_its_losses_counted(tide_env, monkeypatch) -> None:
    worker = eagle_worker()
    batch = ScheduleBatch(reqs=admitted(1, worker), seq_lens=torch.tensor([5]), forward_mode=ForwardMode.DECODE)
    first = verify_result([2])
    verify(worker, batch, first, monkeypatch)
    commit(batch, first)
    read_all(tide_env, 1)
    link = hooks._runtime.capturer.link
    os.kill(link.proc.pid, signal.SIGKILL)
    link.proc.wait()
    assert not link.check() and link.restarts == 1 and link.proc.poll() is None
    reqs = admitted(1, worker)  # the new helper knows only requests admitted after it started
    batch = ScheduleBatch(reqs=reqs, seq_lens=torch.tensor([9]), forward_mode=ForwardMode.DECODE)
    again = verify_result([3])
    verify(worker, batch, again, monkeypatch)
    commit(batch, again)
    got = read_all(tide_env, 2)
    assert got[-1].positions.tolist() == [9, 10, 11]


def test_without_tide_enabled_nothing_is_patched_and_the_version_is_not_checked(monkeypatch) -> None:
    """In a fresh process, as SGLang's `load_plugins()` runs the entry point in every process it spawns."""
    code = ("import sys, tide_sglang.plugin as p, tide_sglang.plugin.versions as v\n"
            "v.installed = lambda: '0.4.0'\n"  # unsupported, and not looked at while TIDE is off
            "p.register()\n"
            "print(sorted(m for m in sys.modules if m.startswith(('sglang', 'tide_sglang.plugin.hooks'))))\n")
    env = {k: v for k, v in os.environ.items() if k != "TIDE_ENABLED"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[-2] == "[]"  # neither SGLang nor the hooks were even imported: nothing patched
    monkeypatch.setattr(versions, "installed", lambda: "0.4.0")
    with pytest.raises(SystemExit, match=r"0\.4\.0"):  # TIDE_ENABLED=1 (the fixture): an unsupported SGLang stops
        tide_sglang.plugin.register()


def test_the_admission_target_takes_the_request() -> None:
    import inspect

    from sglang.srt.managers.scheduler import Scheduler

    params = list(inspect.signature(Scheduler._add_request_to_queue).parameters)
    assert params[: len(targets.ADMIT.params)] == list(targets.ADMIT.params)


def test_a_result_never_committed_gives_its_slot_back(tide_env, monkeypatch) -> None:
    monkeypatch.setenv("TIDE_CAPTURE_RING_SLOTS", "1")
    hooks.reset_runtime()
    worker = eagle_worker()
    batch = ScheduleBatch(reqs=admitted(1, worker), seq_lens=torch.tensor([5]), forward_mode=ForwardMode.DECODE)
    lost, later = verify_result([3]), verify_result([2])
    verify(worker, batch, lost, monkeypatch)  # SGLang drops this result: its commit hooks never run
    capturer = hooks._runtime.capturer
    monkeypatch.setattr(capture, "STALE_S", 0.0)
    verify(worker, batch, later, monkeypatch)
    assert capturer.dropped == 1  # the lost result's rows, not the new batch's
    commit(batch, later)
    commit(batch, lost)  # arriving after all: ignored, the slot is no longer its
    [got] = read_all(tide_env, 1)
    assert got.positions.tolist() == [5, 6]


def test_the_results_copy_done_covers_the_copies_capture_queues_in_the_verify() -> None:
    """Decode capture queues its device-to-host copies on the forward stream inside the verify and posts the slot
    once SGLang processed the result, with no event of its own (docs/sglang.md, "Capture cost"). That holds while
    SGLang (a) starts the result's readback only after the forward (on a copy stream that first waits for the
    forward stream, or on the forward stream itself), (b) records `copy_done` after that readback and (c) waits for
    `copy_done` before processing a decode result. A release that changes any of the three fails here."""
    import inspect

    from sglang.srt.managers import scheduler
    from sglang.srt.managers.scheduler_components.batch_result_processor import SchedulerBatchResultProcessor

    assert "self.copy_stream.wait_stream(self.forward_stream)" in inspect.getsource(scheduler)
    copy = inspect.getsource(GenerationBatchResult.copy_to_cpu).rstrip()
    assert copy.endswith("self.copy_done.record()"), copy[-200:]
    # ... and brings the next ids and accept lengths to the host itself: capture reads them there.
    assert "self.next_token_ids = _async_d2h(self.next_token_ids)" in copy
    assert "self.accept_lens = _async_d2h(self.accept_lens)" in copy
    decode = inspect.getsource(SchedulerBatchResultProcessor.process_batch_result_decode)
    assert "result.copy_done.synchronize()" in decode


def test_a_result_whose_ids_stayed_on_the_device_is_dropped_and_counted(tide_env, monkeypatch) -> None:
    """Capture reads the next ids from SGLang's host copy; a result without one (no path of SGLang's speculative
    decoding) gives its slot back and counts a drop instead of reading what a later replay may have rewritten.
    The `meta` device stands in for the GPU (a device tensor that is not on the host)."""
    worker = eagle_worker()
    batch = ScheduleBatch(reqs=admitted(1, worker), seq_lens=torch.tensor([5]), forward_mode=ForwardMode.DECODE)
    result = verify_result([2])
    verify(worker, batch, result, monkeypatch)
    capturer = hooks._runtime.capturer
    result.next_token_ids = torch.empty(ND, dtype=torch.int32, device="meta")
    sent: list[bytes] = []
    send = capturer.link.send
    monkeypatch.setattr(capturer.link, "send", lambda frame: sent.append(frame) or send(frame))
    hooks.before_commit(None, batch, result)
    hooks.after_commit(None, None, batch, result)  # its counts still go to the helper, the drop with them
    hooks.after_idle(None, None)
    assert settled(capturer) and capturer.dropped == 0
    [tick] = [m for m in wire.Decoder().feed(b"".join(sent)) if isinstance(m, wire.Tick)]
    assert tick.drops == 1 and tick.verify_steps == 1
    client = redis.Redis.from_url(tide_env.url)
    wait_for(lambda: int(client.hget(keys.stats("default", "test", 0), "verify_steps") or 0) == 1, what="stats")
    assert client.xlen(keys.hidden_states("default", "test")) == 0


def test_a_request_finishing_in_a_batch_keeps_that_batchs_rows(tide_env, monkeypatch) -> None:
    """The FIN of a request that finishes while SGLang processes a result goes to the helper after that result's
    slot: sent first, the helper would forget the request before reading its last rows (its EOS among them)."""
    worker = eagle_worker()
    batch = ScheduleBatch(reqs=admitted(2, worker), seq_lens=torch.tensor([7, 9]), forward_mode=ForwardMode.DECODE)
    result = verify_result([2, 1])
    verify(worker, batch, result, monkeypatch)
    hooks.before_commit(None, batch, result)
    batch.reqs[0].finished_reason = FINISH_LENGTH(64)  # SGLang's processing of this result finishes r0
    hooks.after_commit(None, None, batch, result)
    hooks.after_idle(None, None)
    [got] = read_all(tide_env, 1)
    assert got.rids == ["r0", "r1"] and got.positions.tolist() == [7, 8, 9]


def test_hook_timing_samples_each_hook_on_its_own(monkeypatch) -> None:
    """One call in TIME_EVERY of each hook is timed and scaled: the estimate equals the true cost when hooks run
    a fixed number of times per batch (a counter shared by all hooks would time the same hook every batch). The
    clock is a fake one each hook advances by its cost, so the sums are exact."""
    clock = [0]
    monkeypatch.setattr(hooks, "_thread_ns", lambda: clock[0])
    capturer = types.SimpleNamespace(ns=0)
    monkeypatch.setattr(hooks, "_runtime", types.SimpleNamespace(capturer=capturer))

    def costing(ns: int):
        def hook() -> None:
            clock[0] += ns
        return hooks._timed(hook)

    batch = [costing(ns) for ns in (5_000, 200_000, 20_000, 40_000)]
    batches = 64 * hooks.TIME_EVERY
    for _ in range(batches):
        for hook in batch:
            hook()
    assert capturer.ns == batches * 265_000


def test_a_failed_copy_gives_the_slot_back(tide_env, monkeypatch) -> None:
    """An error while a committed slot is completed (here the raw copy of the next ids raising) frees the slot
    and counts the drop; the batch goes on."""
    worker = eagle_worker()
    batch = ScheduleBatch(reqs=admitted(1, worker), seq_lens=torch.tensor([5]), forward_mode=ForwardMode.DECODE)
    result = verify_result([2])
    verify(worker, batch, result, monkeypatch)
    capturer = hooks._runtime.capturer

    def failed(*_: object) -> None:
        raise OSError("copy failed")

    monkeypatch.setattr(capture.ctypes, "memmove", failed)
    hooks.before_commit(None, batch, result)
    hooks.after_commit(None, None, batch, result)
    assert settled(capturer) and capturer.dropped == 1


def test_frames_go_in_one_write_every_few_batches_and_a_failed_write_keeps_the_counts(tide_env, monkeypatch) -> None:
    """A write wakes the helper, which costs the scheduler thread: decode batches are written FLUSH_BATCHES at a
    time (and when the scheduler idles), their counts in one TICK. A write that fails (pipe full) loses its slots
    but not the counts: the next batch writes again, and its TICK carries them."""
    monkeypatch.setenv("TIDE_CAPTURE_RING_SLOTS", "64")
    hooks.reset_runtime()
    worker = eagle_worker()
    batch = ScheduleBatch(reqs=admitted(1, worker), seq_lens=torch.tensor([5]), forward_mode=ForwardMode.DECODE)
    capturer = hooks._runtime.capturer
    sent: list[bytes] = []
    fail = [True]
    real = capturer.link.send

    def send(frame: bytes) -> bool:
        if fail[0]:
            fail[0] = False
            capturer.link.lost += 1
            return False
        sent.append(frame)
        return real(frame)

    monkeypatch.setattr(capturer.link, "send", send)
    for i in range(2 * capture.FLUSH_BATCHES + 1):
        result = verify_result([2], seed=i)
        verify(worker, batch, result, monkeypatch)
        commit(batch, result, idle=False)
    # batch 8's write failed (its 8 slots lost), so batch 9 wrote again: its slot and the 9 batches' counts; then
    # batches 10-17 in one write
    ticks = [[m for m in wire.Decoder().feed(f) if isinstance(m, wire.Tick)] for f in sent]
    assert [[t.batches for t in w] for w in ticks] == [[capture.FLUSH_BATCHES + 1], [capture.FLUSH_BATCHES]]
    assert ticks[0][0].drops == 1 and ticks[0][0].verify_steps == capture.FLUSH_BATCHES + 1
    hooks.after_idle(None, None)  # nothing left to write
    assert len(sent) == 2
    assert len(read_all(tide_env, capture.FLUSH_BATCHES + 1)) == capture.FLUSH_BATCHES + 1
    wait_for(lambda: settled(capturer), what="the helper to release the slots")
