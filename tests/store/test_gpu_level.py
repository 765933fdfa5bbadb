"""Scenario tests of the store with a GPU tier on top: gpu -> host -> ssd.

The GPU pool is a CPU tensor shared through ``InProcessIpc``, the one stand-in (for CUDA IPC); the
store, pipeline, arena and SSD tier are the real ones. Each step says what it does and what it expects.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
import xxhash

from kvd.core import protocol as P
from kvd.core.config import load_settings
from kvd.core.gpu_ipc import InProcessIpc
from kvd.core.headmap import HeadMap
from kvd.core.keys import prefix_hashes
from kvd.daemon.metrics import Metrics
from kvd.store.store import Store
from kvd.tiers.gpu import GpuTier
from kvd.tiers.host import ArenaSpec, HostTier
from kvd.tiers.ssd import SsdTier
from tests.fakes import FakeClock

# 2 layers × 2 KV heads; head 0 global, head 1 local (sink 4, window 256): of a 4-chunk sequence the
# local extents of chunks 1 and 2 are cold, the rest hot. Each extent: 2 segments of 256 tokens × 64, bf16.
HM = HeadMap.from_classes("toy", [[True, False], [True, False]], sink=4, window=256)
MODEL = P.RegisterModelRequest(model_id="toy", num_layers=2, num_kv_heads=2, head_dim=64, head_map=HM)
EXTENT = 2 * 2 * 256 * 64 * 2  # 128 KiB
ENTRY = 2 * EXTENT  # global + local


class World:
    def __init__(self, tmp_path, *, gpu_bytes=4 * ENTRY, host_bytes=16 * ENTRY, ssd=True, tenants=None,
                 admit_after=2):
        self.clock = FakeClock()
        self.cpu, self.io = ThreadPoolExecutor(2), ThreadPoolExecutor(2)
        self.settings = load_settings(None, environ={}, overrides={
            "host": {"capacity_bytes": host_bytes, "slot_bytes": 128 << 10},
            "ssd": {"admit_after": admit_after}, "policy": {"eviction": "lru"}})
        self.ipc = InProcessIpc()  # the stand-in for CUDA IPC
        part = tenants or {}  # tenant -> (gpu bytes, arena bytes)

        def partition_of(ns: str) -> str:
            return ns.split(":")[0] if ns.split(":")[0] in part else ""

        self.gpu = GpuTier(self.ipc, gpu_bytes, 128 << 10, partition_of=partition_of,
                           partitions={"": gpu_bytes, **{t: g for t, (g, _) in part.items()}} if part else None)
        self.host = HostTier(tmp_path / "arena", host_bytes, 128 << 10, partition_of=partition_of,
                             partitions={"": ArenaSpec(tmp_path / "arena", host_bytes),
                                         **{t: ArenaSpec(tmp_path / f"arena-{t}", a) for t, (_, a) in part.items()}}
                             if part else None)
        self.tiers = [self.gpu, self.host] + ([SsdTier(tmp_path / "ssd", self.settings.ssd)] if ssd else [])
        self.store = Store(self.settings, self.tiers, metrics=Metrics(), cpu=self.cpu, io=self.io, clock=self.clock,
                           partition_of=partition_of)
        self.fp = self.store.register_model(MODEL).fingerprint

    def close(self):
        for t in self.tiers:
            t.close()
        self.cpu.shutdown()
        self.io.shutdown()

    def entry(self, h, namespace="default"):
        return self.store.index.get((namespace, self.fp, h))

    def metric(self, name, labels=None):
        return self.store.metrics.registry.get_sample_value(name, labels or {}) or 0

    def view(self, tier: str, x: P.ExtentInfo, partition: str = ""):
        if tier == "gpu":
            return self.gpu.pool(partition).tensor[x.offset : x.offset + x.nbytes].numpy()
        return np.frombuffer(self.host.arena(partition).view, dtype=np.uint8)[x.offset : x.offset + x.nbytes]

    async def store_seq(self, seed, chunks=4, namespace="default", gpu=True):
        """Reserve, write finite bf16 KV into the extents (wherever they lie), commit. Returns hashes,
        the bytes per (hash, class), and the reservation's answer."""
        hs = prefix_hashes(np.arange(chunks * 256) + seed * 100000, chunk_tokens=256, namespace=namespace,
                           fingerprint=self.fp)
        r = await self.store.reserve(P.ReserveRequest(fingerprint=self.fp, namespace=namespace, gpu=gpu, entries=[
            P.ReserveEntry(hash=h, num_tokens=256, start_token=i * 256, end_token=chunks * 256)
            for i, h in enumerate(hs)]))
        rng = np.random.default_rng(seed)
        data, part = {}, namespace.split(":")[0] if ":" in namespace else ""
        for e in r.entries:
            for x in e.extents:
                b = (rng.standard_normal(x.nbytes // 2).astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)
                self.view(x.tier, x, part)[:] = b.view(np.uint8)
                data[(e.hash, x.head_class)] = b.tobytes()
        if r.reservation_id:
            await self.store.commit(P.CommitRequest(reservation_id=r.reservation_id))
        return hs, data, r

    async def lease(self, hs, gpu=True, namespace="default"):
        return await self.store.lease(P.LeaseRequest(fingerprint=self.fp, namespace=namespace, hashes=hs, gpu=gpu,
                                                     wait_s=5))

    async def read_back(self, hs, gpu=True, namespace="default"):
        """Lease, copy every extent out of the tier it is answered from, release: (statuses, bytes, tiers)."""
        le = await self.lease(hs, gpu, namespace)
        part = namespace.split(":")[0] if ":" in namespace else ""
        out = {(e.hash, x.head_class): bytes(self.view(x.tier, x, part)) for e in le.entries if e.status == "ok"
               for x in e.extents}
        tiers = {x.tier for e in le.entries for x in e.extents}
        if le.lease_id:
            self.store.release(P.ReleaseRequest(lease_id=le.lease_id))
        return [e.status for e in le.entries], out, tiers

    async def step(self):
        await self.store.background.step()
        await self.store.pipeline.drain()


@pytest.fixture
async def world(tmp_path):
    w = World(tmp_path)
    yield w
    w.close()


def test_store_refuses_a_tier_order_clients_cannot_map(tmp_path):
    settings = load_settings(None, environ={})
    gpu = GpuTier(InProcessIpc(), 1 << 20, 128 << 10)
    host = HostTier(tmp_path / "arena", 1 << 20, 128 << 10)
    ssd = SsdTier(tmp_path / "ssd", settings.ssd)
    try:
        for bad in ([host, gpu], [gpu, ssd], [gpu, ssd, host]):
            with pytest.raises(ValueError, match="memory tiers"):
                Store(settings, bad, metrics=Metrics(), cpu=None, io=None)
        s = Store(settings, [gpu, host, ssd], metrics=Metrics(), cpu=None, io=None)
        assert [lv.name for lv in s.index.memory] == ["gpu", "host"] and s.index.landing.name == "host"
    finally:
        for t in (gpu, host, ssd):
            t.close()


async def test_a_gpu_writer_stores_into_the_pool_and_a_gpu_reader_loads_from_it(world):
    hs, data, r = await world.store_seq(1)
    # every extent was reserved in the pool; the answer carries the pool to map
    assert {x.tier for e in r.entries for x in e.extents} == {"gpu"} and r.gpu_pool is not None
    assert r.gpu_pool.pool_id == world.gpu.info("").pool_id
    # the commit checksummed the GPU bytes
    for h in hs:
        for c, x in world.entry(h).extents.items():
            assert x.checksum == xxhash.xxh3_64_intdigest(data[(h, c)]) and list(x.copies) == ["gpu"]
    assert world.metric("kvd_moved_bytes_total", {"direction": "store", "tier": "gpu"}) == 4 * ENTRY
    # lookups name the gpu tier; a reader of the pool reads every extent from it, bytes unchanged
    assert {row.tier for row in (await world.store.lookup(P.LookupRequest(fingerprint=world.fp,
                                                                           prefix_hashes=hs))).prefix} == {"gpu"}
    statuses, out, tiers = await world.read_back(hs)
    assert statuses == ["ok"] * 4 and tiers == {"gpu"} and out == data
    assert world.metric("kvd_moved_bytes_total", {"direction": "load", "tier": "gpu"}) == 4 * ENTRY


async def test_a_reader_without_the_pool_gets_a_verified_copy_in_the_arena(world):
    hs, data, _ = await world.store_seq(2)
    # a client that does not map the GPU pool: the daemon copies the extents down to the arena first
    statuses, out, tiers = await world.read_back(hs, gpu=False)
    assert statuses == ["ok"] * 4 and tiers == {"host"} and out == data
    # the GPU copies stay: a GPU reader still reads them there
    assert all(set(world.entry(h).tiers()) == {"gpu", "host"} for h in hs)
    assert (await world.read_back(hs))[2] == {"gpu"}


async def test_a_writer_without_the_pool_stores_in_the_arena(world):
    hs, data, r = await world.store_seq(3, gpu=False)
    assert {x.tier for e in r.entries for x in e.extents} == {"host"} and r.gpu_pool is None
    statuses, out, tiers = await world.read_back(hs)
    assert statuses == ["ok"] * 4 and tiers == {"host"} and out == data


async def test_a_full_pool_demotes_its_victims_to_the_arena(world):
    # the pool holds 4 entries: the second sequence evicts the first one's entries down to the arena
    hs1, data1, _ = await world.store_seq(4)
    hs2, data2, r2 = await world.store_seq(5)
    assert {x.tier for e in r2.entries for x in e.extents} == {"gpu"}
    assert all(world.entry(h).tiers() == ["host"] for h in hs1)  # demoted, not lost (not even admitted)
    assert world.metric("kvd_demotions_total", {"tier": "host", "head_class": "global"}) == 4
    statuses, out, tiers = await world.read_back(hs1 + hs2)
    assert statuses == ["ok"] * 8 and out == {**data1, **data2} and tiers == {"gpu", "host"}


async def test_an_entry_the_pool_cannot_take_goes_to_the_arena(tmp_path):
    w = World(tmp_path, gpu_bytes=ENTRY)  # one entry's worth of pool
    try:
        # the first entry takes the pool; while it is leased the second cannot evict it: arena
        hs, data, _ = await w.store_seq(6, chunks=1)
        lease = await w.lease(hs)
        hs2, _, r2 = await w.store_seq(7, chunks=1)
        assert {x.tier for x in r2.entries[0].extents} == {"host"}
        assert w.entry(hs[0]).tiers() == ["gpu"]  # the leased entry stayed where it was read
        w.store.release(P.ReleaseRequest(lease_id=lease.lease_id))
    finally:
        w.close()


async def test_demotion_verifies_the_commit_checksum(world):
    """An engine maps the pool read-write: bytes changed after the commit must not reach the arena."""
    hs, data, r = await world.store_seq(8, chunks=2)
    x = r.entries[0].extents[0]
    world.view("gpu", x)[:16] ^= 0xFF  # a stray write over a committed extent
    got = await world.store.evict(P.EvictRequest(tier="gpu"))
    assert got.count == 2
    # the corrupt extent was caught on its way down: its entry is gone (that was its only copy), the
    # other entry reached the arena intact
    assert world.entry(hs[0]) is None and world.entry(hs[1]).tiers() == ["host"]
    assert world.metric("kvd_checksum_failures_total", {"tier": "gpu"}) == 1
    statuses, out, _ = await world.read_back(hs)
    assert statuses == ["missing", "ok"] and out == {k: v for k, v in data.items() if k[0] == hs[1]}


async def test_write_back_goes_down_through_the_arena_and_cold_extents_leave_the_pool(tmp_path):
    world = World(tmp_path, gpu_bytes=8 * ENTRY)  # half full: no relief in the way
    try:
        await _write_back_scenario(world)
    finally:
        world.close()


async def _write_back_scenario(world):
    hs, data, _ = await world.store_seq(9)
    await world.step()
    assert world.tiers[2].stats().num_records == 0  # seen once: not admitted to SSD
    await world.store.lookup(P.LookupRequest(fingerprint=world.fp, prefix_hashes=hs))  # seen twice
    await world.step()
    for i, h in enumerate(hs):
        e = world.entry(h)
        # written down through the arena to SSD; hot extents (global, and the local windows of chunks 0
        # and 3) stay in the pool and the arena, cold ones left both once SSD held them
        hot = {"global": True, "local": i in (0, 3)}
        assert {c: sorted(x.copies) for c, x in e.extents.items()} == {
            c: (["gpu", "host", "ssd"] if hot[c] else ["ssd"]) for c in hot}
    statuses, out, tiers = await world.read_back(hs)
    assert statuses == ["ok"] * 4 and out == data and tiers == {"gpu", "host"}


async def test_relief_brings_the_pool_under_its_watermark(tmp_path):
    w = World(tmp_path, gpu_bytes=5 * ENTRY)
    try:
        await w.store_seq(10)  # 4 of 5 entries' room: 80% < 90%
        await w.step()
        assert w.gpu.stats().used_bytes == 4 * ENTRY
        await w.store_seq(11, chunks=1)  # 100%: above the high watermark
        await w.step()
        # relieved to at most 75%, victims (the oldest) in the arena
        assert w.gpu.stats().used_bytes <= 0.75 * 5 * ENTRY
        assert w.host.stats().used_bytes >= 2 * ENTRY
    finally:
        w.close()


async def test_tenants_have_their_own_pools_and_make_room_among_their_own(tmp_path):
    # tenant a: a pool of 2 entries; tenant b: none (its entries go to its arena)
    w = World(tmp_path, gpu_bytes=4 * ENTRY, tenants={"a": (2 * ENTRY, 8 * ENTRY), "b": (0, 8 * ENTRY)})
    try:
        hs_d, _, _ = await w.store_seq(12, chunks=2)  # the default partition's pool
        hs_a1, data_a1, ra = await w.store_seq(13, chunks=2, namespace="a:x")
        hs_a2, data_a2, _ = await w.store_seq(18, chunks=2, namespace="a:z")
        hs_b, _, rb = await w.store_seq(14, chunks=1, namespace="b:y")
        assert ra.gpu_pool.pool_id == w.gpu.info("a").pool_id and rb.gpu_pool is None
        assert {x.tier for x in rb.entries[0].extents} == {"host"}
        # a's second pair in a pool of 2 entries: its own first pair went down to its own arena; the
        # default pool kept its entries
        assert [w.entry(h, "a:x").tiers() for h in hs_a1] == [["host"], ["host"]]
        assert [w.entry(h, "a:z").tiers() for h in hs_a2] == [["gpu"], ["gpu"]]
        assert all(w.entry(h).tiers() == ["gpu"] for h in hs_d)
        assert w.host.partition_stats("a").used_bytes == 2 * ENTRY
        statuses, out, _ = await w.read_back(hs_a1, namespace="a:x")
        assert statuses == ["ok"] * 2 and out == data_a1
    finally:
        w.close()


async def test_without_a_record_tier_nothing_is_written_back(tmp_path):
    w = World(tmp_path, gpu_bytes=8 * ENTRY, ssd=False, admit_after=0)
    try:
        hs, _, _ = await w.store_seq(15)
        await w.step()
        assert all(w.entry(h).tiers() == ["gpu"] for h in hs)  # the arena is the pool's spill space only
    finally:
        w.close()


async def test_release_waits_for_nothing_on_cpu_and_counts_the_lease_per_tier(world):
    hs, _, _ = await world.store_seq(16, chunks=1, gpu=False)
    hs2, _, _ = await world.store_seq(17, chunks=1)
    statuses, _, tiers = await world.read_back(hs + hs2)
    assert statuses == ["ok", "ok"] and tiers == {"gpu", "host"}
    assert world.metric("kvd_moved_bytes_total", {"direction": "load", "tier": "host"}) == ENTRY
    assert world.metric("kvd_moved_bytes_total", {"direction": "load", "tier": "gpu"}) == ENTRY
    assert torch.equal(world.ipc.open(world.gpu.info("")), world.gpu.pool("").tensor)
