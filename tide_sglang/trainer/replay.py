"""From stream entries to training sequences: stitch rows per request into chunks, keep them in a replay buffer.

A `CaptureBatch` carries one verify step of many requests; the rows of one request arrive spread over many
entries. `SequenceAssembler` chains them by request id and position into `Chunk`s of up to `chunk_len` rows.
A chunk also carries its request's prompt key (a hash of the prompt's tokens, taken from the request's prefill
rows), so requests that share a prompt are held out together. `ReplayBuffer` keeps, per domain tag, a window of
the most recent chunks plus a reservoir sample (Algorithm R) of everything older, and samples domains
uniformly: a workload that comes back is still in the reservoir, and a rare domain is not drowned by a frequent
one.
"""

import random
from collections import OrderedDict, deque

import torch
import xxhash
from pydantic import BaseModel, ConfigDict, Field

from tide_sglang.capture import DEFAULT_DOMAIN, CaptureBatch


class Chunk(BaseModel):
    """Consecutive rows of one request: row t is the target's state at positions[t], tokens[t] what it emitted."""

    model_config = ConfigDict(arbitrary_types_allowed=True, frozen=True, extra="forbid")

    hidden: torch.Tensor = Field(description="[T, K*H] as captured (bf16/fp16/fp32)")
    tokens: torch.Tensor = Field(description="[T] int64")
    positions: torch.Tensor = Field(description="[T] int64, consecutive")
    is_prompt: torch.Tensor = Field(description="[T] bool, True on prompt (prefill) rows")
    rid: str = Field("", description="the request the rows came from")
    prompt_key: str = Field("", description="hash of the request's prompt tokens (requests with the same prompt "
                            "share it); the request id when its prompt rows were not seen; '': use rid")
    domain: str = DEFAULT_DOMAIN

    @property
    def length(self) -> int:
        return self.tokens.numel()


def prompt_key(batch: CaptureBatch, rows: torch.Tensor) -> str | None:
    """A request's prompt key from its rows in one batch, when they start its prompt (position 0): a hash of the
    prompt tokens they emitted (the last prompt row is left out: it emits the first generated token)."""
    prompt = rows[batch.is_prompt[rows]]
    if not prompt.numel() or int(batch.positions[prompt[0]]) != 0:
        return None
    return xxhash.xxh3_64_hexdigest(batch.token_ids[prompt[:-1]].numpy().astype("<i8").tobytes())


def held_out(chunk: Chunk, fraction: float) -> bool:
    """Whole prompts are held out, by a hash of the prompt key: no held-out prompt is ever trained on, even when
    several requests send it."""
    key = chunk.prompt_key or chunk.rid
    return xxhash.xxh3_64_intdigest(key.encode()) % 10_000 < fraction * 10_000


class _Open:
    def __init__(self, rid: str, domain: str, key: str) -> None:
        self.rid, self.domain, self.key = rid, domain, key
        self.hidden: list[torch.Tensor] = []
        self.tokens: list[torch.Tensor] = []
        self.positions: list[torch.Tensor] = []
        self.is_prompt: list[torch.Tensor] = []
        self.next_position = -1
        self.length = 0

    def append(self, batch: CaptureBatch, rows: torch.Tensor) -> None:
        self.hidden.append(batch.hidden[rows])
        self.tokens.append(batch.token_ids[rows])
        self.positions.append(batch.positions[rows])
        self.is_prompt.append(batch.is_prompt[rows])
        self.length += rows.numel()
        self.next_position = int(batch.positions[rows[-1]]) + 1

    def successor(self) -> "_Open":
        """The empty sequence that continues this one after a full chunk was cut."""
        nxt = _Open(self.rid, self.domain, self.key)
        nxt.next_position = self.next_position
        return nxt

    def chunk(self) -> Chunk:
        return Chunk(hidden=torch.cat(self.hidden), tokens=torch.cat(self.tokens),
                     positions=torch.cat(self.positions), is_prompt=torch.cat(self.is_prompt), rid=self.rid,
                     prompt_key=self.key, domain=self.domain)


class SequenceAssembler:
    def __init__(self, chunk_len: int, min_len: int = 2, max_open: int = 4096) -> None:
        self.chunk_len, self.min_len, self.max_open = chunk_len, min_len, max_open
        self._open: OrderedDict[str, _Open] = OrderedDict()  # least recently extended first
        self._keys: OrderedDict[str, str] = OrderedDict()  # rid -> prompt key, for the requests seen lately

    def add(self, batch: CaptureBatch) -> list[Chunk]:
        """Append the batch's rows to their requests' open sequences; return the chunks that completed."""
        done: list[Chunk] = []
        order = torch.argsort(batch.req_index * (1 << 40) + batch.positions)  # by request, then position
        req = batch.req_index[order]
        for i in torch.unique_consecutive(req).tolist():
            rows = order[req == i]  # [r] this request's rows, in position order
            done += self._extend(batch.rids[i], batch.domain_of(i), batch, rows)
        while len(self._open) > self.max_open:  # requests that finished long ago
            done += self._close(next(iter(self._open)))
        return done

    def _key(self, rid: str, batch: CaptureBatch, rows: torch.Tensor) -> str:
        """The request's prompt key: from this batch when it holds the prompt's start, else as seen before."""
        key = prompt_key(batch, rows) or self._keys.get(rid, rid)
        self._keys[rid] = key
        self._keys.move_to_end(rid)
        while len(self._keys) > 4 * self.max_open:  # requests that finished long ago
            self._keys.popitem(last=False)
        return key

    def flush(self) -> list[Chunk]:
        """Close every open sequence (before a checkpoint: nothing acked may live only in memory)."""
        done: list[Chunk] = []
        for rid in list(self._open):
            done += self._close(rid)
        return done

    @property
    def open_rows(self) -> int:
        return sum(o.length for o in self._open.values())

    def _extend(self, rid: str, domain: str, batch: CaptureBatch, rows: torch.Tensor) -> list[Chunk]:
        done: list[Chunk] = []
        key = self._key(rid, batch, rows)
        positions = batch.positions[rows]
        # A gap (rows dropped by sampling or the writer) or a restart breaks the chain: start a new sequence.
        breaks = (positions[1:] != positions[:-1] + 1).nonzero().squeeze(1) + 1
        for part in torch.tensor_split(rows, breaks.tolist()):
            seq = self._open.get(rid)
            if seq is None or int(batch.positions[part[0]]) != seq.next_position:
                done += self._close(rid)
                seq = self._open[rid] = _Open(rid, domain, key)
            self._open.move_to_end(rid)
            while part.numel():
                room = self.chunk_len - seq.length
                seq.append(batch, part[:room])
                part = part[room:]
                if seq.length == self.chunk_len:
                    done.append(seq.chunk())
                    seq = self._open[rid] = seq.successor()
        return done

    def _close(self, rid: str) -> list[Chunk]:
        seq = self._open.pop(rid, None)
        return [seq.chunk()] if seq is not None and seq.length >= self.min_len else []


class _Domain:
    def __init__(self, recent: int) -> None:
        self.recent: deque[Chunk] = deque(maxlen=recent)
        self.reservoir: list[Chunk] = []
        self.seen_old = 0  # chunks that ever left the recent window (Algorithm R's n)


class ReplayBuffer:
    def __init__(self, recent: int, reservoir: int, recent_weight: float = 0.5, seed: int = 0) -> None:
        self.recent_size, self.reservoir_size, self.recent_weight = recent, reservoir, recent_weight
        self.rng = random.Random(seed)
        self.domains: dict[str, _Domain] = {}
        self.added_rows: dict[str, int] = {}

    def add(self, chunk: Chunk) -> None:
        d = self.domains.setdefault(chunk.domain, _Domain(self.recent_size))
        self.added_rows[chunk.domain] = self.added_rows.get(chunk.domain, 0) + chunk.length
        if len(d.recent) == d.recent.maxlen:
            self._retire(d, d.recent[0])
        d.recent.append(chunk)

    def put(self, chunk: Chunk, reservoir: bool) -> None:
        """Put a chunk straight back where a checkpoint found it (resume); no sampling decision is made."""
        d = self.domains.setdefault(chunk.domain, _Domain(self.recent_size))
        (d.reservoir if reservoir else d.recent).append(chunk)

    def _retire(self, d: _Domain, chunk: Chunk) -> None:
        """Algorithm R: the i-th chunk leaving the window replaces a random slot with probability size/i."""
        d.seen_old += 1
        if len(d.reservoir) < self.reservoir_size:
            d.reservoir.append(chunk)
        else:
            slot = self.rng.randrange(d.seen_old)
            if slot < self.reservoir_size:
                d.reservoir[slot] = chunk

    def sample(self, n: int) -> list[Chunk]:
        """n chunks: a domain uniformly, then its recent window (recent_weight) or its reservoir."""
        live = [d for d in self.domains.values() if d.recent or d.reservoir]
        if not live:
            return []
        out = []
        for _ in range(n):
            d = self.rng.choice(live)
            pool = d.recent if (not d.reservoir or self.rng.random() < self.recent_weight) and d.recent else d.reservoir
            out.append(pool[self.rng.randrange(len(pool))])
        return out

    def chunks(self) -> list[Chunk]:
        return [c for d in self.domains.values() for c in (*d.recent, *d.reservoir)]

    def __len__(self) -> int:
        return sum(len(d.recent) + len(d.reservoir) for d in self.domains.values())

    @property
    def rows(self) -> int:
        return sum(c.length for c in self.chunks())


class TrainBatch(BaseModel):
    model_config = ConfigDict(arbitrary_types_allowed=True, frozen=True, extra="forbid")

    aux: torch.Tensor  # [B, T, K*H]
    tokens: torch.Tensor  # [B, T] int64
    positions: torch.Tensor  # [B, T] int64
    valid: torch.Tensor  # [B, T] bool: False on padding
    prompt: torch.Tensor  # [B, T] bool: True on prompt rows
    rows: int  # valid rows, counted on the host (reading valid.sum() back would wait for the device)


def collate(chunks: list[Chunk], device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> TrainBatch:
    """Right-pad chunks to the longest one. For a CUDA device the batch is built in pinned memory and copied
    without blocking (the hidden states travel as captured, bf16, and are converted on the device)."""
    pin = torch.device(device).type == "cuda"
    t = max(c.length for c in chunks)
    b, width = len(chunks), chunks[0].hidden.shape[1]
    aux = torch.zeros(b, t, width, dtype=chunks[0].hidden.dtype, pin_memory=pin)
    ints = torch.zeros(2, b, t, dtype=torch.int64, pin_memory=pin)  # tokens, positions
    flags = torch.zeros(2, b, t, dtype=torch.bool, pin_memory=pin)  # valid, prompt
    for i, c in enumerate(chunks):
        aux[i, : c.length] = c.hidden
        ints[0, i, : c.length] = c.tokens
        ints[1, i, : c.length] = c.positions
        flags[0, i, : c.length] = True
        flags[1, i, : c.length] = c.is_prompt
    ints, flags = ints.to(device, non_blocking=pin), flags.to(device, non_blocking=pin)
    return TrainBatch(aux=aux.to(device, non_blocking=pin).to(dtype), tokens=ints[0], positions=ints[1],
                      valid=flags[0], prompt=flags[1], rows=sum(c.length for c in chunks))
