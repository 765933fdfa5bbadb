"""Exact codecs: ``raw`` (the bytes as they are) and ``lossless`` (byte planes + zstd).

``lossless``: each element is split into its bytes; byte ``i`` of every element forms plane ``i``
(bf16/fp16: 2 planes, fp32: 4). The high byte carries the sign and most of the exponent, whose
entropy is ~3 bits on real KV, so it compresses; the low bytes are mantissa, close to random, so a
plane that does not shrink by at least 1% is stored as it is (per-plane flag) and costs nothing to
decode. Within a plane, all K bytes of the extent come before all V bytes, so each zstd block sees one
tensor's statistics (keys and values have different exponent ranges). Bit-exact for every bit pattern
(NaN payloads, ±Inf, -0, subnormals): it only moves bytes.
"""

from __future__ import annotations

import numpy as np

from kvd.codecs.framing import (
    CODEC_IDS,
    STORED,
    THREADED_MIN_BYTES,
    Buffer,
    Codec,
    PlaneCompressor,
    Shape,
    check_extent,
    frame,
    unframe,
)
from kvd.core.dtypes import DTYPE_BYTES


class RawCodec(Codec):
    name = "raw"

    def encode(self, raw: Buffer, *, dtype: str, shape: Shape) -> bytes:
        view = check_extent(raw, dtype, shape)
        return frame(CODEC_IDS["raw"], dtype, shape, [(STORED, view, view.nbytes)])

    def decode_into(self, payload: Buffer, out: Buffer) -> None:
        info = self._info(payload)
        ((_, stored),) = unframe(payload, [info.raw_nbytes])
        memoryview(out).cast("B")[:] = stored


class LosslessCodec(Codec):
    """Byte planes + zstd (see the module docstring). Plane ``i`` holds byte ``i`` of every element,
    least significant first, K part then V part: plane[i] = [byte i of all K] + [byte i of all V]."""

    name = "lossless"

    def __init__(self, zstd: PlaneCompressor) -> None:
        self._zstd = zstd

    @staticmethod
    def _byte_view(buf: Buffer, shape: Shape, itemsize: int) -> np.ndarray:
        """``[2 (K, V), num_segments, tokens × head_dim, itemsize]`` view of an extent's bytes."""
        s, t, d = shape
        arr = np.frombuffer(buf, dtype=np.uint8).reshape(s, 2, t * d, itemsize)
        return arr.transpose(1, 0, 2, 3)

    def encode(self, raw: Buffer, *, dtype: str, shape: Shape) -> bytes:
        view = check_extent(raw, dtype, shape)
        itemsize = DTYPE_BYTES[dtype]
        by = self._byte_view(view, shape, itemsize)
        threaded = view.nbytes >= THREADED_MIN_BYTES
        planes = []
        for i in range(itemsize):
            plane = np.ascontiguousarray(by[..., i]).reshape(-1)  # strided gather: K bytes then V bytes
            mode, data = self._zstd.plane(plane.data, threaded=threaded)
            planes.append((mode, data, plane.nbytes))
        return frame(CODEC_IDS["lossless"], dtype, shape, planes)

    def decode_into(self, payload: Buffer, out: Buffer) -> None:
        info = self._info(payload)
        itemsize = DTYPE_BYTES[info.dtype]
        n = info.raw_nbytes // itemsize
        planes = unframe(payload, [n] * itemsize)
        by = self._byte_view(memoryview(out).cast("B"), info.shape, itemsize)
        s, t, d = info.shape
        for i, (mode, stored) in enumerate(planes):
            plane = np.frombuffer(self._zstd.unplane(mode, stored, n), dtype=np.uint8)
            by[..., i] = plane.reshape(2, s, t * d)
