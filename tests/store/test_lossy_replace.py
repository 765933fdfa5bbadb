"""An exact copy promoted into the arena replaces a lossy one there; a lossy-accepting lease taken
while the promotion was under way reads that lossy copy. Its slots were freed at the placement
under the open lease, for the next writer to fill (audit 11's suspicion). Now the lossy copy stays
while it is leased, the promoted exact copy's slots go back, and the exact reader misses this once.
A lease's own wait for its promotions reads nothing, so it does not keep a lossy copy in place."""

from __future__ import annotations

import asyncio
import threading

from kvd.core import protocol as P
from kvd.store.entries import Copy
from tests.store.test_pipeline import World


async def _lossy_in_the_arena(w):
    """One stored chunk, in the arena and on SSD (exact); then the arena's copy of "local" is made a
    lossy (fp8) one. Returns its hashes, entry and local extent."""
    hs, _ = await w.store_seq(1, chunks=1)
    await w.step()
    e = w.entry(hs[0])
    host = w.store.index.levels[0]
    x = e.extents["local"]
    exact = w.store.index.unplace(e, x, host)
    w.store.index.place(e, x, host, Copy(exact.loc, "fp8", exact.checksum))
    return hs, e, x


async def test_a_lossy_copy_leased_during_a_promotion_is_not_freed_under_its_reader(tmp_path):
    w = World(tmp_path, ssd={"admit_after": 1})
    try:
        hs, e, x = await _lossy_in_the_arena(w)
        reading, go = threading.Event(), threading.Event()
        real_read = w.ssd.read

        def held_read(loc):  # the exact reader's promotion of "local", held while a lossy reader leases
            reading.set()
            assert go.wait(10)
            return real_read(loc)
        w.ssd.read = held_read
        # an exact reader's lookup starts the promotion
        await w.store.lookup(P.LookupRequest(fingerprint=w.fp, prefix_hashes=hs, prefetch=True))
        for _ in range(500):
            if reading.is_set():
                break
            await asyncio.sleep(0.01)
        assert reading.is_set(), "the lookup started no promotion"
        lossy = await w.store.lease(P.LeaseRequest(fingerprint=w.fp, hashes=hs, accept_lossy=True))
        assert lossy.entries[0].status == "ok"
        lossy_at = {i.head_class: i.offset for i in lossy.entries[0].extents}["local"]
        go.set()
        for _ in range(500):  # the promotion places what it fetched
            if e.key not in w.store.pipeline.busy:
                break
            await asyncio.sleep(0.01)
        await w.store.pipeline.drain()
        held = x.copies["host"]
        assert held.loc.offset == lossy_at and held.is_lossy, "the leased lossy copy was replaced and freed"
        assert w.metric("kvd_prefetches_total") == 0  # a promotion that placed nothing is not counted as one
        arena = w.host.arena()
        slot = lossy_at // arena.slot_bytes
        assert not any(s <= slot < s + n for s, n in arena.allocator.free_runs()), "its slots are free"
        w.store.release(P.ReleaseRequest(lease_id=lossy.lease_id))
    finally:
        w.close()


async def test_an_exact_lease_replaces_a_lossy_arena_copy_nobody_reads(tmp_path):
    """Store.lease holds its entries while their promotions run, and the promotion refused to replace a
    lossy arena copy of an entry with holds: an exact reader that leased without a prefetching lookup
    first got 'timeout' every time, though an exact copy lay on SSD and no one read the lossy one."""
    w = World(tmp_path, ssd={"admit_after": 1})
    try:
        hs, e, x = await _lossy_in_the_arena(w)
        le = await w.store.lease(P.LeaseRequest(fingerprint=w.fp, hashes=hs))
        assert le.entries[0].status == "ok", le.entries[0].status
        assert not x.copies["host"].is_lossy and all(not i.lossy for i in le.entries[0].extents)
        w.store.release(P.ReleaseRequest(lease_id=le.lease_id))
        assert e.holds == 0 and e.waiting == 0
    finally:
        w.close()
