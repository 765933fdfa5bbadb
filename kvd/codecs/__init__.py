"""Segment codecs: how an extent's bytes are encoded for the record tiers (SSD, remote).

- ``raw`` and ``lossless`` (``kvd.codecs.lossless``): exact, for every bit pattern.
- ``fp8`` and ``int8`` (``kvd.codecs.quant``): lossy. Bytes decoded from them are flagged lossy in
  every tier they reach and are never served to a reader that asked for exact KV.

The payload format is in ``kvd.codecs.framing``. Codec objects are stateless apart from per-thread zstd
contexts: one instance may be used from many threads at once. ``Codecs`` is one daemon's set of them.
"""

from __future__ import annotations

import threading

from kvd.codecs.framing import (
    CODEC_IDS,
    CODEC_NAMES,
    Buffer,
    Codec,
    PayloadInfo,
    PlaneCompressor,
    Shape,
    payload_info,
    raw_nbytes,
)
from kvd.codecs.lossless import LosslessCodec, RawCodec
from kvd.core.config import CodecSettings
from kvd.core.errors import InvalidRequest

LOSSY_CODECS = frozenset({"fp8", "int8"})


def is_lossy(codec: str) -> bool:
    return codec in LOSSY_CODECS


class Codecs:
    """The codec instances of one daemon, built from ``CodecSettings``; ``get(name)`` by name."""

    def __init__(self, settings: CodecSettings | None = None) -> None:
        settings = settings or CodecSettings()
        self.settings = settings
        zstd = PlaneCompressor(settings.zstd_level, settings.threads)
        lossless = LosslessCodec(zstd)
        self._by_name: dict[str, Codec] = {"raw": RawCodec(), "lossless": lossless}
        self._zstd, self._lossless = zstd, lossless
        self._build_lock = threading.Lock()

    def get(self, name: str) -> Codec:
        """The codec called ``name``; ``InvalidRequest`` listing the supported names."""
        codec = self._by_name.get(name)
        if codec is not None:
            return codec
        if name not in CODEC_IDS:
            raise InvalidRequest(f"unknown codec {name!r}; supported: {', '.join(CODEC_IDS)} "
                                 "(settings codec.hot_codec, codec.local_cold_codec, codec.global_cold_codec)")
        with self._build_lock:  # lossy codecs are built on first use (they import torch)
            from kvd.codecs.quant import QuantCodec

            if name not in self._by_name:
                self._by_name[name] = QuantCodec(name, self._zstd, self._lossless)
            return self._by_name[name]

    def decode_into(self, payload: Buffer, out: Buffer) -> PayloadInfo:
        """Decode any payload by the codec its header names; returns that header."""
        info = payload_info(payload)
        if memoryview(out).nbytes != info.raw_nbytes:
            raise InvalidRequest(f"output buffer of {memoryview(out).nbytes} bytes for an extent of {info.raw_nbytes}")
        self.get(info.codec).decode_into(payload, out)
        return info


def get_codec(name: str, settings: CodecSettings | None = None) -> Codec:
    """One codec by name (``raw``, ``lossless``, ``fp8``, ``int8``); ``InvalidRequest`` lists them."""
    return Codecs(settings).get(name)


__all__ = ["CODEC_IDS", "CODEC_NAMES", "LOSSY_CODECS", "Buffer", "Codec", "Codecs", "LosslessCodec", "PayloadInfo",
           "RawCodec", "Shape", "get_codec", "is_lossy", "payload_info", "raw_nbytes"]
