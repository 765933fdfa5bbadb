"""One extent's bytes in the form each tier holds: encode for a record tier, decode into a memory tier.

The pipeline (``kvd.store.pipeline``) decides what moves and keeps the books; this module only turns
bytes of one tier's form into another's, with the codecs and their metrics:

- memory -> record: ``encode_record`` with the extent's placement codec (its exact checksum reused,
  the bytes verified against it first; 8-bit KV is not quantized again: a lossy codec becomes
  ``lossless`` for it);
- record -> record: the record as it is, its payload verified (nothing decodes it on the way);
- memory -> memory (GPU pool -> arena): the raw bytes, verified against the commit checksum (an
  engine maps the pool read-write, so a stray write there is caught before it spreads);
- record -> memory: ``decode_record_into`` the reserved slots (header, payload and decoded-bytes
  checksums); the copy is flagged lossy when the record's codec is.

Everything here runs on the executors (CPU work, or reading a blocking tier), never on the event loop.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import xxhash

from kvd.codecs import Codecs, is_lossy
from kvd.core.dtypes import DTYPE_BYTES
from kvd.core.errors import CorruptData, RecordMissing
from kvd.daemon.metrics import Metrics
from kvd.store.entries import Copy, Entry, Extent
from kvd.store.index import Level
from kvd.tiers.base import Buffer, Tier
from kvd.tiers.record import check_record, decode_record_into, encode_record, other_layout, unpack_header

Payload = tuple[bytes, str, int | None]  # (bytes for the lower tier, codec, checksum of what a reader gets)


class Forms:
    def __init__(self, codecs: Codecs, metrics: Metrics, dtype_of: Callable[[str], str]) -> None:
        self.codecs = codecs
        self.metrics = metrics
        self.dtype_of = dtype_of  # fingerprint -> KV dtype

    def produce(self, e: Entry, x: Extent, lv: Level, lower: Level) -> Payload:
        """``x``'s copy at ``lv`` in ``lower``'s form. Raises ``CorruptData`` / ``TierUnavailable``."""
        copy = x.copies[lv.name]
        data = lv.tier.read(copy.loc)
        if lv.tier.holds_records:  # passed on as it is: verified here, since nothing decodes it
            check_record(data, copy.loc.key)
            return bytes(data), copy.codec, copy.checksum
        raw = memoryview(data)[: x.nbytes]
        # Checked before it goes anywhere: a record reuses this checksum (lossless) or takes one of its
        # dequantized bytes (lossy), so overwritten bytes would go down as a valid record.
        verify(raw, copy.checksum, f"{lv.name} copy of {e.hash} {x.head_class}")
        if not lower.tier.holds_records:
            return bytes(raw), copy.codec, copy.checksum
        codec = x.lower_codec or "lossless"
        dtype = self.dtype_of(e.fingerprint)
        if is_lossy(codec) and DTYPE_BYTES[dtype] < 2:  # fp8 KV: the lossy codecs refuse it; kept exact
            codec = "lossless"
        if codec == "lossless" and lower.exact_codec is not None:  # the tier's own choice (remote.exact_codec)
            codec = lower.exact_codec
        t0 = time.perf_counter()
        rec = encode_record(self.codecs, e.name(x.head_class), raw, dtype=dtype,
                            shape=(x.plan.num_segments, x.plan.num_tokens, x.plan.head_dim), codec=codec,
                            raw_xxh=copy.checksum, layout=x.plan.layout)
        self.metrics.codec_seconds.labels(rec.codec, "encode").inc(time.perf_counter() - t0)
        self.metrics.codec_raw_bytes.labels(rec.codec, "encode").inc(x.nbytes)
        self.metrics.codec_encoded_bytes.labels(rec.codec, "encode").inc(len(rec.data))
        return rec.data, rec.codec, rec.raw_xxh

    @staticmethod
    def checksums(tiers: dict[str, Tier], entries: list[Entry]) -> list[list[int]]:
        """xxh3-64 of each extent's bytes (at commit: each has one copy, in a memory tier), per entry."""
        return [[xxhash.xxh3_64_intdigest(tiers[t].read(c.loc)[: x.nbytes])
                 for x in e.extents.values() for t, c in x.copies.items()] for e in entries]

    def place_into(self, src: Level, copy: Copy, data: Buffer, out: memoryview, layout: str) -> tuple[str, int | None]:
        """Write what ``src``'s tier returned for ``copy`` into ``out`` (a memory tier's slots); returns
        the new copy's codec and checksum. ``CorruptData`` if any check fails (``out`` is then garbage);
        ``RecordMissing`` for a record of another extent layout than ``layout`` (the extent plan's): in a
        shared tier, another daemon's (another head map) stored under this key since, or never ours."""
        if not src.tier.holds_records:  # the GPU pool, for a reader of the arena only
            out[:] = memoryview(data)[: out.nbytes]
            verify(out, copy.checksum, f"{src.name} copy at {copy.loc.offset}")
            return copy.codec, copy.checksum
        found = unpack_header(data, copy.loc.key)[0].layout
        if other_layout(found, layout, src.tier.shared):
            raise RecordMissing(f"{src.name} record {copy.loc.key!r} holds other heads (layout {found or 'unknown'}, "
                                f"this model's head map makes {layout}): another head map's; not served")
        t0 = time.perf_counter()
        header = decode_record_into(self.codecs, data, copy.loc.key, out)
        self.metrics.codec_seconds.labels(header.codec, "decode").inc(time.perf_counter() - t0)
        self.metrics.codec_raw_bytes.labels(header.codec, "decode").inc(out.nbytes)
        return (header.codec if is_lossy(header.codec) else "raw"), header.raw_xxh


def verify(raw: Buffer, checksum: int | None, what: str) -> None:
    """``CorruptData`` unless ``raw`` hashes to ``checksum`` (None: not checksummed, nothing to check)."""
    if checksum is not None and xxhash.xxh3_64_intdigest(raw) != checksum:
        raise CorruptData(f"{what} fails its commit checksum (xxh3 {checksum:016x}); not used")
