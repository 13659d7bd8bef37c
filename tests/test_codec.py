import struct

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from tests.helpers import make_batch
from tide_sglang.capture import CaptureBatch
from tide_sglang.stream.codec import _PREFIX, FORMAT_VERSION, CodecError, EntryMeta, _checksum, decode, encode


def _bytes(fields: dict) -> dict[bytes, bytes]:
    return {k: bytes(v) for k, v in fields.items()}  # what Redis hands back


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(0, 40),
    hidden=st.integers(1, 24),
    k=st.integers(1, 4),
    requests=st.integers(1, 5),
    dtype=st.sampled_from([torch.bfloat16, torch.float16, torch.float32]),
    version=st.integers(0, 2**31),
    domains=st.one_of(st.none(), st.lists(st.text(max_size=64), min_size=5, max_size=5)),
    seed=st.integers(0, 1000),
)
def test_round_trip(n, hidden, k, requests, dtype, version, domains, seed):
    b = make_batch(n, hidden, k, requests, seed, dtype, version)
    b = CaptureBatch(**{**b.__dict__, "domains": None if domains is None else domains[:requests]})
    d = decode(_bytes(encode(b)))
    assert d.rids == b.rids and d.aux_layers == k and d.draft_version == version and d.domains == b.domains
    assert d.vocab_size == b.vocab_size
    assert d.hidden.dtype == dtype and d.hidden.shape == (n, k * hidden)
    assert torch.equal(d.hidden.view(torch.uint8), b.hidden.view(torch.uint8))  # bit-exact, NaNs included
    for name in ("req_index", "positions", "token_ids", "is_prompt"):
        assert torch.equal(getattr(d, name), getattr(b, name))


def test_acceptance_round_trip():
    b = make_batch(requests=2).model_copy(update={"acceptance": [2.0, 3.5]})
    assert decode(_bytes(encode(b))).acceptance == [2.0, 3.5]


@pytest.mark.parametrize("section", [b"h", b"i", b"x"])
def test_any_flipped_byte_is_caught(section):
    fields = _bytes(encode(make_batch()))
    data = bytearray(fields[section])
    data[len(data) - 1] ^= 0x40
    fields[section] = bytes(data)
    with pytest.raises(CodecError, match=r"checksum|meta"):
        decode(fields)


@pytest.mark.parametrize("section", [b"h", b"i", b"x"])
def test_truncated_entry_rejected(section):
    fields = _bytes(encode(make_batch()))
    fields[section] = fields[section][: len(fields[section]) // 2]
    with pytest.raises(CodecError):
        decode(fields)


def test_wrong_version_and_magic():
    fields = _bytes(encode(make_batch()))
    head = bytearray(fields[b"h"])
    struct.pack_into("<H", head, 4, 99)
    with pytest.raises(CodecError, match="version 99 is not supported"):
        decode({**fields, b"h": bytes(head)})
    with pytest.raises(CodecError, match="bad magic"):
        decode({**fields, b"h": b"XXXX" + fields[b"h"][4:]})


def test_missing_or_foreign_fields():
    with pytest.raises(CodecError, match="not the TIDE fields"):
        decode({b"payload": b"hello"})


def test_shape_lie_rejected_even_with_valid_checksum():
    # A producer bug, not corruption: the header claims a width the bytes do not have, checksum recomputed.
    fields = _bytes(encode(make_batch(n=4, hidden=8, k=1)))
    meta = EntryMeta.model_validate_json(fields[b"h"][_PREFIX.size :]).model_copy(update={"width": 9})
    raw = meta.model_dump_json(exclude_none=True).encode()
    fields[b"h"] = _repack(raw, fields)
    with pytest.raises(CodecError, match=r"hidden section is 64 bytes, expected 72 for \[4, 9\]"):
        decode(fields)


def _repack(meta: bytes, fields: dict[bytes, bytes], version: int = FORMAT_VERSION) -> bytes:
    return _PREFIX.pack(b"TIDE", version, _checksum(meta, fields[b"i"], fields[b"x"]), len(meta)) + meta


def test_a_format_1_entry_is_refused_naming_both_versions():
    fields = _bytes(encode(make_batch()))
    with pytest.raises(CodecError, match="format version 1 is not supported: this reader reads format 2"):
        decode({**fields, b"h": _repack(fields[b"h"][_PREFIX.size :], fields, version=1)})


@pytest.mark.parametrize(("field", "value", "message"), [
    ("token_ids", 49152, r"token_ids must be in \[0, 49152\)"),
    ("token_ids", -1, r"token_ids must be in \[0, 49152\)"),
    ("positions", -1, r"positions must be in \[0, 2147483648\)"),
    ("req_index", 2, r"req_index must be in \[0, 2\)"),
])
def test_out_of_bounds_ids_are_refused_before_use(field, value, message):
    b = make_batch(n=4, requests=2)
    bad = getattr(b, field).clone()
    bad[1] = value
    with pytest.raises(ValidationError, match=message):
        CaptureBatch(**{**b.__dict__, field: bad})
    # the same lie written by a buggy producer, checksum intact: the decoder refuses it naming the field
    fields = _bytes(encode(b))
    ints = np.frombuffer(fields[b"i"], dtype="<i4", count=12).copy()
    ints[{"req_index": 0, "positions": 4, "token_ids": 8}[field] + 1] = value
    index = ints.tobytes() + fields[b"i"][48:]
    meta = fields[b"h"][_PREFIX.size :]
    forged = {**fields, b"i": index}
    with pytest.raises(CodecError, match=message):
        decode({**forged, b"h": _repack(meta, forged)})


def test_prompt_flags_must_be_bool_and_domains_one_per_request():
    b = make_batch(n=4, requests=2)
    with pytest.raises(ValidationError, match="is_prompt must be a bool tensor"):
        CaptureBatch(**{**b.__dict__, "is_prompt": torch.zeros(4, dtype=torch.int64)})
    with pytest.raises(ValidationError, match="domains has 1 values for 2 requests"):
        CaptureBatch(**{**b.__dict__, "domains": ["writing"]})
    with pytest.raises(ValidationError, match="at most 64 characters"):
        CaptureBatch(**{**b.__dict__, "domains": ["x" * 65, "code"]})
    with pytest.raises(ValidationError, match="vocab_size"):
        CaptureBatch(**{**b.__dict__, "vocab_size": 0})


def test_capture_batch_rejects_inconsistent_shapes():
    b = make_batch(n=4)
    with pytest.raises(ValidationError, match="positions must be an integer tensor of shape"):
        CaptureBatch(**{**b.__dict__, "positions": torch.arange(3)})
    with pytest.raises(ValidationError, match="not a multiple of K"):
        CaptureBatch(**{**b.__dict__, "hidden": torch.zeros(4, 7), "aux_layers": 3})
    with pytest.raises(ValidationError, match="dtype"):
        CaptureBatch(**{**b.__dict__, "hidden": torch.zeros(4, 6, dtype=torch.int8), "aux_layers": 3})


def test_encode_refuses_device_tensors_it_cannot_stream():
    b = make_batch(n=2)
    meta_only = b.model_copy(update={"hidden": b.hidden.to("meta")})
    with pytest.raises(CodecError, match="on the CPU"):
        encode(meta_only)
