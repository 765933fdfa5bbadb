"""Trimmed extents (issue 12, capacity mode): with ``local_cold_codec = drop``, a prefix computed under
a head map keeps of each local group only the tokens its readers read (the sink chunk: the sink; the
chunk where a window starts: from there on). The bytes kept are the original's tokens, head-aware
readers get them with their span and load bit for bit, exact readers see a miss, and the daemon finds
the same spans again when it rebuilds its index from SSD records."""

import numpy as np
import pytest
import xxhash

from kvd.core import protocol as P
from kvd.core.errors import InvalidRequest
from kvd.core.extents import covers, keep_span, trimmed_from
from kvd.core.keys import EXACT
from tests.store.test_readers import CHUNKS, MODEL, TAG, W64, W1536, head_aware, world

TOKEN = 2 * 64 * 2  # K+V of one head and one token, bf16
# In the 2048-token sequence (8 chunks): chunk 0 keeps the sink of both local groups, chunk 7 the
# last 64 tokens of w64; w1536 starts on chunk 2's boundary (2048 - 1536 = 512), so it is not trimmed.
TRIMMED = {(0, W64): (0, 4), (0, W1536): (0, 4), (7, W64): (192, 256)}


def tokens_of(raw: bytes, num_segments: int, lo: int, hi: int) -> bytes:
    """Tokens [lo, hi) of every segment of an extent's bytes (segments of K[T, D] then V[T, D])."""
    a = np.frombuffer(raw, np.uint8).reshape(num_segments, 2, 256, 64 * 2)
    return np.ascontiguousarray(a[:, :, lo:hi]).tobytes()


async def lease(w, hs, **kw):
    le = await w.store.lease(P.LeaseRequest(fingerprint=w.fp, hashes=hs, computed_under=TAG, wait_s=5, **kw))
    got = {(e.hash, x.head_class): (x.tokens, bytes(w.host.view[x.offset: x.offset + x.nbytes]))
           for e in le.entries if e.status == "ok" for x in e.extents}
    if le.lease_id:
        w.store.release(P.ReleaseRequest(lease_id=le.lease_id))
    return le, got


def check_trimmed(w, hs):
    for i, h in enumerate(hs):
        for c, x in w.entry(h).extents.items():
            want = TRIMMED.get((i, c))
            assert x.plan.is_trimmed is (want is not None), (i, c)
            if want:
                assert x.plan.span == want and x.nbytes == 2 * (want[1] - want[0]) * TOKEN


async def check_head_aware_load(w, hs, data):
    le, got = await lease(w, hs, **head_aware(position=CHUNKS * 256))
    assert [e.status for e in le.entries] == ["ok"] * CHUNKS
    for i, h in enumerate(hs):
        for (hh, c), (tokens, raw) in got.items():
            if hh != h:
                continue
            span = TRIMMED.get((i, c))
            assert tokens == span
            assert raw == (data[(h, c)] if span is None else tokens_of(data[(h, c)], 2, *span)), (i, c)
    # global in full, then per head: w64 its sink + 64, w1536 its sink + 1536 tokens (2 layers)
    moved = sum(len(raw) for _, raw in got.values())
    assert moved == 2 * TOKEN * (CHUNKS * 256 + (4 + 64) + (4 + 1536))


async def test_capacity_mode_keeps_only_the_tokens_readers_read(tmp_path):
    w = world(tmp_path, local_cold_codec="drop")
    try:
        hs, data = await w.store_seq(1, chunks=CHUNKS, computed_under=TAG)
        check_trimmed(w, hs)
        for (i, c), span in TRIMMED.items():  # the arena holds the original's tokens
            x = w.entry(hs[i]).extents[c]
            loc = x.copies["host"].loc
            assert bytes(w.host.view[loc.offset: loc.offset + x.nbytes]) == tokens_of(data[(hs[i], c)], 2, *span)
        saved = sum(2 * 256 * TOKEN - w.entry(hs[i]).extents[c].nbytes for i, c in TRIMMED)
        assert w.metric("kvd_trimmed_bytes_total") == saved
        await check_head_aware_load(w, hs, data)
        await w.step()  # written to SSD, far local extents let go
        await check_head_aware_load(w, hs, data)
        # exact readers of the same attention never get part of the tokens: a miss from chunk 0
        exact = await w.store.lookup(P.LookupRequest(fingerprint=w.fp, prefix_hashes=hs, computed_under=TAG,
                                                     prefetch=False))
        assert exact.num_prefix_hits == 0 and not {r.index for r in exact.prefix} & {0, 7}
        le, _ = await lease(w, hs[:1])
        assert [e.status for e in le.entries] == ["missing"]
        # a reader earlier than the sink chunk's groups allow: w1536 at 1024 reads all of chunk 0
        short = await w.store.lookup(P.LookupRequest(fingerprint=w.fp, prefix_hashes=hs, computed_under=TAG,
                                                     prefetch=False, max_tokens=1024, **head_aware()))
        assert short.num_prefix_hits == 0
    finally:
        w.close()


async def test_trimmed_entries_come_back_from_ssd_after_a_restart(tmp_path):
    w = world(tmp_path, local_cold_codec="drop")
    try:
        hs, data = await w.store_seq(2, chunks=CHUNKS, computed_under=TAG)
        await w.store.flush(P.FlushRequest())
        await w.step()
        await w.restart()
        assert all(w.entry(h) is not None for h in hs)
        check_trimmed(w, hs)
        await check_head_aware_load(w, hs, data)  # promoted from the SSD records, verified
    finally:
        w.close()


@pytest.mark.parametrize(("cold", "computed_under"), [("lossless", TAG), ("fp8", TAG), ("drop", EXACT)])
async def test_nothing_is_trimmed_outside_capacity_mode_or_for_exact_kv(tmp_path, cold, computed_under):
    w = world(tmp_path, local_cold_codec=cold)
    try:
        hs, _ = await w.store_seq(3, chunks=CHUNKS, computed_under=computed_under)
        assert not any(w.entry(h).is_trimmed for h in hs)
        assert w.metric("kvd_trimmed_bytes_total") == 0
    finally:
        w.close()


def test_spans_cover_what_a_reader_reads_from_where_the_store_says():
    from kvd.core.extents import plan_extents
    from kvd.core.keys import ModelSpec

    spec = ModelSpec(MODEL.model_id, MODEL.num_layers, MODEL.num_kv_heads, MODEL.head_dim)
    plans = plan_extents(spec, MODEL.head_map, 256)
    w64 = plans[W64]
    assert keep_span(w64, 0, 256, 2048) == (0, 4)
    assert keep_span(w64, 1792, 256, 2048) == (192, 256)
    assert keep_span(w64, 1792, 256, 2049) == (193, 256)  # a window one token later
    assert keep_span(w64, 1024, 256, 2048) is None  # cold
    assert keep_span(w64, 0, 256, 200) == (0, 256)  # sink and window in one chunk: the hull
    assert keep_span(plans["global"], 1024, 256, 2048) == (0, 256)
    sink, tail = w64.trim(0, 4), w64.trim(192, 256)
    # the tail serves from the first position whose window starts inside it, and at every one after
    assert trimmed_from(tail, 1792, 256) == 2047
    for p in range(1800, 2400):
        assert covers(tail, 1792, 256, p) is (p >= 2047), p
        assert covers(sink, 0, 256, p) is (p >= 256 + 63), p
    assert trimmed_from(sink, 0, 256) == 256 + 63
    with pytest.raises(ValueError, match="trimmed already"):
        tail.trim(0, 10)


async def test_writer_checksums_are_kept_but_not_for_extents_trimmed_at_commit(tmp_path):
    """A writer that hashed its extents right after copying them (``Reservation.written``) sends the
    digests with the commit and the daemon keeps them as they are (a deliberately wrong one too: a
    reader then refuses the entry); an extent this commit trims gets the daemon's hash of the bytes
    kept, so head-aware loads of trimmed extents still verify after the trip to SSD and back."""
    w = world(tmp_path, local_cold_codec="drop")
    try:
        wrong = "0123456789abcdef"
        hs, data = await w.store_seq(3, chunks=CHUNKS, computed_under=TAG,
                                     writer_sums={(1, "global"): wrong, (0, W64): wrong})
        check_trimmed(w, hs)
        for i, h in enumerate(hs):
            for c, x in w.entry(h).extents.items():
                loc = x.copies["host"].loc
                kept = xxhash.xxh3_64_intdigest(bytes(w.host.view[loc.offset: loc.offset + x.nbytes]))
                if (i, c) == (1, "global"):
                    assert x.checksum == int(wrong, 16) != kept  # the writer's, not read again
                else:
                    assert x.checksum == kept, (i, c)  # the writer's (equal), or the daemon's of what was kept
        bad = P.CommitRequest(reservation_id="r", checksums={hs[0]: [wrong]})
        r = await w.store.reserve(P.ReserveRequest(fingerprint=w.fp, computed_under=TAG, entries=[
            P.ReserveEntry(hash="ab" * 16, num_tokens=256)]))
        for sums, match in (({hs[0]: [wrong]}, "not part of reservation"), ({"ab" * 16: [wrong]}, "1 given for its")):
            with pytest.raises(InvalidRequest, match=match):
                await w.store.commit(bad.model_copy(update={"reservation_id": r.reservation_id, "checksums": sums}))
        await w.store.commit(P.CommitRequest(reservation_id=r.reservation_id))  # still there to commit
        await w.step()  # written to SSD, far local extents let go
        le, _ = await lease(w, hs[:1] + hs[2:], **head_aware(position=CHUNKS * 256))
        assert le.entries[0].status == "ok"  # the trimmed extents' bytes and checksums agree
    finally:
        w.close()


async def test_store_bytes_moved_count_what_the_writer_copied_before_trimming(tmp_path):
    """``kvd_moved_bytes_total{direction="store"}`` was summed after commit had trimmed the extents, so
    in capacity mode it left out the trimmed tokens the engine had copied into the arena (and the
    store transfer speed, bytes / the writer's seconds, read low by as much)."""
    w = world(tmp_path, local_cold_codec="drop")
    try:
        _, data = await w.store_seq(1, chunks=CHUNKS, computed_under=TAG)
        assert w.metric("kvd_trimmed_bytes_total") > 0
        assert w.metric("kvd_moved_bytes_total", {"direction": "store", "tier": "host"}) == sum(map(len, data.values()))
    finally:
        w.close()
