"""Operator actions: compaction never stalls the hot path; evict honours its limit and the policy."""

from __future__ import annotations

import asyncio
import threading

import pytest

from kvd.core import protocol as P
from kvd.tiers.ssd import SsdTier
from tests.store.test_pipeline import World


class SlowCompactSsd(SsdTier):
    """An SSD tier whose compaction holds the tier until ``release`` is set (a big file on a slow disk)."""

    def compact(self):
        with self._gate.exclusive():
            self.started.set()
            self.release.wait(30)
        return 0, 0


async def test_compaction_does_not_stall_commits(tmp_path):
    """Regression (issue 11): stores stalled up to 1.2 s during ``kvctl compact``: commit checksums
    ran on the same threads as SSD I/O, which waited for the compaction."""
    w = World(tmp_path, ssd={"admit_after": 1})
    try:
        slow = SlowCompactSsd.__new__(SlowCompactSsd)
        slow.__dict__.update(w.ssd.__dict__)
        slow.started, slow.release = threading.Event(), threading.Event()
        w.store.index.levels[1].tier = slow
        compaction = asyncio.ensure_future(w.store.admin.compact())
        await asyncio.get_running_loop().run_in_executor(None, slow.started.wait, 10)
        # Fill every I/O thread: two write-backs, each blocked on the compacting tier.
        flushes = []
        for seed in range(2):
            hs, _ = await w.store_seq(seed, chunks=1)
            flushes.append(asyncio.ensure_future(w.store.admin.flush(
                P.FlushRequest(namespace="default", fingerprint=w.fp, hashes=hs))))
        await asyncio.sleep(0.3)
        # The hot path still works: reserve, copy, commit, lookup, lease from the arena.
        hs, data = await asyncio.wait_for(w.store_seq(7, chunks=2), timeout=10)
        status, got = await asyncio.wait_for(w.read_back(hs), timeout=10)
        assert status == ["ok", "ok"] and got == data
        assert not compaction.done()
        slow.release.set()
        assert await compaction == 0
        await asyncio.gather(*flushes)
    finally:
        w.close()


@pytest.mark.parametrize("tier", ["host", "ssd"])
async def test_evict_dry_run_and_limit(tmp_path, tier):
    w = World(tmp_path, ssd={"admit_after": 1})
    try:
        for seed in range(3):
            await w.store_seq(seed, chunks=1)
        await w.store.admin.flush(P.FlushRequest())
        before = w.store.tier_stats()
        dry = await w.store.admin.evict(P.EvictRequest(tier=tier, max_bytes=1, dry_run=True))
        assert dry.count == 1 and dry.dry_run and w.store.tier_stats() == before
        done = await w.store.admin.evict(P.EvictRequest(tier=tier, max_bytes=1))
        assert done.count == 1 and done.hashes == dry.hashes  # the same victim, the policy's first
        await w.store.pipeline.drain()
        lv = w.store.index.by_name[tier]
        assert lv.tier.stats().num_records < {s.name: s for s in before}[tier].num_records
    finally:
        w.close()
