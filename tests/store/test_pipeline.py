"""Scenario tests of arena <-> SSD movement: admission, placement, demotion, prefetch, corruption, restart."""

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from kvd.core import protocol as P
from kvd.core.config import load_settings
from kvd.core.headmap import HeadMap
from kvd.core.keys import prefix_hashes
from kvd.daemon.metrics import Metrics
from kvd.policies.eviction import LruEviction
from kvd.store.pipeline import Mover
from kvd.store.store import Store
from kvd.tiers.host import HostTier
from kvd.tiers.ssd import SsdTier
from tests.fakes import FakeClock

# 2 layers × 2 KV heads; head 0 global, head 1 local with sink 4, window 256: a 4-chunk sequence's
# chunks 1 and 2 are outside sink + window for the local head (cold), chunks 0 and 3 inside (hot).
HM = HeadMap.from_classes("toy", [[True, False], [True, False]], sink=4, window=256)
MODEL = P.RegisterModelRequest(model_id="toy", num_layers=2, num_kv_heads=2, head_dim=64, head_map=HM)
EXTENT = 2 * 2 * 256 * 64 * 2  # 2 segments (one per layer) of K+V, 256 tokens, bf16 = 128 KiB


class World:
    def __init__(self, tmp_path, **over):
        self.tmp_path, self.over = tmp_path, over
        self.clock = FakeClock()
        self.executor = ThreadPoolExecutor(2)
        self.open()

    def open(self):
        o = {"host": {"capacity_bytes": 2 << 20, "slot_bytes": 128 << 10}, "ssd": {"admit_after": 2}}
        for k, v in self.over.items():
            o.setdefault(k, {}).update(v)
        self.settings = load_settings(None, environ={}, overrides=o)
        self.host = HostTier(self.tmp_path / "arena", 2 << 20, 128 << 10)
        self.store = Store(self.settings, self.host, metrics=Metrics(), executor=self.executor, clock=self.clock,
                           host_policy=LruEviction())
        self.ssd = SsdTier(self.tmp_path / "ssd", self.settings.ssd, self.settings.codec)
        self.mover = self.store.mover = Mover(self.store, self.ssd)
        self.fp = self.store.register_model(MODEL).fingerprint

    async def restart(self):
        await self.mover.close()
        self.ssd.close()
        self.host.close()
        self.open()
        return await self.mover.recover()

    def close(self):
        self.ssd.close()
        self.host.close()
        self.executor.shutdown()

    async def store_seq(self, seed: int, chunks: int = 4):
        """Store a ``chunks``-chunk sequence with recognisable bytes; returns hashes and the bytes."""
        hs = prefix_hashes(np.arange(chunks * 256) + seed * 100000, chunk_tokens=256, namespace="default",
                           fingerprint=self.fp)
        r = self.store.reserve(P.ReserveRequest(fingerprint=self.fp, entries=[
            P.ReserveEntry(hash=h, num_tokens=256, start_token=i * 256, end_token=chunks * 256)
            for i, h in enumerate(hs)]))
        data = {}
        rng = np.random.default_rng(seed)
        for e in r.entries:
            for x in e.extents:
                b = rng.integers(0, 1 << 16, x.nbytes // 2, dtype=np.uint16).tobytes()  # bf16 bit patterns
                self.host.view[x.offset : x.offset + x.nbytes] = b
                data[(e.hash, x.head_class)] = b
        await self.store.commit(P.CommitRequest(reservation_id=r.reservation_id))
        return hs, data

    def lookup(self, hs, prefetch=False):
        return self.store.lookup(P.LookupRequest(fingerprint=self.fp, prefix_hashes=hs, prefetch=prefetch))

    async def read_back(self, hs, classes=None):
        le = await self.store.lease(P.LeaseRequest(fingerprint=self.fp, hashes=hs, classes=classes, wait_s=5))
        out = {(e.hash, x.head_class): bytes(self.host.view[x.offset : x.offset + x.nbytes])
               for e in le.entries if e.status == "ok" for x in e.extents}
        if le.lease_id:
            self.store.release(P.ReleaseRequest(lease_id=le.lease_id))
        return [e.status for e in le.entries], out


@pytest.fixture
async def world(tmp_path):
    w = World(tmp_path)
    yield w
    w.close()


async def test_admission_then_write_back_with_head_aware_placement(world):
    hs, data = await world.store_seq(1)
    await world.mover.step()
    assert world.ssd.stats().num_records == 0  # seen once: not admitted
    assert world.lookup(hs).num_prefix_hits == 4  # seen twice now: admitted
    await world.mover.step()
    e = [world.store.get(("default", world.fp, h)) for h in hs]
    assert all(x.ssd is not None for en in e for x in en.extents.values())
    # Global extents and local extents of chunks 0 (sink) and 3 (window) stay hot; chunks 1, 2 local go cold.
    assert [en.extents["local"].host is not None for en in e] == [True, False, False, True]
    assert all(en.extents["global"].host is not None for en in e)
    status, got = await world.read_back(hs)  # cold extents are prefetched back for an exact reader
    assert status == ["ok"] * 4 and got == data


async def test_pressure_demotes_under_the_low_watermark_and_reads_back_exactly(world):
    world.settings.ssd.admit_after = 1
    world.settings.host.low_watermark = 0.25
    world.settings.host.high_watermark = 0.5
    seqs = []
    for seed in range(2):  # 2 × 4 entries × 2 extents × 128 KiB = 2 MiB = the whole arena
        seqs.append(await world.store_seq(seed))
    assert world.host.stats().usage > world.settings.host.high_watermark
    await world.mover.step()
    assert world.host.stats().usage <= world.settings.host.low_watermark
    for hs, data in seqs:
        status, got = await world.read_back(hs)
        assert status == ["ok"] * 4 and got == data
    assert world.store.metrics.registry.get_sample_value("kvd_promotions_total", {"head_class": "global"}) > 0


async def test_arena_never_grows_past_capacity_and_says_no_space(world):
    world.settings.ssd.admit_after = 1
    for seed in range(6):
        await world.store_seq(seed)
        assert world.host.stats().used_bytes <= world.host.capacity_bytes
        await world.mover.step()
        assert world.host.stats().usage <= world.settings.host.high_watermark
    hs, _ = await world.store_seq(99)
    le = await world.store.lease(P.LeaseRequest(fingerprint=world.fp, hashes=hs))
    # Everything leased + a full arena: reserve answers no_space at once, nothing changes.
    for s in range(100, 103):
        await world.store_seq(s)
    r = world.store.reserve(P.ReserveRequest(fingerprint=world.fp, entries=[P.ReserveEntry(
        hash="a" * 32, num_tokens=256 * 40)]))
    assert r.entries[0].status == "no_space"
    world.store.release(P.ReleaseRequest(lease_id=le.lease_id))


async def test_corrupt_ssd_record_is_a_miss_never_served(world):
    world.settings.ssd.admit_after = 1
    hs, data = await world.store_seq(3, chunks=1)
    await world.mover.step()
    world.store.evict_host(world.store.get(("default", world.fp, hs[0])))
    # Flip bytes inside the stored payload of the global extent.
    loc = world.store.get(("default", world.fp, hs[0])).extents["global"].ssd
    with world.ssd._env.begin(write=True, db=world.ssd._data) as txn:
        v = bytearray(txn.get(loc.key, db=world.ssd._data))
        v[-100] ^= 0xFF
        txn.put(loc.key, bytes(v), db=world.ssd._data)
    status, got = await world.read_back(hs)
    assert status == ["missing"] and got == {}
    assert world.store.metrics.registry.get_sample_value("kvd_checksum_failures_total", {"tier": "ssd"}) == 1


async def test_restart_keeps_ssd_contents(world):
    world.settings.ssd.admit_after = 1
    hs, data = await world.store_seq(4)
    await world.mover.step()
    assert await world.restart() == 4
    res = world.lookup(hs)
    assert res.num_prefix_hits == 4 and {r.tier for r in res.prefix} == {"ssd"}
    status, got = await world.read_back(hs)
    assert status == ["ok"] * 4 and got == data


async def test_drop_codec_keeps_only_what_local_heads_need(tmp_path):
    w = World(tmp_path, codec={"local_cold_codec": "drop"}, ssd={"admit_after": 1})
    try:
        hs, data = await w.store_seq(5)
        await w.mover.step()
        res = w.lookup(hs)
        # Chunks 1 and 2 lost their (cold) local extents: incomplete for an exact reader...
        assert res.num_prefix_hits == 1 and [r.complete for r in res.prefix] == [True, False, False, True]
        # ...but a head-aware reader that needs only global heads there still gets them.
        status, got = await w.read_back(hs[1:3], classes=["global"])
        assert status == ["ok", "ok"] and got == {k: v for k, v in data.items() if k[0] in hs[1:3] and k[1] == "global"}
    finally:
        w.close()


async def test_lossy_cold_codec_is_bounded_and_not_offered_as_exact(tmp_path):
    w = World(tmp_path, codec={"local_cold_codec": "fp8"}, ssd={"admit_after": 1})
    try:
        hs, _ = await w.store_seq(6)
        await w.mover.step()
        e = w.store.get(("default", w.fp, hs[1]))
        assert e.extents["local"].ssd_codec in ("fp8", "lossless") and e.extents["local"].host is None
        if e.extents["local"].ssd_codec == "fp8":
            assert not w.lookup(hs).prefix[1].complete
    finally:
        w.close()


async def test_flush_ignores_admission_and_ssd_full_evicts(tmp_path):
    w = World(tmp_path, ssd={"admit_after": 100, "capacity_bytes": 3 * EXTENT * 4})
    try:
        hs, _ = await w.store_seq(7)
        assert await w.mover.flush(P.FlushRequest()) == 4
        assert w.ssd.stats().num_records == 8
        hs2, _ = await w.store_seq(8)
        assert await w.mover.flush(P.FlushRequest()) >= 1
        assert w.ssd.stats().used_bytes <= w.ssd.capacity_bytes
        assert w.mover.counts["ssd_evictions"] >= 1
    finally:
        w.close()
