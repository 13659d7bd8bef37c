"""Capture on the scheduler thread: O(1) Python per batch, everything else in the helper process.

Per decode batch (docs/sglang.md, "Capture cost"):
- `on_verify`: the verify output's hidden states and the batch's sequence lengths are copied device-to-host, on
  the forward stream (so before the next replay reuses CUDA-graph buffers), each straight into a typed view of a
  slot of the shared, page-locked slab: two asynchronous copies, no packing kernel, no side stream, no event. The
  requests' tags go to the slot's side region (a C-level map over the batch, no Python loop).
- `on_committed`, after SGLang processed the result (it waited for the result's `copy_done`, recorded after the
  verify returned, so behind TIDE's copies: the slot is complete without a wait of TIDE's own): the next ids and
  accept lengths from the host copies SGLang made of them, and which requests commit the result (under overlap
  scheduling a request that finished or was retracted ran once more; SGLang skips those rows, so does TIDE, from
  flags read before SGLang's processing marked this batch's finishes). The slot is posted; the per-version counts
  go to the helper in a tick (so a full slab drops hidden states, never the counts a canary is judged on), and
  requests that finished go as FIN frames.
Requests are registered once, at admission (`on_admit`): a tag on SGLang's `Req`, and a REG frame with its rid and
the domain the client set in `custom_params["tide_domain"]` (docs/sglang.md, "Domains"); the helper validates it.
"""

import ctypes
import itertools
import logging
import operator
import select
import time
from array import array
from collections import deque
from typing import Any

import torch

from tide_sglang.plugin import wire
from tide_sglang.plugin.link import HelperLink
from tide_sglang.plugin.slab import FREE, POSTED, SIDE_BYTES, Slab

log = logging.getLogger("tide.plugin.capture")

TAG = "_tide_tag"  # set on SGLang's Req at admission; -1 (the class default the plugin installs): unregistered
ATTR = "_tide_capture"  # on SGLang's GenerationBatchResult from verify to commit: (slot, event, layout)
FLAGS = "_tide_flags"  # on the result from before to after its processing: (finished, committed) bytes
CHECK_EVERY = 256  # batches between looks at the helper process
# A pipe write wakes the helper, and the waking costs the writer: 100-170 µs of the scheduler thread's CPU per write
# on the 2-core dev VM (2026-12-02, loaded), more than the rest of TIDE's per-batch work there. So frames wait in a
# buffer and go in one write every FLUSH_BATCHES decode batches, or sooner when half the slab's slots wait in it
# (the helper must keep up).
FLUSH_BATCHES = 8
STALE_S = 5.0  # a verify result not committed this long after its verify is taken as never committed

# The request's domain: a key of SamplingParams.custom_params, the one request field that reaches the scheduler's
# Req unchanged in 0.5.17-0.5.23 from both the OpenAI-compatible and the native API without touching the prefix
# cache, routing or scheduling (docs/sglang.md, "Domains", says why not routing_key, lora_id, extra_key, ...).
DOMAIN_PARAM = "tide_domain"
NOT_TEXT = "\x00"  # sent for a domain that is not a string: no label can be it, so the helper counts it as invalid

_tags = operator.attrgetter(TAG)
_finished = operator.attrgetter("finished_reason")  # Req.finished() is `finished_reason is not None`
_retracted = operator.attrgetter("is_retracted")


def flags(reqs: list[Any]) -> tuple[bytes, bytes]:
    """(finished, committed) per request as 0/1 bytes, by C-level maps: a request commits this result unless it
    had finished or was retracted before SGLang processed it (SGLang's own overlap-scheduling rule)."""
    fin = bytes(map(operator.truth, map(_finished, reqs)))
    return fin, bytes(map(operator.not_, map(operator.or_, fin, map(operator.truth, map(_retracted, reqs)))))


def request_domain(req: Any) -> str:
    """The domain the client set ("" when none), unvalidated: one dict lookup on the scheduler thread."""
    params = req.sampling_params.custom_params
    value = params.get(DOMAIN_PARAM) if isinstance(params, dict) else None
    if value is None or isinstance(value, str):
        return value or ""
    return NOT_TEXT


def _address(buffer: memoryview) -> int:
    """The address of a writable buffer (the slab's mapping outlives every use of it)."""
    view = ctypes.c_char.from_buffer(buffer)
    try:
        return ctypes.addressof(view)
    finally:
        del view  # releases the export, so the slab can still close


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.uint8)


class Capturer:
    def __init__(self, slab: Slab, link: HelperLink, device: str, collect: bool = True) -> None:
        self.slab, self.link = slab, link
        cuda = device.startswith("cuda") and torch.cuda.is_available()
        self.stream = torch.cuda.Stream(device=device) if cuda else None
        self.events = [torch.cuda.Event() if cuda else None for _ in range(slab.slots)]
        self.sampling = collect  # False: TIDE_CAPTURE_SAMPLE_RATE is 0
        self.collect = collect  # False: counts only, no rows copied (sample rate 0, or the control state's collect)
        self.version = 0
        self.dropped = 0  # scheduler-side drops not yet reported in a tick (ring full: `full`)
        self.full = 0  # drops because every slot was busy (the helper behind), not yet reported in a tick
        self.ns = 0  # scheduler-thread nanoseconds in TIDE code not yet reported in a tick
        self.batches = 0
        # counts of the committed batches since the last TICK written, all under `_tick_version`
        self._tick_version = 0
        self._tick = [0, 0, 0, 0]  # tokens, accepted, verify steps, batches
        self._frames: list[bytes] = []  # written together, in order (slot frames, FINs, then the tick)
        self._posted: list[int] = []  # the slots whose frames wait in `_frames`
        self._size = 0
        self._flush_slots = max(1, slab.slots // 2)
        self._tag = itertools.count()
        # Committed slots whose copy may be running, and FIN frames: a FIN goes out only after every slot queued
        # before it, or the helper would forget the request before it reads that request's last rows.
        self._awaiting: deque[tuple[Any, wire.SlotReady | bytes]] = deque()
        # decode slot -> (verify time, generation), until its result is committed; the generation tells a late
        # commit of a reclaimed slot from the commit of the verify that holds the slot now
        self._filling: dict[int, tuple[float, int]] = {}
        self._generation = itertools.count()
        self._sides = [slab.side(i) for i in range(slab.slots)]
        self._side_at = [_address(side) for side in self._sides]  # for memmove from SGLang's host tensors
        self._views: dict[tuple, list[tuple[torch.Tensor, ...] | None]] = {}  # decode destinations per shape

    # -- once per request ----------------------------------------------------------------------------------

    def on_admit(self, req: Any) -> None:
        """A new or retracted request enters the waiting queue: a retracted one restarts under a new tag."""
        old = _tags(req)
        if old >= 0:
            self._awaiting.append((None, wire.fin(old)))
        tag = next(self._tag)
        setattr(req, TAG, tag)
        self.link.send(wire.reg(tag, req.rid, request_domain(req)))

    # -- once per batch ------------------------------------------------------------------------------------

    def on_verify(self, batch: Any, result: Any, nd: int) -> None:
        hidden = result.logits_output.hidden_states if result.logits_output is not None else None
        reqs = batch.reqs
        bs = len(reqs)
        if not self.collect or hidden is None or not bs or result.accept_lens is None:
            return
        n = bs * nd
        ids, accept, seq = result.next_token_ids, result.accept_lens, batch.seq_lens
        slot = self._acquire()
        if slot is None:
            return
        views = self._decode_views(slot, hidden, seq)
        if (views is None or n > views[0].shape[0]
                or wire.decode_side(bs, n, ids.element_size(), accept.element_size())[2] > SIDE_BYTES):
            self.slab.flags[slot] = FREE
            self.dropped += 1
            return
        # Queued on the forward stream, behind the verify and before the next replay reuses graph buffers. The
        # result's `copy_done`, which SGLang records after the verify returns and waits for before processing
        # the result, covers these copies: no side stream and no event of TIDE's own (docs/sglang.md). The next
        # ids and accept lengths SGLang copies to the host itself; `on_committed` takes them from there.
        dst_hidden, dst_seq = views
        dst_hidden[:n].copy_(hidden[:n], non_blocking=True)
        dst_seq[:bs].copy_(seq[:bs], non_blocking=True)
        layout = wire.SlotReady(slot, "decode", self.version, bs, nd, n, hidden.shape[1], hidden.dtype,
                                ids.element_size(), accept.element_size(), seq.element_size())
        self._sides[slot][: 8 * bs] = memoryview(array("q", map(_tags, reqs))).cast("B")
        generation = next(self._generation)
        setattr(result, ATTR, (slot, generation, layout))
        self._filling[slot] = (time.monotonic(), generation)

    def _decode_views(self, slot: int, hidden: torch.Tensor, seq: torch.Tensor) -> tuple[torch.Tensor, ...] | None:
        """The slot's typed destinations at `wire.decode_regions`' offsets, made once per slot and shape; None
        when not one row fits."""
        key = (hidden.shape[1], hidden.dtype, seq.dtype)
        views = self._views.get(key)
        if views is None:
            views = self._views[key] = [None] * self.slab.slots
        if views[slot] is None:
            width = hidden.shape[1]
            capacity, at_seq = wire.decode_regions(self.slab.slot_bytes, width, hidden.element_size(),
                                                   seq.element_size())
            if capacity < 1:
                return None
            data = self.slab.data(slot)
            views[slot] = (torch.frombuffer(data, dtype=hidden.dtype, count=capacity * width).view(capacity, width),
                           torch.frombuffer(data, dtype=seq.dtype, count=capacity, offset=at_seq))
        return views[slot]

    def on_prefill(self, batch: Any, hidden: torch.Tensor, next_token_ids: torch.Tensor) -> None:
        """Prompt rows (once per request and chunk): rows chosen on the host from the extend's lengths, gathered
        on the GPU, in pieces that fit a slot."""
        reqs = batch.reqs
        if not self.collect or hidden is None or not reqs or batch.extend_lens is None:
            return
        from tide_sglang.plugin import rows

        complete = [r is not batch.chunked_req for r in reqs]
        row, req, pos, src = rows.prefill_rows(list(batch.extend_lens), list(batch.prefix_lens), complete)
        if not len(row):
            return
        device = hidden.device
        tokens = torch.cat([batch.input_ids.to(torch.int64), next_token_ids.to(torch.int64)])
        tags = memoryview(array("q", map(_tags, reqs))).cast("B")
        per_row = hidden.shape[1] * hidden.element_size() + 8
        step = max(1, min(self.slab.slot_bytes // per_row, (SIDE_BYTES - len(tags)) // 8))
        for at in range(0, len(row), step):
            r = row[at:at + step].to(device, non_blocking=True)
            parts = [_bytes(hidden.index_select(0, r)), _bytes(tokens.index_select(0, src[at:at + step].to(device)))]
            slot = self._copy(parts, len(tags) + 8 * len(r))
            if slot is None:
                return
            side = self.slab.side(slot)
            side[: len(tags)] = tags
            k = len(r)
            side[len(tags): len(tags) + 4 * k] = _bytes(req[at:at + step].to(torch.int32)).numpy()
            side[len(tags) + 4 * k: len(tags) + 8 * k] = _bytes(pos[at:at + step].to(torch.int32)).numpy()
            layout = wire.SlotReady(slot, "prefill", self.version, len(reqs), 1, k, hidden.shape[1], hidden.dtype)
            self._awaiting.append((self.events[slot], layout))

    def _complete(self, result: Any, committed: bytes) -> None:
        """The decode slot of `result`, if it has one, learns which requests commit it and takes the next ids and
        accept lengths from SGLang's own host copies (SGLang already waited for them: no GPU sync here). A result
        whose ids stayed on the device (no path of SGLang's speculative decoding), or are not the contiguous host
        tensors the raw copy below reads, is dropped and counted."""
        pending = result.__dict__.pop(ATTR, None)
        if pending is None:
            return
        slot, generation, layout = pending
        if self._filling.get(slot, (0.0, -1))[1] != generation:  # reclaimed as never committed: no longer its
            return
        del self._filling[slot]
        try:
            ids, accept = result.next_token_ids, result.accept_lens
            if (ids.device.type != "cpu" or accept.device.type != "cpu" or ids.numel() < layout.rows
                    or accept.numel() < layout.reqs or not (ids.is_contiguous() and accept.is_contiguous())):
                self.slab.flags[slot] = FREE
                self.dropped += 1
                return
            reqs, at = layout.reqs, self._side_at[slot]
            at_ids, at_accept, end = wire.decode_side(reqs, layout.rows, layout.id_size, layout.accept_size)
            self._sides[slot][8 * reqs: 9 * reqs] = committed
            # SGLang's host copies are contiguous: raw copies, no numpy view per tensor (~10 µs each)
            ctypes.memmove(at + at_ids, ids.data_ptr(), at_accept - at_ids)
            ctypes.memmove(at + at_accept, accept.data_ptr(), end - at_accept)
        except BaseException:  # the slot is no longer in _filling: free it here, or it is lost for good
            self.slab.flags[slot] = FREE
            raise
        self._awaiting.append((None, layout))

    def on_committed(self, result: Any, reqs: list[Any], fin: bytes, committed: bytes, correct: list[int] | None,
                     nd: int) -> None:
        """After SGLang processed the result (and waited for its copies): the result's slot, counts, finishes,
        finished copies. `fin` and `committed` were read before SGLang's processing (`flags`)."""
        self._complete(result, committed)
        steps = sum(committed)
        accepted = sum(itertools.compress(correct, committed)) if correct is not None else 0
        done = bytes(map(operator.truth, map(_finished, reqs)))
        if done != fin:
            self._finish(reqs, bytes(map(operator.gt, done, fin)))
        self.batches += 1
        if self.batches % CHECK_EVERY == 0:
            self.link.check()
        if self.version != self._tick_version and self._tick[3]:  # the counts so far are the old version's
            self.post_ready(flush=True)
        self._tick_version = self.version
        t = self._tick
        t[0] += (nd - 1) * steps
        t[1] += accepted
        t[2] += steps
        t[3] += 1
        self.post_ready(flush=t[3] >= FLUSH_BATCHES)

    def _finish(self, reqs: list[Any], newly: bytes) -> None:
        """FIN for the requests that finished in this result (a Python step per finished request only), queued
        behind this result's slot."""
        i = newly.find(1)
        while i >= 0:
            self._awaiting.append((None, wire.fin(_tags(reqs[i]))))
            i = newly.find(1, i + 1)

    def _acquire(self) -> int | None:
        """A free slot, reclaiming stale ones when none is; None (counted) when every slot is busy."""
        slot = self.slab.acquire()
        if slot is None:
            slot = self._reclaim()
        if slot is None:
            self.full += 1
        return slot

    def _copy(self, parts: list[torch.Tensor], side_bytes: int) -> int | None:
        """Prefill: pack `parts` (uint8 views) on the device and copy them into a free slot on a side stream, an
        event marking the end; None (counted) when no slot is free or they do not fit one."""
        size = sum(p.numel() for p in parts)
        if size > self.slab.slot_bytes or side_bytes > SIDE_BYTES:
            self.dropped += 1
            return None
        slot = self._acquire()
        if slot is None:
            return None
        dst = torch.frombuffer(self.slab.data(slot), dtype=torch.uint8, count=size)
        if self.stream is None:  # CPU: the copy is the only work there is
            torch.cat(parts, out=dst)
            return slot
        packed = torch.cat(parts)  # on the forward stream, before the next replay reuses graph buffers
        self.stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.stream):
            dst.copy_(packed, non_blocking=True)
            self.events[slot].record(self.stream)
        packed.record_stream(self.stream)
        return slot

    def _reclaim(self) -> int | None:
        """Free the slots of verify results SGLang never committed (a dropped result would hold its slot forever),
        each counted as a drop; then try again."""
        stale = time.monotonic() - STALE_S
        for slot in [s for s, (since, _) in self._filling.items() if since < stale]:
            del self._filling[slot]
            self.slab.flags[slot] = FREE
            self.dropped += 1
        return self.slab.acquire()

    def post_ready(self, flush: bool = True) -> bool:
        """Queue, in order, every slot whose device-to-host copy finished (`query` never waits) and the FIN frames
        behind them; write the queue, with a TICK of the counts since the last one, when `flush` is set or half the
        slab waits in it. One write wakes the helper once; it goes in pieces of at most PIPE_BUF bytes, each written
        whole or not at all. False when a write failed (its slots are freed, the counts stay for the next TICK)."""
        ok = True
        while self._awaiting:
            event, item = self._awaiting[0]
            if event is not None and not event.query():
                break
            self._awaiting.popleft()
            if not isinstance(item, bytes):
                self.slab.flags[item.slot] = POSTED
                self._posted.append(item.slot)
                item = wire.slot_ready(item)
            ok = self._queue(item) and ok
        if not (flush or len(self._posted) >= self._flush_slots):
            return ok
        t = self._tick
        pending = t[3] or self.dropped or self.full or self.link.lost
        if pending:
            ok = self._queue(wire.tick(self._tick_version, t[0], t[1], t[2], t[3], self.ns,
                                       self.dropped + self.link.lost, self.full)) and ok
        sent = self._write() if self._frames else True  # the tick, when there is one, is in this last write
        if pending and sent:
            self._tick = [0, 0, 0, 0]
            self.ns = self.dropped = self.link.lost = self.full = 0
        return ok and sent

    def _queue(self, frame: bytes) -> bool:
        """Add `frame`, first writing what is queued if the frame would take the write past PIPE_BUF."""
        ok = True
        if self._size + len(frame) > select.PIPE_BUF:
            ok = self._write()
        self._frames.append(frame)
        self._size += len(frame)
        return ok

    def _write(self) -> bool:
        """Send the queued frames in one write; the slots of a write that failed (pipe full, helper gone) are
        freed, counted by the link as lost."""
        ok = self.link.send(b"".join(self._frames))
        if not ok:
            for slot in self._posted:
                self.slab.flags[slot] = FREE
        self._frames.clear()
        self._posted.clear()
        self._size = 0
        return ok

    def close(self) -> None:
        if self.stream is not None:
            torch.cuda.synchronize(self.stream.device)
        self.post_ready()
        self._views.clear()  # they view the slab: released before it closes
        self._sides.clear()
        self._side_at.clear()
        self.link.close()
        self.slab.close()
