"""Messages from the scheduler process to its capture helper, over a pipe: small fixed-layout frames.

A frame is `u16 body length | u8 kind | body`, at most PIPE_BUF bytes, so a non-blocking write either lands
whole or fails whole (the sender then counts a drop). The bulk data never travels here: it is in the slab.

- REG: a request was admitted (tag, rid, domain), once per request;
- FIN: it finished (its tag is forgotten), once per request;
- TICK: one decode batch was processed: per-version counts for the rollout stats, the scheduler thread's time
  in TIDE code since the last tick, and drops the scheduler counted;
- SLOT: a slot's device-to-host copy completed; its layout, so the helper can read the rows.
"""

import struct
from dataclasses import dataclass
from typing import Literal

import torch

from tide_sglang.capture import DOMAIN_MAX

_HEAD = struct.Struct("<HB")
REG, FIN, TICK, SLOT = 1, 2, 3, 4
_REG = struct.Struct("<qHH")  # tag, rid length, domain length, then the two utf-8 strings
_FIN = struct.Struct("<q")
_TICK = struct.Struct("<IIIIIQII")  # version, tokens, accepted, verify_steps, batches, scheduler ns, drops, ring full
# slot, kind (0 decode, 1 prefill), version, requests, nd, rows, width, hidden dtype, ids/accept/seq item sizes
_SLOT = struct.Struct("<HBIIHIIBBBB")
MAX_FRAME = 4096  # PIPE_BUF on Linux
MAX_TEXT = 1024

DTYPES = {1: torch.bfloat16, 2: torch.float16, 3: torch.float32}
DTYPE_CODES = {v: k for k, v in DTYPES.items()}


@dataclass(frozen=True, slots=True)
class Reg:
    tag: int
    rid: str
    domain: str


@dataclass(frozen=True, slots=True)
class Fin:
    tag: int


@dataclass(frozen=True, slots=True)
class Tick:
    version: int
    tokens: int
    accepted: int
    verify_steps: int
    batches: int  # decode batches the counts cover (the scheduler writes once every few batches)
    scheduler_ns: int
    drops: int
    ring_full: int = 0  # batches or prefill pieces dropped because every slab slot was busy


@dataclass(frozen=True, slots=True)
class SlotReady:
    """Decode: the data region holds hidden [rows, width] and seq lens [reqs] (at `decode_regions`' offset), the
    side region tags int64 [reqs] | committed uint8 [reqs] | next ids [rows] | accept lens [reqs] (at
    `decode_side`'s offsets); item sizes given, rows = reqs * nd.
    Prefill: the data region holds hidden [rows, width] | token ids [rows]; the side region tags int64 [reqs] |
    req_index int32 [rows] | positions int32 [rows]."""

    slot: int
    kind: Literal["decode", "prefill"]
    version: int
    reqs: int
    nd: int
    rows: int
    width: int
    dtype: torch.dtype
    id_size: int = 8
    accept_size: int = 8
    seq_size: int = 8


def decode_regions(slot_bytes: int, width: int, hidden_size: int, seq_size: int) -> tuple[int, int]:
    """(row capacity, byte offset of the seq lens) in a decode slot's data region, after the hidden states.
    Fixed for a shape, so the scheduler copies each part straight into a view it made once per slot (no packing
    on the GPU, no per-batch offsets); capacity is a multiple of 8, so the seq lens stay aligned."""
    capacity = slot_bytes // (width * hidden_size + seq_size) // 8 * 8
    return capacity, capacity * width * hidden_size


def decode_side(reqs: int, rows: int, id_size: int, accept_size: int) -> tuple[int, int, int]:
    """(byte offsets of the next ids and the accept lens, end) in a decode slot's side region, after the tags
    (int64 [reqs]) and the committed flags (uint8 [reqs]); the ids start 8-aligned."""
    ids = -(-9 * reqs // 8) * 8
    accept = ids + rows * id_size
    return ids, accept, accept + reqs * accept_size


def _frame(kind: int, body: bytes) -> bytes:
    return _HEAD.pack(len(body), kind) + body


def reg(tag: int, rid: str, domain: str = "") -> bytes:
    """The domain is cut one byte past the longest label, never to it: an over-long value stays invalid for the
    helper, which validates it (off the scheduler thread)."""
    r, d = rid.encode()[:MAX_TEXT], domain.encode(errors="replace")[: DOMAIN_MAX + 1]
    return _frame(REG, _REG.pack(tag, len(r), len(d)) + r + d)


def fin(tag: int) -> bytes:
    return _frame(FIN, _FIN.pack(tag))


def tick(version: int, tokens: int, accepted: int, verify_steps: int, batches: int, scheduler_ns: int, drops: int,
         ring_full: int = 0) -> bytes:
    return _frame(TICK, _TICK.pack(version, tokens, accepted, verify_steps, batches, scheduler_ns, drops, ring_full))


def slot_ready(s: SlotReady) -> bytes:
    return _frame(SLOT, _SLOT.pack(s.slot, s.kind == "prefill", s.version, s.reqs, s.nd, s.rows, s.width,
                                   DTYPE_CODES[s.dtype], s.id_size, s.accept_size, s.seq_size))


Message = Reg | Fin | Tick | SlotReady


def _decode(kind: int, body: bytes) -> Message:
    if kind == REG:
        tag, nr, nd = _REG.unpack_from(body)
        at = _REG.size
        return Reg(tag, body[at:at + nr].decode(errors="replace"), body[at + nr:at + nr + nd].decode(errors="replace"))
    if kind == FIN:
        return Fin(*_FIN.unpack(body))
    if kind == TICK:
        return Tick(*_TICK.unpack(body))
    if kind == SLOT:
        slot, prefill, version, reqs, nd, rows, width, dt, ids, acc, seq = _SLOT.unpack(body)
        return SlotReady(slot, "prefill" if prefill else "decode", version, reqs, nd, rows, width, DTYPES[dt],
                         ids, acc, seq)
    raise ValueError(f"unknown capture message kind {kind}")


class Decoder:
    """Splits a byte stream back into messages (a read may end inside a frame)."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[Message]:
        self._buf += data
        out: list[Message] = []
        at = 0
        while len(self._buf) - at >= _HEAD.size:
            length, kind = _HEAD.unpack_from(self._buf, at)
            end = at + _HEAD.size + length
            if end > len(self._buf):
                break
            out.append(_decode(kind, bytes(self._buf[at + _HEAD.size:end])))
            at = end
        del self._buf[:at]
        return out
