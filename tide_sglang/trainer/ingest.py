"""Stream entries into training data: request sequences cut into chunks, whole prompts held out by a hash of their
tokens (`replay.held_out`: requests sending the same prompt fall on one side, so no held-out prompt was trained
on), the rest into the replay buffer; token counts for a new lineage's vocabulary."""

import logging
from collections import deque

import torch

from tide_sglang.capture import CaptureBatch
from tide_sglang.settings import TideSettings
from tide_sglang.trainer import state as ckpt
from tide_sglang.trainer.replay import Chunk, ReplayBuffer, SequenceAssembler, held_out

log = logging.getLogger("tide.trainer")


class Ingest:
    def __init__(self, settings: TideSettings, vocab_size: int, seed: int = 0) -> None:
        self.heldout_fraction = settings.train_heldout_fraction
        self.assembler = SequenceAssembler(settings.train_chunk_len, min_len=2)
        self.replay = ReplayBuffer(settings.train_recent_chunks, settings.train_reservoir_chunks, seed=seed)
        self.heldout: deque[Chunk] = deque(maxlen=settings.train_heldout_chunks)
        self.counts = torch.zeros(vocab_size)  # token frequencies, to choose a new lineage's vocabulary
        self.rows = 0
        self.skipped_rows = 0

    def add(self, batch: CaptureBatch, width: int | None, count_tokens: bool) -> None:
        """`width`: the K*H the draft fuses (None before a draft exists); rows of another width are skipped."""
        if width is not None and batch.hidden.shape[1] != width:
            self.skipped_rows += batch.num_tokens
            log.error("skipping %d rows of width %d: the draft fuses K*H = %d", batch.num_tokens,
                      batch.hidden.shape[1], width)
            return
        self.rows += batch.num_tokens
        if count_tokens:
            self.counts += torch.bincount(batch.token_ids, minlength=self.counts.numel()).float()
        for chunk in self.assembler.add(batch):
            self._store(chunk)

    def close_sequences(self) -> None:
        """Move every open (partial) request sequence into the buffers."""
        for chunk in self.assembler.flush():
            self._store(chunk)

    def _store(self, chunk: Chunk) -> None:
        if held_out(chunk, self.heldout_fraction):
            self.heldout.append(chunk)
        else:
            self.replay.add(chunk)

    # -- checkpoint ---------------------------------------------------------------------------------------

    def stored(self) -> list[tuple[ckpt.Store, Chunk]]:
        return [("heldout", c) for c in self.heldout] + [
            (store, c) for d in self.replay.domains.values()
            for store, cs in (("recent", d.recent), ("reservoir", d.reservoir)) for c in cs]

    def save_into(self, state: ckpt.TrainerState) -> dict[str, torch.Tensor]:
        state.chunks, tensors = ckpt.pack_chunks(self.stored())
        state.ingested_rows = self.rows
        state.domains_trained = dict(self.replay.added_rows)
        state.reservoir_seen = {k: d.seen_old for k, d in self.replay.domains.items()}
        return tensors

    def restore(self, state: ckpt.TrainerState, tensors: dict[str, torch.Tensor]) -> None:
        self.rows = state.ingested_rows
        for store, chunk in ckpt.unpack_chunks(state.chunks, tensors):
            if store == "heldout":
                self.heldout.append(chunk)
            else:
                self.replay.put(chunk, reservoir=store == "reservoir")
        for domain, seen in state.reservoir_seen.items():
            self.replay.domains[domain].seen_old = seen
        self.replay.added_rows = dict(state.domains_trained)
