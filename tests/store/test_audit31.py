"""Audit 31: moving extents between tiers (kvd.store.pipeline, batch writes, promotion, writes),
reservations of room and their accounting."""

from __future__ import annotations

import pytest

from kvd.core import protocol as P
from tests.store.test_pipeline import World


@pytest.fixture
async def w(tmp_path):
    w = World(tmp_path, ssd={"admit_after": 1})
    yield w
    w.close()


def failing_on_call(fn, n: int, err: BaseException):
    """``fn`` that raises ``err`` on its ``n``-th call (and only then)."""
    calls = [0]

    def wrapped(*args, **kwargs):
        calls[0] += 1
        if calls[0] == n:
            raise err
        return fn(*args, **kwargs)
    return wrapped


async def test_a_write_down_that_fails_half_way_through_its_reserves_gives_back_the_room_it_took(w):
    """A batch reserves room below for each of its copies, one after the other (each reserve may
    evict there, writing victims further down); one that raised (an eviction's write-down failing
    unexpectedly) left the reservations taken before it in the tier: the SSD counted their bytes as
    used until a restart, and kept their keys reserved, so every later write of those extents failed
    on 'already reserved' and the entry could never be written down again."""
    hs, data = await w.store_seq(1, chunks=1)  # one entry, two extents: two reserves in one batch
    e, arena = w.entry(hs[0]), w.store.index.landing
    real = w.ssd.reserve
    w.ssd.reserve = failing_on_call(real, 2, RuntimeError("the second reserve fails"))
    with pytest.raises(RuntimeError, match="second reserve"):
        await w.store.pipeline.write_down([e], arena)
    w.ssd.reserve = real
    await w.store.pipeline.drain()
    assert w.ssd.stats().used_bytes == 0 and w.ssd.stats().num_records == 0
    assert not any("ssd" in x.copies for x in e.extents.values())
    assert e.holds == 0 and e.key not in w.store.pipeline.busy
    assert await w.store.pipeline.write_down([e], arena) == 2  # the same extents can be written later
    w.store.pipeline.drop_copies(e, arena)  # on SSD only now
    assert await w.read_back(hs) == (["ok"], data)


async def test_an_eviction_answers_every_byte_it_freed_including_cold_extents_written_down_first(w):
    """Evicting an admitted entry with no copy below writes it down first; its cold extents leave the
    arena right then (placement), and the eviction counted only what was left after: ``kvctl evict``
    answered 768 KiB for 1 MiB freed (its dry run said 1 MiB)."""
    await w.store_seq(1)  # 4 entries × 2 extents × 128 KiB; the local extents of chunks 1 and 2 are cold
    used = w.host.stats().used_bytes
    dry = await w.store.evict(P.EvictRequest(tier="host", dry_run=True))
    done = await w.store.evict(P.EvictRequest(tier="host"))
    await w.store.pipeline.drain()
    assert done.count == 4 and w.host.stats().used_bytes == 0
    assert done.nbytes == dry.nbytes == used == 1 << 20


async def test_a_record_whose_drop_failed_is_replaced_by_the_next_write_down_of_its_extent(w):
    """A record delete that fails (LMDB on a full disk) leaves the record stored under its key after
    the store has let the copy go. The next write-down of that extent asserted 'already reserved or
    stored' in the SSD's reserve, failing that write-down and every batch it was part of, each round."""
    import lmdb

    hs, data = await w.store_seq(1, chunks=1)
    e, arena = w.entry(hs[0]), w.store.index.landing
    ssd = next(lv for lv in w.store.index.levels if lv.tier is w.ssd)
    assert await w.store.pipeline.write_down([e], arena) == 2
    w.ssd.drop = failing_on_call(failing_on_call(w.ssd.drop, 1, lmdb.DiskError("full")), 2, lmdb.DiskError("full"))
    await w.store.pipeline.drop_copies(e, ssd)  # both deletes fail: two orphans on SSD
    del w.ssd.drop
    assert w.ssd.stats().num_records == 2 and not any("ssd" in x.copies for x in e.extents.values())
    assert await w.store.pipeline.write_down([e], arena) == 2  # replaces them
    stats = w.ssd.stats()
    assert stats.num_records == 2 and stats.used_bytes == sum(x.copies["ssd"].loc.nbytes for x in e.extents.values())
    w.store.pipeline.drop_copies(e, arena)  # on SSD only now
    assert await w.read_back(hs) == (["ok"], data)
