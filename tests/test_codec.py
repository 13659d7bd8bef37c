import struct

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from tests.helpers import make_batch
from tide_sglang.capture import CaptureBatch
from tide_sglang.stream.codec import _PREFIX, CodecError, EntryMeta, _checksum, decode, encode


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
    domain=st.one_of(st.none(), st.text(max_size=20)),
    seed=st.integers(0, 1000),
)
def test_round_trip(n, hidden, k, requests, dtype, version, domain, seed):
    b = make_batch(n, hidden, k, requests, seed, dtype, version).model_copy(update={"domain": domain})
    d = decode(_bytes(encode(b)))
    assert d.rids == b.rids and d.aux_layers == k and d.draft_version == version and d.domain == domain
    assert d.hidden.dtype == dtype and d.hidden.shape == (n, k * hidden)
    assert torch.equal(d.hidden.view(torch.uint8), b.hidden.view(torch.uint8))  # bit-exact, NaNs included
    for name in ("req_index", "positions", "token_ids"):
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
    fields[b"h"] = _PREFIX.pack(b"TIDE", 1, _checksum(raw, fields[b"i"], fields[b"x"]), len(raw)) + raw
    with pytest.raises(CodecError, match=r"hidden section is 64 bytes, expected 72 for \[4, 9\]"):
        decode(fields)


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
