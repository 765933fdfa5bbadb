"""The record format of the record tiers (SSD now, the remote store later): keys and checked records.

A record is a checked header in front of one codec payload (``kvd.codecs``). Layout (little-endian)::

    magic b"KVDS" | format u16 | codec_id u8 | dtype_id u8 | num_segments u32 | tokens u32
    | head_dim u32 | raw_nbytes u64 | raw_xxh u64 | payload_nbytes u64 | payload_xxh u64
    | created_s f64 | key_len u16 | fingerprint_len u16 | key | fingerprint (ascii) | header_xxh u64
    | payload

The fingerprint field is ``<fingerprint>/<layout>``: the extent plan's ``layout`` tag (which heads it
holds; ``kvd.core.extents.ExtentPlan.layout``), so a record of another head map under the same key (a
daemon that registered the model with another map) is told apart; records written before it, and by
callers that give no layout, carry the fingerprint alone (``ExtentHeader.layout`` is then empty).

``raw_xxh`` is xxh3-64 of the bytes a decode returns (for lossy codecs: the dequantized bytes),
``payload_xxh`` of the payload, ``header_xxh`` of everything before it. The key is repeated inside the
record so a value found under another key (a damaged B-tree page, a mixed-up remote value) is caught.

Keys name the extent completely (``ExtentName``: namespace, fingerprint, hash, head class, kind,
position, computed_under), so a tier's records can be put back into the store's index from their
keys alone. The store never builds a key; tiers do, here. Keys written by kvd before the
``computed_under`` field existed (8 fields) do not parse: such records are dropped at start, because
whether their KV was exact is unknown.

Verification order on a read: header checksum → payload checksum (before decoding anything) →
decoded bytes against ``raw_xxh``. Any mismatch raises ``CorruptData``; nothing is returned.
"""

from __future__ import annotations

import struct
import time
from dataclasses import dataclass

import xxhash

from kvd.codecs import CODEC_IDS, CODEC_NAMES, Buffer, Codecs, Shape, payload_info
from kvd.core.dtypes import DTYPE_IDS, DTYPE_NAMES
from kvd.core.errors import CorruptData, InvalidRequest, StorageFormatError
from kvd.tiers.base import ExtentName

RECORD_FORMAT = 1
RECORD_HEAD = struct.Struct("<4sHBBIIIQQQQdHH")
RECORD_MAGIC = b"KVDS"
_XXH = struct.Struct("<Q")
_SEP = "\x1f"  # unit separator: never in a namespace, fingerprint, hash or tag
MAX_KEY_BYTES = 511  # LMDB's default key limit; every valid name fits in far fewer


# ---- keys ----------------------------------------------------------------------------------------


def name_key(name: ExtentName) -> bytes:
    """The record key of an extent: its name's fields joined by a separator."""
    key = _SEP.join([name.namespace, name.fingerprint, name.hash, name.head_class, name.kind,
                     str(name.start_token), str(name.end_token), str(name.num_tokens),
                     name.computed_under]).encode()
    if len(key) > MAX_KEY_BYTES:
        raise InvalidRequest(f"extent name {name} makes a {len(key)}-byte key; at most {MAX_KEY_BYTES}")
    return key


def parse_key(key: bytes) -> ExtentName | None:
    """The name a key encodes; ``None`` for a key that is not one (another format, damage)."""
    parts = key.decode(errors="replace").split(_SEP)
    if len(parts) != 9:
        return None
    ns, fp, h, cls, kind, start, end, n, tag = parts
    try:
        return ExtentName(ns, fp, h, cls, kind, int(start), int(end), int(n), tag)
    except ValueError:
        return None


# ---- headers -------------------------------------------------------------------------------------


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

    @property
    def layout(self) -> str:
        """The layout tag the record was written with (``""``: none given, or written before it existed)."""
        return self.fingerprint.partition("/")[2]


def other_layout(found: str, want: str, shared: bool) -> bool:
    """Whether a record of layout tag ``found`` is not a record of an extent laid out as ``want``: another
    tag, or none (written before tags) in a shared tier, where another daemon's head map may have made it."""
    return found != want and (bool(found) or shared)


def pack_header(h: ExtentHeader) -> bytes:
    fp = h.fingerprint.encode("ascii")
    body = RECORD_HEAD.pack(RECORD_MAGIC, RECORD_FORMAT, CODEC_IDS[h.codec], DTYPE_IDS[h.dtype], *h.shape,
                            h.raw_nbytes, h.raw_xxh, h.payload_nbytes, h.payload_xxh, h.created_s, len(h.key),
                            len(fp)) + h.key + fp
    return body + _XXH.pack(xxhash.xxh3_64_intdigest(body))


def unpack_header(value: Buffer, key: bytes) -> tuple[ExtentHeader, int]:
    """``(header, payload offset)``; ``CorruptData`` if the header fails its checksum or disagrees."""
    value = memoryview(value).cast("B")
    if value.nbytes < RECORD_HEAD.size + _XXH.size:
        raise CorruptData(f"record {key.hex()} is {value.nbytes} bytes, shorter than a header")
    (magic, fmt, codec_id, dtype_id, s, t, d, nraw, raw_xxh, npay, pay_xxh, created, klen,
     fplen) = RECORD_HEAD.unpack_from(value)
    end = RECORD_HEAD.size + klen + fplen
    if magic != RECORD_MAGIC or end + _XXH.size > value.nbytes:
        raise CorruptData(f"record {key.hex()}: bad magic or header length")
    (want,) = _XXH.unpack_from(value, end)
    if xxhash.xxh3_64_intdigest(value[:end]) != want:
        raise CorruptData(f"record {key.hex()}: header checksum mismatch")
    if fmt != RECORD_FORMAT:
        raise StorageFormatError(f"record {key.hex()} has format {fmt}; this kvd reads {RECORD_FORMAT}")
    stored_key = bytes(value[RECORD_HEAD.size : RECORD_HEAD.size + klen])
    if stored_key != key or codec_id not in CODEC_NAMES or dtype_id not in DTYPE_NAMES:
        raise CorruptData(f"record {key.hex()}: header names key {stored_key.hex()} or unknown codec/dtype")
    fp = bytes(value[RECORD_HEAD.size + klen : end]).decode("ascii", "replace")
    offset = end + _XXH.size
    if value.nbytes - offset != npay:
        raise CorruptData(f"record {key.hex()}: payload is {value.nbytes - offset} bytes, header says {npay}")
    header = ExtentHeader(key, fp, CODEC_NAMES[codec_id], DTYPE_NAMES[dtype_id], (s, t, d), nraw, raw_xxh,
                          npay, pay_xxh, created)
    return header, offset


def check_record(value: Buffer, key: bytes) -> ExtentHeader:
    """The header of a whole record, with its header and payload checksums verified."""
    header, offset = unpack_header(value, key)
    if xxhash.xxh3_64_intdigest(memoryview(value).cast("B")[offset:]) != header.payload_xxh:
        raise CorruptData(f"record {key.hex()}: payload checksum mismatch")
    return header


# ---- building and decoding -----------------------------------------------------------------------


@dataclass(slots=True, frozen=True)
class Record:
    """A record built for one extent, and what a later decode of it gives back."""

    data: bytes
    codec: str  # the codec actually used (a lossy one falls back to lossless on NaN/Inf)
    raw_xxh: int  # xxh3-64 of the bytes a decode returns (exact bytes, or the dequantized ones)


def encode_record(codecs: Codecs, name: ExtentName, raw: Buffer, *, dtype: str, shape: Shape, codec: str,
                  raw_xxh: int | None = None, created_s: float | None = None, layout: str = "") -> Record:
    """Build the record of ``raw`` (CPU only, no I/O, any thread). ``raw_xxh``: xxh3-64 of ``raw`` when
    the caller has it already (the commit checksum); ``layout``: the extent plan's layout tag.
    ``InvalidRequest`` for a bad codec, dtype or a length that does not fit ``shape``."""
    key = name_key(name)
    c = codecs.get(codec)
    payload = c.encode(raw, dtype=dtype, shape=shape)
    used = payload_info(payload).codec
    if used in ("raw", "lossless"):
        digest = raw_xxh if raw_xxh is not None else xxhash.xxh3_64_intdigest(raw)
    else:  # the bytes a read returns are the dequantized ones
        digest = xxhash.xxh3_64_intdigest(c.decode(payload, dtype=dtype, shape=shape))
    fp = f"{name.fingerprint}/{layout}" if layout else name.fingerprint
    header = ExtentHeader(key, fp, used, dtype, tuple(shape), memoryview(raw).cast("B").nbytes, digest, len(payload),
                          xxhash.xxh3_64_intdigest(payload), time.time() if created_s is None else created_s)
    return Record(b"".join([pack_header(header), payload]), used, digest)


def decode_record_into(codecs: Codecs, value: Buffer, key: bytes, out: Buffer) -> ExtentHeader:
    """Decode a record into ``out`` (exactly ``raw_nbytes``; e.g. an arena slot run), verifying all
    three checksums. On ``CorruptData`` ``out`` holds garbage and must not be served."""
    header, offset = unpack_header(value, key)
    payload = memoryview(value).cast("B")[offset:]
    if xxhash.xxh3_64_intdigest(payload) != header.payload_xxh:
        raise CorruptData(f"record {key.hex()}: payload checksum mismatch")
    out_view = memoryview(out).cast("B")
    if out_view.nbytes != header.raw_nbytes:
        raise InvalidRequest(f"output buffer of {out_view.nbytes} bytes for an extent of {header.raw_nbytes}")
    codecs.decode_into(payload, out_view)
    if xxhash.xxh3_64_intdigest(out_view) != header.raw_xxh:
        raise CorruptData(f"record {key.hex()}: decoded bytes fail their checksum")
    return header
