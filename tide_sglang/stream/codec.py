"""Stream entry codec: a small versioned header plus raw tensor bytes, guarded by one checksum.

An entry is three Redis stream fields, so the large tensor goes to the socket without being copied:
  h: b"TIDE" | u16 format version | u64 xxh3 checksum | u32 meta length | meta JSON
  i: int32 req_index[n] | int32 positions[n] | int32 token_ids[n] | uint8 is_prompt[n] (0 or 1)
  x: hidden[n, K*H] raw little-endian bytes (bf16 / fp16 / fp32)
The checksum covers meta, i and x, so any flipped bit in an entry is caught before a trainer uses it. The meta
carries the target's vocabulary size, so the decoded batch is bound-checked (token ids, positions, request
indices) by `CaptureBatch`'s validator before it is returned.
Format 1 (no vocabulary size, one domain per batch, no prompt flags) is refused with a `CodecError`.
"""

import struct
import warnings

import numpy as np
import torch
import xxhash
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tide_sglang.capture import CaptureBatch

MAGIC = b"TIDE"
FORMAT_VERSION = 2
_PREFIX = struct.Struct("<4sHQI")  # magic, version, checksum, meta length
_INDEX_DTYPE = np.dtype("<i4")
_INDEX_BYTES = 3 * _INDEX_DTYPE.itemsize + 1  # per row: three int32 and one uint8 flag

DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_DTYPE_NAMES = {v: k for k, v in DTYPES.items()}

Fields = dict[bytes, bytes | memoryview]


class CodecError(ValueError):
    """An entry that is not a valid TIDE capture record; the message says what is wrong."""


class EntryMeta(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    n: int = Field(ge=0)
    aux_layers: int = Field(ge=1, le=16)
    width: int = Field(ge=1, description="K*H")
    dtype: str
    rids: list[str]
    draft_version: int = Field(ge=0)
    vocab_size: int = Field(ge=1)
    domains: list[str] | None = None
    acceptance: list[float] | None = None


def _checksum(meta: bytes, index: bytes | memoryview, hidden: bytes | memoryview) -> int:
    h = xxhash.xxh3_64(meta)
    h.update(index)
    h.update(hidden)
    return h.intdigest()


def encode(batch: CaptureBatch) -> Fields:
    """Encode a batch into stream fields; the hidden tensor's memory is passed through, not copied."""
    hidden = batch.hidden
    if hidden.device.type != "cpu":
        raise CodecError(f"hidden states must be on the CPU to be streamed, got {hidden.device}")
    meta = EntryMeta(
        n=batch.num_tokens,
        aux_layers=batch.aux_layers,
        width=hidden.shape[1],
        dtype=_DTYPE_NAMES[hidden.dtype],
        rids=batch.rids,
        draft_version=batch.draft_version,
        vocab_size=batch.vocab_size,
        domains=batch.domains,
        acceptance=batch.acceptance,
    ).model_dump_json(exclude_none=True).encode()
    ints = np.stack(
        [t.numpy().astype(_INDEX_DTYPE, copy=False) for t in (batch.req_index, batch.positions, batch.token_ids)]
    )
    index = ints.tobytes() + batch.is_prompt.numpy().astype(np.uint8).tobytes()
    raw = memoryview(hidden.contiguous().reshape(-1).view(torch.uint8).numpy())
    prefix = _PREFIX.pack(MAGIC, FORMAT_VERSION, _checksum(meta, index, raw), len(meta))
    return {b"h": prefix + meta, b"i": index, b"x": raw}


def encoded_size(fields: Fields) -> int:
    return sum(len(v) for v in fields.values())


def decode(fields: dict[bytes, bytes], *, vocab_size: int | None = None, max_bytes: int | None = None) -> CaptureBatch:
    """Decode stream fields; raise `CodecError` naming the problem for anything malformed. `vocab_size`: the
    reader's target vocabulary, which the entry's must equal (its token ids are bounded by the entry's own);
    `max_bytes`: the largest entry accepted. Every size is checked before anything is allocated from it."""
    if set(fields) != {b"h", b"i", b"x"}:
        raise CodecError(f"entry fields {sorted(fields)} are not the TIDE fields [b'h', b'i', b'x']")
    size = sum(len(v) for v in fields.values())
    if max_bytes is not None and size > max_bytes:
        raise CodecError(f"entry is {size} bytes, over the {max_bytes}-byte limit (TIDE_STREAM_MAX_ENTRY_MIB)")
    head, index, raw = fields[b"h"], fields[b"i"], fields[b"x"]
    if len(head) < _PREFIX.size:
        raise CodecError(f"header is truncated: {len(head)} bytes, needs at least {_PREFIX.size}")
    magic, version, checksum, meta_len = _PREFIX.unpack_from(head)
    if magic != MAGIC:
        raise CodecError(f"bad magic {magic!r}: not a TIDE capture entry")
    if version != FORMAT_VERSION:
        raise CodecError(f"entry format version {version} is not supported: this reader reads format "
                         f"{FORMAT_VERSION} only (upgrade the older side so both run the same TIDE release)")
    meta_bytes = head[_PREFIX.size :]
    if len(meta_bytes) != meta_len:
        raise CodecError(f"header meta is {len(meta_bytes)} bytes, the prefix says {meta_len}")
    if _checksum(meta_bytes, index, raw) != checksum:
        raise CodecError("checksum mismatch: the entry was corrupted or truncated")
    try:
        meta = EntryMeta.model_validate_json(meta_bytes)
    except ValidationError as e:
        raise CodecError(f"header meta is invalid: {e}") from None
    if vocab_size is not None and meta.vocab_size != vocab_size:
        raise CodecError(f"entry is for a vocabulary of {meta.vocab_size} tokens, this reader's target has "
                         f"{vocab_size}: another target model wrote it")
    return _batch(meta, index, raw)


def _batch(meta: EntryMeta, index: bytes, raw: bytes) -> CaptureBatch:
    dtype = DTYPES.get(meta.dtype)
    if dtype is None:
        raise CodecError(f"dtype {meta.dtype!r} is not one of {sorted(DTYPES)}")
    if len(index) != _INDEX_BYTES * meta.n:
        raise CodecError(f"index section is {len(index)} bytes, expected {_INDEX_BYTES * meta.n} for n={meta.n}")
    expected = meta.n * meta.width * dtype.itemsize
    if len(raw) != expected:
        raise CodecError(f"hidden section is {len(raw)} bytes, expected {expected} for [{meta.n}, {meta.width}]")
    ints = torch.from_numpy(np.frombuffer(index, dtype=_INDEX_DTYPE, count=3 * meta.n).reshape(3, meta.n)
                            .astype(np.int64))
    flags = np.frombuffer(index, dtype=np.uint8, offset=3 * _INDEX_DTYPE.itemsize * meta.n)
    if meta.n and int(flags.max()) > 1:
        raise CodecError(f"is_prompt flags must be 0 or 1, got {int(flags.max())}")
    try:
        return CaptureBatch(
            rids=meta.rids,
            req_index=ints[0],
            positions=ints[1],
            token_ids=ints[2],
            is_prompt=torch.from_numpy(flags.astype(np.bool_)),
            hidden=_frombuffer(raw, dtype).view(meta.n, meta.width),
            aux_layers=meta.aux_layers,
            draft_version=meta.draft_version,
            vocab_size=meta.vocab_size,
            domains=meta.domains,
            acceptance=meta.acceptance,
        )
    except ValidationError as e:
        raise CodecError(f"entry does not form a valid capture batch: {e}") from None


def _frombuffer(raw: bytes, dtype: torch.dtype) -> torch.Tensor:
    if not raw:
        return torch.empty(0, dtype=dtype)
    # Redis hands back immutable bytes; the tensor is read-only in practice (the trainer copies it to its device).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.frombuffer(raw, dtype=dtype)
