"""The SSD tier's record format: a checked header in front of one codec payload.

Layout (little-endian)::

    magic b"KVDS" | format u16 | codec_id u8 | dtype_id u8 | num_segments u32 | tokens u32
    | head_dim u32 | raw_nbytes u64 | raw_xxh u64 | payload_nbytes u64 | payload_xxh u64
    | created_s f64 | key_len u16 | fingerprint_len u16 | key | fingerprint (ascii) | header_xxh u64
    | payload

``raw_xxh`` is xxh3-64 of the bytes a read returns (for lossy codecs: the dequantized bytes),
``payload_xxh`` of the payload, ``header_xxh`` of everything before it. The key is repeated inside the
record so a value found under another key (a damaged B-tree page) is caught too.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import xxhash

from kvd.codecs import CODEC_IDS, CODEC_NAMES, DTYPE_IDS, DTYPE_NAMES, Buffer, Shape
from kvd.core.errors import CorruptData, StorageFormatError

SSD_FORMAT = 1
RECORD_HEAD = struct.Struct("<4sHBBIIIQQQQdHH")
RECORD_MAGIC = b"KVDS"
_XXH = struct.Struct("<Q")


@dataclass(slots=True, frozen=True)
class ExtentHeader:
    """A record's header: what the store needs to index it without reading the payload."""

    key: bytes
    fingerprint: str
    codec: str
    dtype: str
    shape: Shape
    raw_nbytes: int
    raw_xxh: int
    payload_nbytes: int
    payload_xxh: int
    created_s: float


def pack_header(h: ExtentHeader) -> bytes:
    fp = h.fingerprint.encode("ascii")
    body = RECORD_HEAD.pack(RECORD_MAGIC, SSD_FORMAT, CODEC_IDS[h.codec], DTYPE_IDS[h.dtype], *h.shape, h.raw_nbytes,
                     h.raw_xxh, h.payload_nbytes, h.payload_xxh, h.created_s, len(h.key), len(fp)) + h.key + fp
    return body + _XXH.pack(xxhash.xxh3_64_intdigest(body))


def unpack_header(value: memoryview, key: bytes) -> tuple[ExtentHeader, int]:
    """``(header, payload offset)``; ``CorruptData`` if the header fails its checksum or disagrees."""
    if value.nbytes < RECORD_HEAD.size + _XXH.size:
        raise CorruptData(f"SSD record {key.hex()} is {value.nbytes} bytes, shorter than a header")
    (magic, fmt, codec_id, dtype_id, s, t, d, nraw, raw_xxh, npay, pay_xxh, created, klen,
     fplen) = RECORD_HEAD.unpack_from(value)
    end = RECORD_HEAD.size + klen + fplen
    if magic != RECORD_MAGIC or end + _XXH.size > value.nbytes:
        raise CorruptData(f"SSD record {key.hex()}: bad magic or header length")
    (want,) = _XXH.unpack_from(value, end)
    if xxhash.xxh3_64_intdigest(value[:end]) != want:
        raise CorruptData(f"SSD record {key.hex()}: header checksum mismatch")
    if fmt != SSD_FORMAT:
        raise StorageFormatError(f"SSD record {key.hex()} has format {fmt}; this kvd reads {SSD_FORMAT}")
    stored_key = bytes(value[RECORD_HEAD.size : RECORD_HEAD.size + klen])
    if stored_key != key or codec_id not in CODEC_NAMES or dtype_id not in DTYPE_NAMES:
        raise CorruptData(f"SSD record {key.hex()}: header names key {stored_key.hex()} or unknown codec/dtype")
    fp = bytes(value[RECORD_HEAD.size + klen : end]).decode("ascii", "replace")
    offset = end + _XXH.size
    if value.nbytes - offset != npay:
        raise CorruptData(f"SSD record {key.hex()}: payload is {value.nbytes - offset} bytes, header says {npay}")
    header = ExtentHeader(key, fp, CODEC_NAMES[codec_id], DTYPE_NAMES[dtype_id], (s, t, d), nraw, raw_xxh,
                          npay, pay_xxh, created)
    return header, offset


def record_header(record: Buffer, key: bytes) -> ExtentHeader:
    """The header of a record built by ``SsdTier.encode`` (e.g. for per-codec metrics: ``codec``,
    ``raw_nbytes`` against ``len(record)``). ``CorruptData`` if it is not one, or not for ``key``."""
    return unpack_header(memoryview(record).cast("B"), key)[0]
