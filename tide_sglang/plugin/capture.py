"""Capture: accepted rows of each verify (and prompt rows of each extend) to the hidden-state stream.

On the scheduler thread (`on_verify`, `on_prefill`, `on_commit`) nothing waits for the GPU: rows are gathered
(a copy, so CUDA-graph buffers may be reused by the next replay) on the forward stream, copied device-to-host on
a side stream into a ring slot, and the slot is handed to a finisher thread once the scheduler knows which
requests committed. The finisher waits for the copy, keeps the accepted rows of committed requests, and submits
a `CaptureBatch` to the `StreamWriter`. A full ring or queue drops the batch and counts it.
"""

import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any, Literal

import torch
import xxhash

from tide_sglang.capture import CaptureBatch
from tide_sglang.plugin import rows
from tide_sglang.plugin.metrics import PluginMetrics
from tide_sglang.plugin.ring import PinnedRing, Slot
from tide_sglang.rollout import StatsReporter
from tide_sglang.settings import TideSettings
from tide_sglang.stream import StreamWriter

log = logging.getLogger("tide.plugin.capture")

ATTR = "_tide_capture"  # set on SGLang's GenerationBatchResult between verify and result processing
STALE_S = 5.0  # a verify result not processed this long after its verify is taken as never committed


def committed(reqs: list[Any]) -> list[bool]:
    """Which requests of a decode result commit it: under overlap scheduling a request that finished or was
    retracted ran once more, and SGLang discards those rows."""
    return [not (r.finished() or r.is_retracted) for r in reqs]


@dataclass(slots=True)
class Pending:
    """One batch's rows on their way to the host; `committed` is filled in when its result is processed.
    A plain slotted dataclass: one is built per batch on the scheduler thread, where validation would cost."""

    kind: Literal["decode", "prefill"]
    slot: Slot
    event: Any  # torch.cuda.Event, or None on the CPU path (the copy already happened)
    version: int
    rids: list[str]  # of the requests whose rows were copied, in slot order
    reqs: list[Any]  # SGLang Req objects of those requests, read again at commit time
    nd: int = 1  # decode: rows per request in the verify output (slot holds nd rows per request)
    accept_lens: list[int] | None = None  # decode: filled from the slot by the finisher
    committed: list[bool] | None = None
    req_index: torch.Tensor | None = None  # prefill: computed on the host, rows are final
    positions: torch.Tensor | None = None
    stats: list[int] | None = None  # decode: indices (in the whole batch) of requests that count in stats


class Capturer:
    def __init__(self, settings: TideSettings, writer: StreamWriter, metrics: PluginMetrics,
                 stats: StatsReporter, aux_layers: int, device: str, vocab_size: int) -> None:
        self.settings, self.writer, self.metrics, self.stats = settings, writer, metrics, stats
        self.aux_layers, self.vocab_size = aux_layers, vocab_size
        cuda = device.startswith("cuda") and torch.cuda.is_available()
        self.ring = PinnedRing(settings.capture_ring_slots, settings.capture_ring_rows, pin=cuda)
        self.stream = torch.cuda.Stream(device=device) if cuda else None
        self.version = 0
        self.dropped = 0
        self._awaiting: dict[int, tuple[Pending, float]] = {}  # slot -> decode capture waiting for its commit
        self._queue: queue.Queue[Pending | None] = queue.Queue(maxsize=settings.capture_ring_slots)
        self._thread = threading.Thread(target=self._run, name="tide-capture-finisher", daemon=True)
        self._thread.start()

    def sampled(self, rid: str) -> bool:
        """Per request, so a captured request's rows are all there (the trainer chains them by position)."""
        rate = self.settings.capture_sample_rate
        return rate >= 1.0 or xxhash.xxh3_64_intdigest(rid.encode()) / 2**64 < rate

    # -- scheduler thread ----------------------------------------------------------------------------------

    def on_verify(self, batch: Any, result: Any, nd: int) -> None:
        """After verify: copy the rows of sampled requests and every request's accept length and position."""
        hidden = result.logits_output.hidden_states if result.logits_output is not None else None
        reqs = list(batch.reqs)
        if hidden is None or not reqs or result.accept_lens is None:
            return
        bs = len(reqs)
        chosen = [i for i, r in enumerate(reqs) if self.sampled(r.rid)]
        n = len(chosen) * nd
        slot = self._acquire(max(n, bs), hidden.shape[1], hidden.dtype)
        if slot is None:
            return self.drop("ring_full")
        if len(chosen) == bs:  # every request sampled (the default): no index tensor to build
            picked = hidden[: bs * nd].clone()
            ids = result.next_token_ids[: bs * nd].to(torch.int64, copy=True)
        else:
            idx = (torch.tensor(chosen, dtype=torch.long).unsqueeze(1) * nd + torch.arange(nd)).flatten()
            dev_idx = idx.to(hidden.device, non_blocking=True)
            picked, ids = hidden.index_select(0, dev_idx), result.next_token_ids.index_select(0, dev_idx).long()
        event = self._to_host([(slot.hidden[:n], picked), (slot.ints[0, :n], ids),
                               (slot.ints[1, :bs], result.accept_lens.to(torch.int64, copy=True)),
                               (slot.ints[2, :bs], batch.seq_lens.to(torch.int64, copy=True))])
        pending = Pending(kind="decode", slot=slot, event=event, version=self.version, nd=nd,
                          rids=[reqs[i].rid for i in chosen], reqs=reqs, stats=chosen)
        setattr(result, ATTR, pending)
        self._awaiting[slot.index] = (pending, time.monotonic())

    def on_commit(self, batch: Any, result: Any) -> None:
        """Before SGLang processes a decode result: requests already finished or retracted commit nothing
        (under overlap scheduling they ran once more), the rest commit their accepted tokens."""
        pending: Pending | None = result.__dict__.pop(ATTR, None)
        if pending is None:
            return
        self._awaiting.pop(pending.slot.index, None)
        pending.committed = committed(pending.reqs)
        self._hand_over(pending)

    def on_prefill(self, batch: Any, hidden: torch.Tensor, next_token_ids: torch.Tensor) -> None:
        """Before the draft's extend: prompt rows of sampled requests (all committed: they were just admitted)."""
        reqs = list(batch.reqs)
        if hidden is None or not reqs or batch.extend_lens is None:
            return
        keep = [i for i, r in enumerate(reqs) if self.sampled(r.rid)]
        complete = [r is not batch.chunked_req for r in reqs]
        row, req, pos, src = rows.prefill_rows(list(batch.extend_lens), list(batch.prefix_lens), complete, keep)
        if not len(row):
            return
        slot = self._acquire(len(row), hidden.shape[1], hidden.dtype)
        if slot is None:
            return self.drop("ring_full")
        device = hidden.device
        tokens = torch.cat([batch.input_ids.to(torch.int64), next_token_ids.to(torch.int64)])
        picked = hidden.index_select(0, row.to(device, non_blocking=True))
        ids = tokens.index_select(0, src.to(device, non_blocking=True))
        event = self._to_host([(slot.hidden[: len(row)], picked), (slot.ints[0, : len(row)], ids)])
        self._hand_over(Pending(kind="prefill", slot=slot, event=event, version=self.version,
                                rids=[reqs[i].rid for i in keep], reqs=[], req_index=req, positions=pos))

    def _acquire(self, rows: int, width: int, dtype: torch.dtype) -> Slot | None:
        """A ring slot; when none is free, first reclaim slots of verify results SGLang never processed (a
        result dropped by the scheduler would otherwise hold its slot forever)."""
        slot = self.ring.acquire(rows, width, dtype)
        if slot is not None:
            return slot
        stale = time.monotonic() - STALE_S
        for index, (pending, since) in list(self._awaiting.items()):
            if since < stale:
                del self._awaiting[index]
                self.ring.release(pending.slot)
                self.drop("never_committed")
        return self.ring.acquire(rows, width, dtype)

    def _to_host(self, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> Any:
        if self.stream is None:  # CPU: the copy is the only work there is
            for dst, src in pairs:
                dst.copy_(src)
            return None
        self.stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.stream):
            for dst, src in pairs:
                dst.copy_(src, non_blocking=True)
                src.record_stream(self.stream)  # allocated on the forward stream: keep it until this copy ran
            event = torch.cuda.Event()
            event.record(self.stream)
        return event

    def _hand_over(self, pending: Pending) -> None:
        try:
            self._queue.put_nowait(pending)
        except queue.Full:
            self.ring.release(pending.slot)
            self.drop("queue_full")

    def drop(self, reason: str) -> None:
        self.dropped += 1
        self.metrics.drops.labels(**self.metrics.labels(self.version), reason=reason).inc()

    # -- finisher thread -----------------------------------------------------------------------------------

    def close(self, timeout: float = 10.0) -> None:
        self._queue.put(None)
        self._thread.join(timeout)
        self.stats.flush()

    def _run(self) -> None:
        next_flush = time.monotonic() + self.settings.stats_flush_s
        while True:
            try:
                pending = self._queue.get(timeout=self.settings.stats_flush_s)
            except queue.Empty:
                pending = False  # timed out: only flush
            if pending is None:
                return
            if pending:
                self._finish_safely(pending)
            if time.monotonic() >= next_flush:
                next_flush = time.monotonic() + self.settings.stats_flush_s
                self.stats.flush()

    def _finish_safely(self, pending: Pending) -> None:
        try:
            if pending.event is not None:
                pending.event.synchronize()  # releases the GIL: the scheduler thread runs on
            batch = self._finish(pending)
            if batch is not None and batch.num_tokens:
                labels = self.metrics.labels(batch.draft_version)
                if self.writer.submit(batch):
                    self.metrics.captured_tokens.labels(**labels).inc(batch.num_tokens)
                    self.metrics.captured_bytes.labels(**labels).inc(batch.hidden.numel() * batch.hidden.itemsize)
                else:
                    self.drop("writer_full")
        except Exception:  # a malformed batch must never stop capture: count it and go on
            log.exception("dropping a capture batch that could not be assembled")
            self.drop("invalid")
        finally:
            self.ring.release(pending.slot)

    def _finish(self, p: Pending) -> CaptureBatch | None:
        ints = p.slot.ints
        if p.kind == "prefill":
            n = len(p.req_index)
            return self._batch(p, p.rids, p.req_index, p.positions, torch.arange(n), None)
        bs = len(p.reqs)
        accept = ints[1, :bs].tolist()
        seq = ints[2, :bs].tolist()
        committed = p.committed or [False] * bs
        done = [i for i in range(bs) if committed[i]]
        # tokens: draft tokens verified (nd - 1 per request; row 0 is the last committed token), as the operator
        # and the reference engine count them; accept lengths include the bonus token.
        self.stats.add(p.version, tokens=(p.nd - 1) * len(done), verify_steps=len(done),
                       accepted=sum(accept[i] - 1 for i in done))
        chosen = p.stats or []
        keep = rows.keep_requests([accept[i] for i in chosen], p.nd, [committed[i] for i in chosen],
                                  [True] * len(chosen), self.settings.capture_max_acceptance)
        slot_rows, req, pos = rows.decode_rows([accept[i] for i in chosen], [seq[i] for i in chosen], p.nd, keep)
        return self._batch(p, [p.rids[k] for k in keep], req, pos, slot_rows,
                           [float(accept[chosen[k]] - 1) for k in keep])

    def _batch(self, p: Pending, rids: list[str], req: torch.Tensor, pos: torch.Tensor, slot_rows: torch.Tensor,
               acceptance: list[float] | None) -> CaptureBatch | None:
        if not rids:
            return None
        return CaptureBatch(rids=rids, req_index=req, positions=pos,
                            token_ids=p.slot.ints[0].index_select(0, slot_rows),
                            is_prompt=torch.full((len(slot_rows),), p.kind == "prefill"),
                            hidden=p.slot.hidden.index_select(0, slot_rows),  # a copy: the slot is reused
                            vocab_size=self.vocab_size, aux_layers=self.aux_layers, draft_version=p.version,
                            acceptance=acceptance)
