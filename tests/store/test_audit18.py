"""Audit 18 (policies and the store's use of them): defects found in admission, eviction order and room."""

from __future__ import annotations

import pytest

from kvd.core import protocol as P
from tests.store.test_pipeline import World


async def test_an_entry_admitted_by_a_second_store_is_written_back(tmp_path):
    """A store of a key already stored is a sighting (docs/tiers.md, Admission: "each store or lookup
    hit counts one"): its count went up, but the store never told the background, so an entry
    admitted that way was not queued for write-back and stayed in the arena alone (lost on restart)."""
    w = World(tmp_path)  # admit_after 2
    try:
        hs, data = await w.store_seq(1)
        await w.step()
        assert w.ssd.stats().num_records == 0  # seen once: not admitted
        r = await w.store.reserve(P.ReserveRequest(fingerprint=w.fp, entries=[  # stored again: its 2nd sighting
            P.ReserveEntry(hash=h, num_tokens=256, start_token=i * 256, end_token=1024) for i, h in enumerate(hs)]))
        assert [e.status for e in r.entries] == ["exists"] * 4
        assert all(w.entry(h).seen == 2 for h in hs)
        await w.step()
        assert all("ssd" in x.copies for h in hs for x in w.entry(h).extents.values()), \
            "an entry admitted by its second store was never written back"
        assert w.store.background.admission.seen(w.entry(hs[0]).key) == 2
    finally:
        w.close()



async def test_an_entry_whose_extents_can_never_fit_the_arena_together_evicts_nothing(tmp_path):
    """A request larger than the tier is refused before anything is evicted (docs/tiers.md). The check
    compared the entry's bytes with the arena, but each extent takes whole slots: two extents of 7.5
    slots fit "15 slots" and need 16. The reserve evicted for the first extent, then found no room for
    the second: entries were dropped for a store that could never be made."""
    w = World(tmp_path, host={"capacity_bytes": 15 * (128 << 10)})  # 15 slots of 128 KiB
    try:
        hs, _ = await w.store_seq(1)  # 4 entries × 2 extents × 1 slot: 8 slots, not admitted
        r = await w.store.reserve(P.ReserveRequest(fingerprint=w.fp, entries=[
            P.ReserveEntry(hash="b" * 32, num_tokens=1920)]))  # 2 extents of 7.5 slots: 16 slots
        assert r.entries[0].status == "no_space"
        assert all(w.entry(h) is not None for h in hs), "entries were evicted for a store that cannot fit"
        assert w.host.stats().used_bytes == 8 * (128 << 10)
    finally:
        w.close()


@pytest.mark.parametrize("policy", ["lru", "cost_aware"])
async def test_writing_entries_down_does_not_make_them_recent_in_the_arena(tmp_path, policy):
    """The index tells a tier's policy of every copy an entry gains or loses there (``on_insert`` with
    its new size). LRU and cost_aware took that for a use: when a flush (or a write-back) let an old
    entry's cold extents leave the arena, it became the most recent there, and entries used since were
    evicted before it. A size update now keeps an entry's place, as ARC's always did."""
    w = World(tmp_path, policy=policy)
    try:
        old, _ = await w.store_seq(1)
        w.clock.advance(600)
        new, _ = await w.store_seq(2)
        await w.read_back(new)  # used since
        w.clock.advance(10)
        assert (await w.store.flush(P.FlushRequest())).count == 8  # cold extents (chunks 1, 2 local) leave the arena
        assert "host" not in w.entry(old[1]).extents["local"].copies
        host = w.store.index.landing
        order = [e.hash for e in w.store.pipeline.space.victims(host, w.host.capacity_bytes, partial=True)]
        assert set(order[:4]) == set(old), f"entries used since went first: {order}"
    finally:
        w.close()


async def test_an_entry_busy_when_its_write_back_comes_is_written_at_the_next_step(tmp_path):
    """write_back took an entry off its queue and dropped it when a move held it (pipeline.busy): it was
    never queued again, so a pinned entry (never evicted, so never demoted) stayed in the arena alone."""
    w = World(tmp_path)
    try:
        hs, _ = await w.store_seq(1)
        w.store.set_pinned(P.EntriesRequest(fingerprint=w.fp, hashes=hs), True)
        keys = [w.entry(h).key for h in hs]
        w.store.pipeline.busy.update(keys)  # a move holds them when the write-back comes
        await w.step()
        assert not any("ssd" in x.copies for h in hs for x in w.entry(h).extents.values())
        w.store.pipeline.busy.difference_update(keys)
        await w.step()
        assert all("ssd" in x.copies for h in hs for x in w.entry(h).extents.values()), \
            "a busy entry left the write-back queue for good"
    finally:
        w.close()


async def test_a_lease_waits_for_promotions_at_most_wait_s_in_all(tmp_path):
    """wait_for_top waited wait_s for the promotions, then wait_s again for those still missing: a lease
    could take twice its wait_s, past the client's timeout (which adds wait_s once), and the lease the
    daemon then granted was held by nobody until its TTL."""
    import threading
    import time

    w = World(tmp_path, ssd={"admit_after": 1})
    release = threading.Event()
    try:
        hs, _ = await w.store_seq(1, chunks=1)
        await w.step()
        await w.store.evict(P.EvictRequest(tier="host"))  # on SSD only now
        real_read = w.ssd.read

        def slow_read(loc):  # a promotion that outlasts the lease's wait
            release.wait(10)
            return real_read(loc)
        w.ssd.read = slow_read
        t0 = time.monotonic()
        r = await w.store.lease(P.LeaseRequest(fingerprint=w.fp, hashes=hs, wait_s=0.5))
        took = time.monotonic() - t0
        assert r.entries[0].status == "timeout"
        assert took < 0.9, f"a lease with wait_s 0.5 took {took:.2f} s"
    finally:
        release.set()
        await w.store.pipeline.drain()
        w.close()
