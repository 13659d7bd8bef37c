"""The capture helper process: reads slots of the shared slab as the scheduler posts them, assembles
`CaptureBatch`es, and writes them and the per-version counts to Redis (`python -m tide_sglang.plugin.helper FD
CONFIG`, started by `link.HelperLink`). It has no CUDA device; it reads TIDE_* settings from the environment it
inherits from the scheduler, and its Prometheus metrics land in SGLang's multiprocess directory beside the
scheduler's.
"""

import logging
import os
import select
import sys
import time

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from tide_sglang import keys
from tide_sglang.capture import DEFAULT_DOMAIN, CaptureBatch, is_domain_label
from tide_sglang.plugin import rows, wire
from tide_sglang.plugin.metrics import WRITER_DROPS, PluginMetrics
from tide_sglang.plugin.slab import FREE, Slab
from tide_sglang.rollout import StatsReporter
from tide_sglang.settings import TideSettings
from tide_sglang.stream import StreamWriter, connect

log = logging.getLogger("tide.plugin.helper")

MAX_TAGS = 1 << 18  # registered requests kept; beyond, the oldest go (requests aborted while queued never FIN)
_INTS = {4: np.int32, 8: np.int64}


class HelperConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    slab: str
    slots: int = Field(ge=1)
    slot_bytes: int = Field(ge=1)
    aux_layers: int = Field(ge=1, le=16)
    vocab_size: int = Field(ge=1)


class Assembler:
    """Slots -> `CaptureBatch`es: pure over the slab's bytes and the registered requests."""

    def __init__(self, config: HelperConfig, sample_rate: float, max_acceptance: float) -> None:
        self.config, self.sample_rate, self.max_acceptance = config, sample_rate, max_acceptance
        self.requests: dict[int, tuple[str, str, bool]] = {}  # tag -> (rid, domain, sampled)
        self.unregistered = 0

    def register(self, msg: wire.Reg) -> bool:
        """Keep the request's rid, domain and sampling draw; False when its domain is not a label (it is then in
        the default domain)."""
        if len(self.requests) >= MAX_TAGS:
            for tag in list(self.requests)[: MAX_TAGS // 2]:
                del self.requests[tag]
        valid = not msg.domain or is_domain_label(msg.domain)
        self.requests[msg.tag] = (msg.rid, msg.domain if valid else "", rows.sampled(msg.rid, self.sample_rate))
        return valid

    def forget(self, tag: int) -> None:
        self.requests.pop(tag, None)

    def _known(self, tags: np.ndarray) -> tuple[np.ndarray, list[tuple[str, str, bool]]]:
        info = [self.requests.get(int(t)) for t in tags]
        self.unregistered += sum(i is None for i in info)
        ok = np.array([i is not None and i[2] for i in info], dtype=bool)
        return ok, [i or ("", "", False) for i in info]

    def decode(self, data: memoryview, side: memoryview, s: wire.SlotReady) -> CaptureBatch | None:
        hidden = torch.frombuffer(data, dtype=s.dtype, count=s.rows * s.width).view(s.rows, s.width)
        _, at_seq = wire.decode_regions(len(data), s.width, hidden.element_size(), s.seq_size)
        seq = np.frombuffer(data, _INTS[s.seq_size], s.reqs, at_seq).astype(np.int64)
        at_ids, at_accept, _ = wire.decode_side(s.reqs, s.rows, s.id_size, s.accept_size)
        ids = np.frombuffer(side, _INTS[s.id_size], s.rows, at_ids)
        accept = np.frombuffer(side, _INTS[s.accept_size], s.reqs, at_accept).astype(np.int64)
        tags = np.frombuffer(side, np.int64, s.reqs)
        committed = np.frombuffer(side, np.uint8, s.reqs, 8 * s.reqs).astype(bool)
        ok, info = self._known(tags)
        keep = np.flatnonzero(ok & committed & rows.hard_enough(accept, s.nd, self.max_acceptance))
        row, req, pos = rows.decode_rows(accept, seq, s.nd, keep)
        return self._batch(s, keep, info, row, req, pos, hidden, ids, acceptance=(accept[keep] - 1).tolist())

    def prefill(self, data: memoryview, side: memoryview, s: wire.SlotReady) -> CaptureBatch | None:
        hidden = torch.frombuffer(data, dtype=s.dtype, count=s.rows * s.width).view(s.rows, s.width)
        ids = np.frombuffer(data, np.int64, s.rows, hidden.numel() * hidden.element_size())
        tags = np.frombuffer(side, np.int64, s.reqs)
        req = np.frombuffer(side, np.int32, s.rows, 8 * s.reqs).astype(np.int64)
        pos = np.frombuffer(side, np.int32, s.rows, 8 * s.reqs + 4 * s.rows).astype(np.int64)
        ok, info = self._known(tags)
        keep = np.flatnonzero(ok)
        renumber = np.full(s.reqs, -1, dtype=np.int64)
        renumber[keep] = np.arange(len(keep))
        row = np.flatnonzero(ok[req])
        return self._batch(s, keep, info, row, renumber[req[row]], pos[row], hidden, ids, acceptance=None)

    def _batch(self, s: wire.SlotReady, keep: np.ndarray, info: list[tuple[str, str, bool]], row: np.ndarray,
               req: np.ndarray, pos: np.ndarray, hidden: torch.Tensor, ids: np.ndarray,
               acceptance: list[int] | None) -> CaptureBatch | None:
        if not len(row):
            return None
        domains = [info[i][1] or DEFAULT_DOMAIN for i in keep]
        index = torch.from_numpy(row)
        return CaptureBatch(
            rids=[info[i][0] for i in keep], req_index=torch.from_numpy(req), positions=torch.from_numpy(pos),
            token_ids=torch.from_numpy(ids[row].astype(np.int64)), hidden=hidden.index_select(0, index),
            is_prompt=torch.full((len(row),), s.kind == "prefill"), vocab_size=self.config.vocab_size,
            aux_layers=self.config.aux_layers, draft_version=s.version,
            domains=domains if any(d != DEFAULT_DOMAIN for d in domains) else None,
            acceptance=None if acceptance is None else [float(a) for a in acceptance])


# every tide_capture_drops_total reason the plugin counts (docs/metrics.md)
DROP_REASONS = ("scheduler", "ring_full", "writer_full", *WRITER_DROPS)


class Helper:
    """The helper's loop: frames in, stream entries and stats out."""

    def __init__(self, config: HelperConfig, settings: TideSettings, metrics: PluginMetrics | None = None) -> None:
        self.settings = settings
        self.slab = Slab.attach(config.slab, config.slots, config.slot_bytes)
        self.assembler = Assembler(config, settings.capture_sample_rate, settings.capture_max_acceptance)
        self.metrics = metrics or PluginMetrics(settings.deployment)
        stream = keys.hidden_states(settings.namespace, settings.deployment)
        self.writer = StreamWriter.from_settings(settings, stream)
        client = connect(settings, check=False)
        self.stats = StatsReporter(client, settings.namespace, settings.deployment, interval_s=settings.stats_flush_s)
        self.version = 0
        self.invalid_domains = 0

    def handle(self, msg: wire.Message) -> None:
        if isinstance(msg, wire.Reg):
            if not self.assembler.register(msg):
                self._invalid_domain(msg)
        elif isinstance(msg, wire.Fin):
            self.assembler.forget(msg.tag)
        elif isinstance(msg, wire.Tick):
            self._tick(msg)
        else:
            self._slot(msg)

    def _invalid_domain(self, msg: wire.Reg) -> None:
        """Counted every time, logged once per process: a client sending bad labels must not flood the log."""
        self.metrics.invalid_domains.labels(**self.metrics.labels(self.version)).inc()
        self.invalid_domains += 1
        if self.invalid_domains == 1:
            log.warning("request %s: domain %r is not a label (1-64 of A-Z a-z 0-9 _ . -); its rows go to the %r "
                        "domain. Counted in tide_capture_invalid_domains_total, logged only this once",
                        msg.rid, msg.domain, DEFAULT_DOMAIN)

    def _tick(self, t: wire.Tick) -> None:
        self.version = t.version
        labels = self.metrics.labels(t.version)
        self.metrics.serving(t.version, DROP_REASONS)
        if t.verify_steps:
            self.stats.add(t.version, tokens=t.tokens, accepted=t.accepted, verify_steps=t.verify_steps)
            self.metrics.verified(t.version, t.tokens, t.accepted, t.verify_steps)
        per_batch = self.metrics.scheduler_seconds.labels(**labels)
        for _ in range(t.batches):  # one observation per decode batch, each the mean of the tick's batches
            per_batch.observe(t.scheduler_ns / t.batches / 1e9)
        if t.drops:
            self.metrics.drops.labels(**labels, reason="scheduler").inc(t.drops)
        if t.ring_full:
            self.metrics.drops.labels(**labels, reason="ring_full").inc(t.ring_full)
        self.metrics.writer_dropped(t.version, self.writer.stats)

    def _slot(self, s: wire.SlotReady) -> None:
        labels = self.metrics.labels(s.version)
        try:
            assemble = self.assembler.prefill if s.kind == "prefill" else self.assembler.decode
            batch = assemble(self.slab.data(s.slot), self.slab.side(s.slot), s)
        except Exception:  # a malformed slot must never stop capture: count it and go on
            log.exception("dropping a capture slot that could not be assembled")
            self.metrics.drops.labels(**labels, reason="invalid").inc()
            return
        finally:
            self.slab.flags[s.slot] = FREE  # `batch` holds copies, never views of the slot
        if batch is None:
            return
        self.metrics.captured(batch, self.writer.submit(batch))

    def run(self, fd: int) -> None:
        decoder = wire.Decoder()
        while True:
            ready, _, _ = select.select([fd], [], [], self.settings.stats_flush_s)
            if ready:
                data = os.read(fd, 1 << 16)
                if not data:  # the scheduler closed the pipe: finish and exit
                    break
                for msg in decoder.feed(data):
                    self.handle(msg)
            else:
                self.stats.flush()
        self.close()

    def close(self) -> None:
        self.writer.close()
        self.stats.flush()
        self.slab.close()


def main(argv: list[str]) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s tide-capture-helper %(levelname)s %(message)s")
    torch.set_num_threads(1)  # one core's worth: the serving process keeps the rest
    fd, config = int(argv[1]), HelperConfig.model_validate_json(argv[2])
    started = time.monotonic()
    helper = Helper(config, TideSettings())
    log.info("ready in %.1f s (slab %s, %d slots)", time.monotonic() - started, config.slab, config.slots)
    helper.run(fd)


if __name__ == "__main__":
    main(sys.argv)
