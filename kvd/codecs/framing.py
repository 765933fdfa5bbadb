"""The codec payload format, shared by every codec: a header, a plane table and the planes' bytes.

An extent is a concatenation of segments; each segment is ``K[T, D]`` then ``V[T, D]``, row-major, in
one dtype (``kvd.core.dtypes``). Callers pass ``shape = (num_segments, T, D)`` so a codec knows where
K and V are. Codecs split an extent into *planes* (byte planes, scales, quantized values) and store each
one zstd-compressed or as it is (``PlaneCompressor``).

Payload format (little-endian), self-describing so that ``Codecs.decode_into`` needs nothing else::

    header  magic b"KVDC" | version u8 | codec_id u8 | dtype_id u8 | num_planes u8
            | num_segments u32 | tokens u32 | head_dim u32 | raw_nbytes u64
    planes  num_planes × (mode u8 [0 stored, 1 zstd] | stored_nbytes u64 | plane_nbytes u64)
    data    the planes' stored bytes, in order
"""

from __future__ import annotations

import os
import struct
import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import zstandard

from kvd.core.dtypes import DTYPE_BYTES, DTYPE_IDS, DTYPE_NAMES
from kvd.core.errors import CorruptData, InvalidRequest, StorageFormatError

Buffer = bytes | bytearray | memoryview
Shape = tuple[int, int, int]  # (num_segments, tokens, head_dim)

PAYLOAD_MAGIC = b"KVDC"
PAYLOAD_VERSION = 1
_HEAD = struct.Struct("<4sBBBBIIIQ")
_PLANE = struct.Struct("<BQQ")
STORED, ZSTD = 0, 1

CODEC_IDS: dict[str, int] = {"raw": 0, "lossless": 1, "fp8": 2, "int8": 3}
CODEC_NAMES = {v: k for k, v in CODEC_IDS.items()}

# A compressed plane is kept only if it is below this share of its raw size: a 1% gain is not worth
# a decode pass. Whether to try is decided on a sample first, so random mantissa planes cost ~nothing.
KEEP_IF_BELOW = 0.99
PROBE_BYTES = 64 << 10
# Extents at least this large are compressed with zstd's worker threads (codec.threads = 0: one per core).
THREADED_MIN_BYTES = 4 << 20


@dataclass(slots=True, frozen=True)
class PayloadInfo:
    """What a payload's header says: enough to size the output and pick the decoder."""

    codec: str
    dtype: str
    shape: Shape
    raw_nbytes: int


def raw_nbytes(dtype: str, shape: Shape) -> int:
    """Bytes of an extent of ``shape`` segments: ``num_segments × 2 × tokens × head_dim × itemsize``."""
    s, t, d = shape
    return s * 2 * t * d * DTYPE_BYTES[dtype]


def check_extent(raw: Buffer, dtype: str, shape: Shape) -> memoryview:
    if dtype not in DTYPE_BYTES:
        raise InvalidRequest(f"dtype {dtype!r} is not supported by the codecs; use one of {sorted(DTYPE_BYTES)}")
    if len(shape) != 3 or any(not isinstance(x, int) or x < 0 or x >= 1 << 32 for x in shape):
        raise InvalidRequest(f"shape {shape!r} must be (num_segments, tokens, head_dim), each 0 ≤ n < 2**32")
    view = memoryview(raw).cast("B")
    if view.nbytes != raw_nbytes(dtype, shape):
        raise InvalidRequest(
            f"extent of {view.nbytes} bytes does not match shape {shape} of {dtype} "
            f"(expected {raw_nbytes(dtype, shape)} = segments × 2 × tokens × head_dim × itemsize)"
        )
    return view


# ---- payload framing -----------------------------------------------------------------------------


def payload_info(payload: Buffer) -> PayloadInfo:
    """Parse a payload's header. Raises ``CorruptData`` (not ours) or ``StorageFormatError`` (newer)."""
    view = memoryview(payload).cast("B")
    if view.nbytes < _HEAD.size:
        raise CorruptData(f"payload of {view.nbytes} bytes is shorter than the {_HEAD.size}-byte codec header")
    magic, version, codec_id, dtype_id, _, s, t, d, nraw = _HEAD.unpack_from(view)
    if magic != PAYLOAD_MAGIC:
        raise CorruptData(f"payload starts with {bytes(magic)!r}, not the codec magic {PAYLOAD_MAGIC!r}")
    if version != PAYLOAD_VERSION:
        raise StorageFormatError(f"payload codec format version {version}; this kvd reads version "
                                 f"{PAYLOAD_VERSION}; upgrade kvd or clear the SSD tier")
    if codec_id not in CODEC_NAMES or dtype_id not in DTYPE_NAMES:
        raise CorruptData(f"payload names unknown codec id {codec_id} or dtype id {dtype_id}")
    info = PayloadInfo(CODEC_NAMES[codec_id], DTYPE_NAMES[dtype_id], (s, t, d), nraw)
    if nraw != raw_nbytes(info.dtype, info.shape):
        raise CorruptData(f"payload raw size {nraw} does not match its shape {info.shape} of {info.dtype}")
    return info


def frame(codec_id: int, dtype: str, shape: Shape, planes: list[tuple[int, Buffer, int]]) -> bytes:
    """Header + plane table + plane bytes. ``planes``: (mode, stored bytes, plane length)."""
    head = _HEAD.pack(PAYLOAD_MAGIC, PAYLOAD_VERSION, codec_id, DTYPE_IDS[dtype], len(planes), *shape,
                      raw_nbytes(dtype, shape))
    table = b"".join(_PLANE.pack(mode, memoryview(data).nbytes, n) for mode, data, n in planes)
    return b"".join([head, table, *(data for _, data, _ in planes)])


def unframe(payload: Buffer, expect_planes: list[int]) -> list[tuple[int, memoryview]]:
    """``[(mode, stored bytes)]`` per plane, checking lengths against ``expect_planes``."""
    view = memoryview(payload).cast("B")
    num_planes = view[7]
    if num_planes != len(expect_planes):
        raise CorruptData(f"payload has {num_planes} planes, its codec and dtype need {len(expect_planes)}")
    pos = _HEAD.size + num_planes * _PLANE.size
    if view.nbytes < pos:
        raise CorruptData(f"payload of {view.nbytes} bytes is shorter than its {pos}-byte header and plane table")
    out = []
    for i, want in enumerate(expect_planes):
        mode, stored, n = _PLANE.unpack_from(view, _HEAD.size + i * _PLANE.size)
        if n != want or mode not in (STORED, ZSTD) or (mode == STORED and stored != n):
            raise CorruptData(f"plane {i}: mode {mode}, {stored} stored bytes for {n}; expected {want} bytes")
        out.append((mode, view[pos : pos + stored]))
        pos += stored
    if pos != view.nbytes:
        raise CorruptData(f"payload is {view.nbytes} bytes, its plane table accounts for {pos}")
    return out


class PlaneCompressor:
    """Per-thread zstd contexts (zstandard objects are not safe to share between threads)."""

    def __init__(self, level: int, threads: int) -> None:
        # Exponent planes have ~3 bits of entropy: short matches cost more than Huffman-coded literals
        # and a large hash table only finds more of them. min_match 7 and a 256-entry hash table made
        # the plane ~4% smaller and compression ~2× faster on SmolLM2 KV (benchmarks/ssd_tier.py).
        self._params = {"min_match": 7, "hash_log": 8} if level > 0 else {}
        self.level = level
        self.threads = threads or (os.cpu_count() or 1)
        self._local = threading.local()

    def _compressor(self, threaded: bool) -> zstandard.ZstdCompressor:
        name = "mt" if threaded else "st"
        cctx = getattr(self._local, name, None)
        if cctx is None:
            params = zstandard.ZstdCompressionParameters.from_level(
                self.level, threads=self.threads if threaded else 0, **self._params)
            cctx = zstandard.ZstdCompressor(compression_params=params)
            setattr(self._local, name, cctx)
        return cctx

    def plane(self, data: Buffer, *, threaded: bool) -> tuple[int, Buffer]:
        """``(mode, stored bytes)``: zstd if it saves ≥ 1%, else the plane as it is."""
        data = memoryview(data)
        n = data.nbytes
        if n == 0:
            return STORED, data
        data = data.cast("B")  # flat bytes, whatever the array's shape
        cctx = self._compressor(threaded)
        if n > 2 * PROBE_BYTES:
            # Sample the start of both halves: a plane holds K's bytes, then V's.
            half = PROBE_BYTES // 2
            probe = b"".join([data[:half], data[n // 2 : n // 2 + half]])
            if len(self._compressor(False).compress(probe)) >= KEEP_IF_BELOW * PROBE_BYTES:
                return STORED, data
        packed = cctx.compress(data)
        if len(packed) >= KEEP_IF_BELOW * n:
            return STORED, data
        return ZSTD, packed

    def unplane(self, mode: int, stored: memoryview, n: int) -> Buffer:
        if mode == STORED:
            return stored
        dctx = getattr(self._local, "d", None)
        if dctx is None:
            dctx = self._local.d = zstandard.ZstdDecompressor()
        try:
            out = dctx.decompress(stored, max_output_size=n)
        except zstandard.ZstdError as e:
            raise CorruptData(f"zstd plane does not decode: {e}") from None
        if len(out) != n:
            raise CorruptData(f"zstd plane decoded to {len(out)} bytes, expected {n}")
        return out


class Codec(ABC):
    """Encode an extent for a colder tier and decode it back. Stateless; safe from many threads."""

    name: ClassVar[str]
    is_lossy: ClassVar[bool] = False

    @abstractmethod
    def encode(self, raw: Buffer, *, dtype: str, shape: Shape) -> bytes:
        """A self-describing payload for ``raw`` (an extent of ``shape`` in ``dtype``).

        Raises ``InvalidRequest`` if ``raw``'s length does not match ``shape`` × ``dtype``.
        """

    @abstractmethod
    def decode_into(self, payload: Buffer, out: Buffer) -> None:
        """Write the extent into ``out`` (writable, exactly ``raw_nbytes`` long). ``CorruptData`` on a
        payload that does not parse or decode."""

    def decode(self, payload: Buffer, *, dtype: str, shape: Shape) -> bytearray:
        """The extent's bytes (lossy codecs: the dequantized values). ``CorruptData`` if the payload's
        header disagrees with ``dtype``/``shape`` or does not decode."""
        info = payload_info(payload)
        if info.dtype != dtype or info.shape != tuple(shape):
            raise CorruptData(f"payload holds {info.shape} of {info.dtype}, caller expected {tuple(shape)} of {dtype}")
        out = bytearray(info.raw_nbytes)
        self.decode_into(payload, out)
        return out

    def _info(self, payload: Buffer, *also: str) -> PayloadInfo:
        info = payload_info(payload)
        if info.codec != self.name and info.codec not in also:
            raise CorruptData(f"payload was encoded with {info.codec!r}, not {self.name!r}")
        return info
