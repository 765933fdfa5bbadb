"""Per-head windows and head-aware readers through the store (issue 12): placement by each window
group's own window, leases that move only what a head-aware reader reads, capacity mode (drop, fp8)."""

import pytest

from kvd.core import protocol as P
from kvd.core.errors import HeadMapError, InvalidRequest
from kvd.core.headmap import HeadMap
from kvd.core.keys import attention_tag
from tests.store.test_pipeline import World

# One layer pattern, twice: head 0 global, head 1 local (sink 4, window 64), head 2 local (sink 4,
# window 1536): a 64-token and a 1536-token window in the same layer.
HM = HeadMap.from_classes("win", [[True, False, False]] * 2, sink=4, window=[[0, 64, 1536]] * 2)
MODEL = P.RegisterModelRequest(model_id="win", num_layers=2, num_kv_heads=3, head_dim=64, head_map=HM)
TAG = attention_tag(HM.sinks, HM.windows)
W64, W1536 = "local.s4.w64", "local.s4.w1536"
SEGMENT = 2 * 256 * 64 * 2  # K+V of one head, one 256-token chunk, bf16: 64 KiB
CHUNKS = 8  # a 2048-token sequence
# Which chunks each group needs at the sequence's end (2048): the sink chunk, and chunks ending
# after 2048 - window. w64: chunk 7 only; w1536: chunks 2..7 (chunk 1 ends at 512 = 2048 - 1536).
HOT = {"global": set(range(8)), W64: {0, 7}, W1536: {0, 2, 3, 4, 5, 6, 7}}


def world(tmp_path, **codec):
    w = World(tmp_path, model=MODEL, host={"capacity_bytes": 8 << 20, "slot_bytes": 64 << 10}, codec=codec)
    w.settings.ssd.admit_after = 1
    return w


def head_aware(**kw):
    return {"reader": "head_aware", "head_map": TAG, **kw}


async def lease(w, hs, **kw):
    le = await w.store.lease(P.LeaseRequest(fingerprint=w.fp, hashes=hs, computed_under=TAG, wait_s=5, **kw))
    if le.lease_id:
        w.store.release(P.ReleaseRequest(lease_id=le.lease_id))
    return le


@pytest.fixture
async def w(tmp_path):
    w = world(tmp_path)
    yield w
    w.close()


async def test_each_window_group_is_placed_by_its_own_window(w):
    hs, _ = await w.store_seq(1, chunks=CHUNKS, computed_under=TAG)
    for i, h in enumerate(hs):
        e = w.entry(h)
        assert set(e.extents) == {"global", W64, W1536}
        for c, x in e.extents.items():
            assert x.is_hot is (i in HOT[c]), (i, c)


async def test_a_head_aware_lease_moves_only_what_the_map_reads_and_cold_stays_cold(w):
    hs, data = await w.store_seq(2, chunks=CHUNKS, computed_under=TAG)
    await w.step()  # written back to SSD; cold extents leave the arena
    cold = [(i, c) for i, h in enumerate(hs) for c, x in w.entry(h).extents.items() if "host" not in x.copies]
    assert cold and all(i not in HOT[c] for i, c in cold)
    le = await lease(w, hs, **head_aware(position=CHUNKS * 256))
    assert [e.status for e in le.entries] == ["ok"] * CHUNKS
    for i, e in enumerate(le.entries):
        assert {x.head_class for x in e.extents} == {c for c in HOT if i in HOT[c]}, i
        for x in e.extents:
            got = bytes(w.host.view[x.offset: x.offset + x.nbytes])
            assert got == data[(e.hash, x.head_class)]
    moved = sum(x.nbytes for e in le.entries for x in e.extents)
    assert moved == sum(len(HOT[c]) * 2 * SEGMENT for c in HOT)  # 2 layers: 2 segments per group
    assert moved / (CHUNKS * 3 * 2 * SEGMENT) == pytest.approx(17 / 24)
    # nothing cold came back for it
    assert all("host" not in w.entry(hs[i]).extents[c].copies for i, c in cold)
    # an exact reader of the same entries gets every extent: the cold ones are promoted
    le = await lease(w, hs)
    assert all(len(e.extents) == 3 for e in le.entries)
    assert all("host" in w.entry(hs[i]).extents[c].copies for i, c in cold)


async def test_an_earlier_position_reads_further_back_for_the_short_window(w):
    hs, _ = await w.store_seq(3, chunks=CHUNKS, computed_under=TAG)
    le = await lease(w, hs[:4], **head_aware(position=1024))  # next query at 1024: w64 reads chunk 3
    assert [{x.head_class for x in e.extents} for e in le.entries] == [
        {"global", W64, W1536}, {"global", W1536}, {"global", W1536}, {"global", W64, W1536}]


@pytest.mark.parametrize("cold", ["drop", "fp8"])
async def test_capacity_mode_head_aware_readers_load_everything_exact_readers_miss(tmp_path, cold):
    w = world(tmp_path, local_cold_codec=cold)
    try:
        hs, data = await w.store_seq(4, chunks=CHUNKS, computed_under=TAG)
        await w.step()
        if cold == "drop":
            dropped = {(i, c) for i, h in enumerate(hs) for c, x in w.entry(h).extents.items() if x.dropped}
            assert dropped == {(i, c) for c in HOT for i in range(CHUNKS) if i not in HOT[c]}
        exact = await w.store.lookup(P.LookupRequest(fingerprint=w.fp, prefix_hashes=hs, computed_under=TAG,
                                                     prefetch=False))
        # fp8: chunk 1 lacks its w64 extent (exactly): recompute from there. drop: chunk 0's local extents
        # keep only the sink (trimmed), so an exact reader recomputes everything.
        assert exact.num_prefix_hits == (0 if cold == "drop" else 1)
        ha = await w.store.lookup(P.LookupRequest(fingerprint=w.fp, prefix_hashes=hs, computed_under=TAG,
                                                  prefetch=False, **head_aware()))
        assert ha.num_prefix_hits == CHUNKS and all(r.complete for r in ha.prefix)
        le = await lease(w, hs, **head_aware(position=CHUNKS * 256))
        assert [e.status for e in le.entries] == ["ok"] * CHUNKS
        assert not any(x.lossy for e in le.entries for x in e.extents)  # exact bytes for what it reads
        # Stopping at 1024 would need w64 of chunk 3, which this sequence's store did not keep: the
        # head-aware run ends at the sink chunk there (drop: not even that, since chunk 0 kept only the
        # sink and w1536 at 1024 reads all of it), while the whole 2048 loads.
        short = await w.store.lookup(P.LookupRequest(fingerprint=w.fp, prefix_hashes=hs, computed_under=TAG,
                                                     prefetch=False, max_tokens=1024, **head_aware()))
        assert short.num_prefix_hits == (0 if cold == "drop" else 1)
        # The same prompt again (all but its last token): every chunk, the last in part.
        again = await w.store.lookup(P.LookupRequest(fingerprint=w.fp, prefix_hashes=hs, computed_under=TAG,
                                                     prefetch=False, max_tokens=CHUNKS * 256 - 1, **head_aware()))
        assert again.num_prefix_hits == CHUNKS
        le = await lease(w, hs, **head_aware(position=CHUNKS * 256 - 1))
        assert [e.status for e in le.entries] == ["ok"] * CHUNKS
        # An exact reader that accepts lossy bytes: fp8 copies flagged lossy; nothing for drop.
        le = await lease(w, hs[:2], accept_lossy=True)
        if cold == "fp8":
            assert [e.status for e in le.entries] == ["ok", "ok"]
            assert [x.head_class for x in le.entries[1].extents if x.lossy] == [W64, W1536]  # chunk 1: both cold
        else:
            assert [e.status for e in le.entries] == ["missing", "missing"]  # chunk 0: trimmed
    finally:
        w.close()


async def test_a_head_aware_reader_under_another_map_is_refused(w):
    other = attention_tag(HM.sinks, [[0, 128, 1536]] * 2)
    with pytest.raises(HeadMapError, match="head map"):
        await w.store.lease(P.LeaseRequest(fingerprint=w.fp, hashes=["0" * 32], reader="head_aware",
                                           head_map=other))
    with pytest.raises(ValueError, match="names its head map"):
        P.LookupRequest(fingerprint=w.fp, prefix_hashes=[], reader="head_aware")


async def test_a_class_filter_takes_names_and_kinds(w):
    hs, _ = await w.store_seq(5, chunks=1, computed_under=TAG)
    le = await lease(w, hs, classes=["local"])
    assert {x.head_class for x in le.entries[0].extents} == {W64, W1536}
    le = await lease(w, hs, classes=[W64])
    assert [x.head_class for x in le.entries[0].extents] == [W64]
    with pytest.raises(InvalidRequest, match="unknown"):
        await lease(w, hs, classes=["local.s4.w99"])
