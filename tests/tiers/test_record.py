"""The record format of record tiers: keys from extent names, building, verifying and decoding."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import xxhash

from kvd.codecs import Codecs, raw_nbytes
from kvd.core.errors import CorruptData, InvalidRequest
from kvd.tiers.base import ExtentName
from kvd.tiers.record import (
    check_record,
    decode_record_into,
    encode_record,
    name_key,
    parse_key,
    unpack_header,
)

CODECS = Codecs()
SHAPE = (2, 16, 8)
NAME = ExtentName("tenant-a", "f" * 32, "a" * 32, "local", "prefix", 256, 1024, 256, "hm-0123456789abcdef")


def raw(seed: int = 0) -> bytes:
    x = np.random.default_rng(seed).standard_normal(raw_nbytes("bfloat16", SHAPE) // 2).astype(np.float32)
    return (x.view(np.uint32) >> 16).astype(np.uint16).tobytes()


def test_key_names_the_extent_completely():
    assert parse_key(name_key(NAME)) == NAME
    assert parse_key(b"\x1f".join([b"x"] * 8)) is None  # an 8-field key of the format before computed_under
    assert parse_key(b"garbage") is None


def test_key_length_is_bounded():
    with pytest.raises(InvalidRequest, match="key"):
        name_key(ExtentName("n" * 600, "f", "h", "global", "prefix", 0, 1, 1, "exact"))


def test_record_reports_the_codec_actually_used():
    nan = np.full(raw_nbytes("bfloat16", SHAPE) // 2, 0x7FC0, dtype=np.uint16).tobytes()
    rec = encode_record(CODECS, NAME, nan, dtype="bfloat16", shape=SHAPE, codec="fp8")
    assert rec.codec == "lossless"  # NaN cannot be scaled: kept exact, and said so
    header = check_record(rec.data, name_key(NAME))
    assert header.codec == "lossless" and header.raw_nbytes == len(nan)


@pytest.mark.parametrize("codec", ["raw", "lossless", "fp8", "int8"])
def test_decode_verifies_and_returns_what_the_checksum_names(codec):
    data = raw(1)
    rec = encode_record(CODECS, NAME, data, dtype="bfloat16", shape=SHAPE, codec=codec)
    out = bytearray(len(data))
    header = decode_record_into(CODECS, rec.data, name_key(NAME), out)
    assert header.codec == rec.codec == codec
    if codec in ("raw", "lossless"):
        assert bytes(out) == data
    assert xxhash.xxh3_64_intdigest(bytes(out)) == rec.raw_xxh == header.raw_xxh


def test_a_record_under_another_key_is_corrupt():
    rec = encode_record(CODECS, NAME, raw(), dtype="bfloat16", shape=SHAPE, codec="lossless")
    other = name_key(dataclasses.replace(NAME, hash="b" * 32))
    with pytest.raises(CorruptData, match="names key"):
        unpack_header(rec.data, other)


def test_flipped_payload_byte_is_caught_before_decoding():
    rec = encode_record(CODECS, NAME, raw(), dtype="bfloat16", shape=SHAPE, codec="lossless")
    bad = bytearray(rec.data)
    bad[-3] ^= 0x01
    with pytest.raises(CorruptData, match="payload checksum"):
        decode_record_into(CODECS, bad, name_key(NAME), bytearray(len(raw())))


def test_decoder_fault_is_caught_by_the_raw_checksum(monkeypatch):
    """A codec bug that decodes to wrong bytes must not be served: the raw checksum catches it."""
    rec = encode_record(CODECS, NAME, raw(), dtype="bfloat16", shape=SHAPE, codec="lossless")
    codecs = Codecs()

    def bad_decode(payload, out):
        memoryview(out)[:4] = b"\0\0\0\0"

    monkeypatch.setattr(codecs, "decode_into", bad_decode)
    with pytest.raises(CorruptData, match="decoded bytes"):
        decode_record_into(codecs, rec.data, name_key(NAME), bytearray(len(raw())))
