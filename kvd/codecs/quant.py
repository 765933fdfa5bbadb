"""Lossy codecs ``fp8`` (e4m3) and ``int8``, with KIVI-style scales: keys per channel, values per token.

``s_k[s, d] = max_t |K[s, t, d]| / QMAX``, ``s_v[s, t] = max_d |V[s, t, d]| / QMAX`` in fp32, a zero scale
becomes 1.0; ``q = x_f32 / s`` (IEEE division), fp8: clamp to ±448 then cast to ``torch.float8_e4m3fn``
(round to nearest even); int8: ``torch.round`` (half to even) then clamp to ±127. Decode:
``(q.float() * s).to(dtype)``, for fp32 KV clamped to ±fp32 max first (``127 × (max / 127)`` can round
to Inf; the value it stands for is finite). The quantized
bytes then go through the same probe-and-zstd plane step as ``lossless``. An extent holding NaN or ±Inf
cannot be scaled, so it is encoded ``lossless`` instead; the payload says which codec it used, and
callers learn it from the payload (``payload_info``), never assume it.
"""

from __future__ import annotations

import warnings

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
from kvd.codecs.lossless import LosslessCodec
from kvd.core.dtypes import DTYPE_BYTES
from kvd.core.errors import InvalidRequest

_F32_MAX = float(np.finfo(np.float32).max)


class QuantCodec(Codec):
    """fp8 (e4m3) or int8 with per-channel key scales and per-token value scales.

    Payload planes: [0] scales, fp32: ``s_k [num_segments, head_dim]`` then ``s_v [num_segments,
    tokens]``; [1] quantized elements in the extent's own order (``[num_segments, 2, tokens, head_dim]``),
    zstd'd if that helps.
    """

    is_lossy = True

    def __init__(self, name: str, zstd: PlaneCompressor, fallback: LosslessCodec) -> None:
        import torch  # lossy codecs need torch (fp8 dtype); raw and lossless do not

        self._torch = torch
        self.name = name  # type: ignore[misc]  # one class serves both names
        self.qmax = 448.0 if name == "fp8" else 127.0
        self.qdtype = torch.float8_e4m3fn if name == "fp8" else torch.int8
        self._zstd = zstd
        self._fallback = fallback
        # fp8 bit pattern (0..255) -> its fp32 value
        self._fp8_table = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn).float().numpy()

    def _tensor(self, buf: Buffer, dtype: str, shape: Shape):
        torch = self._torch
        s, t, d = shape
        with warnings.catch_warnings():  # read-only buffers: we never write through this tensor
            warnings.simplefilter("ignore", UserWarning)
            x = torch.frombuffer(buf, dtype=getattr(torch, dtype))
        return x.view(s, 2, t, d)

    def encode(self, raw: Buffer, *, dtype: str, shape: Shape) -> bytes:
        view = check_extent(raw, dtype, shape)
        if DTYPE_BYTES[dtype] < 2:
            raise InvalidRequest(f"codec {self.name!r} quantizes 16- and 32-bit KV; {dtype} is already 8-bit, "
                                 "use 'lossless'")
        if view.nbytes == 0:  # no elements, yet s × (d + t) scales (0 tokens: s × d): unit ones
            ones = np.ones(shape[0] * (shape[1] + shape[2]), dtype="<f4")
            return frame(CODEC_IDS[self.name], dtype, shape, [(STORED, ones.data, ones.nbytes), (STORED, b"", 0)])
        torch = self._torch
        x = self._tensor(view, dtype, shape).float()
        k, v = x[:, 0], x[:, 1]  # [S, T, D] each
        s_k = k.abs().amax(dim=1) / self.qmax  # [S, D]: per channel, over tokens
        s_v = v.abs().amax(dim=2) / self.qmax  # [S, T]: per token, over channels
        if not (torch.isfinite(s_k).all() and torch.isfinite(s_v).all()):
            # NaN/Inf cannot be scaled (amax propagates them): keep the extent exact instead.
            return self._fallback.encode(view, dtype=dtype, shape=shape)
        s_k = torch.where(s_k == 0, 1.0, s_k)
        s_v = torch.where(s_v == 0, 1.0, s_v)
        q = torch.stack([self._quantize(k / s_k[:, None, :]), self._quantize(v / s_v[:, :, None])], dim=1)
        scales = torch.cat([s_k.reshape(-1), s_v.reshape(-1)]).numpy()
        qbytes = q.view(torch.uint8).numpy().reshape(-1)
        mode, data = self._zstd.plane(qbytes.data, threaded=qbytes.nbytes >= THREADED_MIN_BYTES)
        return frame(CODEC_IDS[self.name], dtype, shape,
                      [(STORED, scales.data, scales.nbytes), (mode, data, qbytes.nbytes)])

    def _quantize(self, y):
        if self.qdtype is self._torch.int8:
            return self._torch.round(y).clamp(-self.qmax, self.qmax).to(self._torch.int8)
        return y.clamp(-self.qmax, self.qmax).to(self.qdtype)

    def decode_into(self, payload: Buffer, out: Buffer) -> None:
        torch = self._torch
        info = self._info(payload, "lossless")
        if info.codec == "lossless":  # an extent with NaN/Inf, kept exact at encode
            self._fallback.decode_into(payload, out)
            return
        s, t, d = info.shape
        n = s * 2 * t * d
        (_, scales), (mode, stored) = unframe(payload, [4 * s * (d + t), n])
        if n == 0:
            return
        sc = np.frombuffer(scales, dtype="<f4")
        s_k = torch.from_numpy(sc[: s * d].copy()).view(s, 1, d)
        s_v = torch.from_numpy(sc[s * d :].copy()).view(s, t, 1)
        qraw = np.frombuffer(self._zstd.unplane(mode, stored, n), dtype=np.uint8)
        if self.name == "fp8":
            # q.float() through a 256-entry table: the same fp32 values, bit for bit (checked in the
            # tests), about 2x faster than torch's fp8 -> fp32 cast on the CPU.
            qf = torch.from_numpy(self._fp8_table[qraw]).view(s, 2, t, d)
        else:
            qf = torch.from_numpy(qraw.view(np.int8).astype(np.float32)).view(s, 2, t, d)
        target = getattr(torch, info.dtype)
        result = torch.stack([qf[:, 0] * s_k, qf[:, 1] * s_v], dim=1)
        if target is torch.float32:  # q × s rounds past the largest float near it (int8: 127 × (max/127))
            result = result.clamp(-_F32_MAX, _F32_MAX)
        result = result.to(target)
        memoryview(out).cast("B")[:] = result.reshape(-1).view(torch.uint8).numpy().data
