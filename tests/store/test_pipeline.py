"""Scenario tests of arena <-> SSD movement: admission, placement, demotion, prefetch, corruption, restart."""

import asyncio
import resource
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import xxhash

from kvd.core import protocol as P
from kvd.core.config import load_settings
from kvd.core.headmap import HeadMap
from kvd.core.keys import prefix_hashes
from kvd.daemon.metrics import Metrics
from kvd.store.recovery import recover
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
    def __init__(self, tmp_path, policy="lru", tenancy=None, model=MODEL, **over):
        self.tmp_path, self.policy, self.over, self.model = tmp_path, policy, over, model
        self.tenancy = tenancy or {}  # Store's partition_of / quotas, as kvd.daemon.tenants gives them
        self.clock = FakeClock()
        self.cpu, self.io = ThreadPoolExecutor(2), ThreadPoolExecutor(2)  # as the daemon: CPU work apart from I/O
        self.open()

    def open(self):
        o = {"host": {"capacity_bytes": 2 << 20, "slot_bytes": 128 << 10}, "ssd": {"admit_after": 2},
             "policy": {"eviction": self.policy}}
        for k, v in self.over.items():
            o.setdefault(k, {}).update(v)
        self.settings = load_settings(None, environ={}, overrides=o)
        self.host = HostTier(self.tmp_path / "arena", int(self.settings.host.capacity_bytes),
                             int(self.settings.host.slot_bytes))
        self.ssd = SsdTier(self.tmp_path / "ssd", self.settings.ssd)
        self.store = Store(self.settings, [self.host, self.ssd], metrics=Metrics(), cpu=self.cpu, io=self.io,
                           clock=self.clock, **self.tenancy)
        self.fp = self.store.register_model(self.model).fingerprint

    async def step(self):
        await self.store.background.step()
        await self.store.pipeline.drain()

    async def restart(self):
        await self.store.background.close()
        await self.store.admin.close()
        self.ssd.close()
        self.host.close()
        self.open()
        return await recover(self.store)

    def close(self):
        self.ssd.close()
        self.host.close()
        self.cpu.shutdown()
        self.io.shutdown()

    def entry(self, h):
        return self.store.index.get(("default", self.fp, h))

    def metric(self, name, labels=None):
        return self.store.metrics.registry.get_sample_value(name, labels or {}) or 0

    async def store_seq(self, seed: int, chunks: int = 4, namespace: str = "default", computed_under: str = "exact",
                        writer_sums: dict | None = None):
        """Store a ``chunks``-chunk sequence of finite bf16 values; returns hashes and the bytes.
        ``writer_sums``: commit with the writer's checksums of every extent (``Reservation.written``),
        overridden per ``(chunk, head class)`` by the dict's values."""
        hs = prefix_hashes(np.arange(chunks * 256) + seed * 100000, chunk_tokens=256, namespace=namespace,
                           fingerprint=self.fp, computed_under=computed_under)
        r = await self.store.reserve(P.ReserveRequest(fingerprint=self.fp, namespace=namespace,
                                                      computed_under=computed_under, entries=[
            P.ReserveEntry(hash=h, num_tokens=256, start_token=i * 256, end_token=chunks * 256)
            for i, h in enumerate(hs)]))
        data = {}
        rng = np.random.default_rng(seed)
        for e in r.entries:
            for x in e.extents:
                # finite values (KV-like): a lossy codec really quantizes them (random bit patterns hold
                # NaN/Inf, which fp8 cannot scale, so it would fall back to lossless)
                vals = rng.standard_normal(x.nbytes // 2).astype(np.float32)
                b = (vals.view(np.uint32) >> 16).astype(np.uint16).tobytes()
                self.host.view[x.offset : x.offset + x.nbytes] = b
                data[(e.hash, x.head_class)] = b
        sums = None if writer_sums is None else {e.hash: [
            writer_sums.get((i, x.head_class), xxhash.xxh3_64_hexdigest(data[(e.hash, x.head_class)]))
            for x in e.extents] for i, e in enumerate(r.entries)}
        await self.store.commit(P.CommitRequest(reservation_id=r.reservation_id, checksums=sums))
        return hs, data

    async def lookup(self, hs, prefetch=False):
        return await self.store.lookup(P.LookupRequest(fingerprint=self.fp, prefix_hashes=hs, prefetch=prefetch))

    async def read_back(self, hs, classes=None, accept_lossy=False):
        le = await self.store.lease(P.LeaseRequest(fingerprint=self.fp, hashes=hs, classes=classes, wait_s=5,
                                                   accept_lossy=accept_lossy))
        out = {(e.hash, x.head_class): bytes(self.host.view[x.offset : x.offset + x.nbytes])
               for e in le.entries if e.status == "ok" for x in e.extents}
        if le.lease_id:
            self.store.release(P.ReleaseRequest(lease_id=le.lease_id))
        return [e.status for e in le.entries], out


@pytest.fixture(params=["lru", "cost_aware"])
async def world(tmp_path, request):
    w = World(tmp_path, policy=request.param)
    yield w
    w.close()


async def test_admission_then_write_back_with_head_aware_placement(world):
    hs, data = await world.store_seq(1)
    await world.step()
    assert world.ssd.stats().num_records == 0  # seen once: not admitted
    assert (await world.lookup(hs)).num_prefix_hits == 4  # seen twice now: admitted
    await world.step()
    e = [world.entry(h) for h in hs]
    assert all("ssd" in x.copies for en in e for x in en.extents.values())
    # Global extents and local extents of chunks 0 (sink) and 3 (window) stay hot; chunks 1, 2 local go cold.
    assert ["host" in en.extents["local"].copies for en in e] == [True, False, False, True]
    assert all("host" in en.extents["global"].copies for en in e)
    status, got = await world.read_back(hs)  # cold extents are promoted back for an exact reader
    assert status == ["ok"] * 4 and got == data


async def test_write_back_waits_for_loads_in_flight_then_goes_on(tmp_path):
    """The lookup hit that admits an entry is followed by its lease: the write-back waits for the lease to
    end (and waits no longer than ``ssd.yield_to_loads_s`` when it never ends)."""
    w = World(tmp_path, ssd={"yield_to_loads_s": 30})
    try:
        hs, data = await w.store_seq(1)
        assert (await w.lookup(hs)).num_prefix_hits == 4  # second sighting: admitted, queued
        le = await w.store.lease(P.LeaseRequest(fingerprint=w.fp, hashes=hs))
        step = asyncio.ensure_future(w.step())
        await asyncio.sleep(0.4)
        assert not step.done() and w.ssd.stats().num_records == 0  # waiting: the engine is loading
        w.store.release(P.ReleaseRequest(lease_id=le.lease_id))
        await asyncio.wait_for(step, 10)
        assert w.ssd.stats().num_records > 0
        assert 0.4 <= w.metric("kvd_background_yield_seconds_total") < 10
        status, got = await w.read_back(hs)
        assert status == ["ok"] * 4 and got == data

        # A lease that is never released: the next batch waits yield_to_loads_s, then writes anyway.
        w.settings.ssd.yield_to_loads_s = 0.3
        hs2, _ = await w.store_seq(2)
        await w.lookup(hs2)
        held = await w.store.lease(P.LeaseRequest(fingerprint=w.fp, hashes=hs2))
        before = w.ssd.stats().num_records
        await asyncio.wait_for(w.step(), 10)
        assert w.ssd.stats().num_records > before
        w.store.release(P.ReleaseRequest(lease_id=held.lease_id))
    finally:
        w.close()


async def test_pressure_demotes_under_the_low_watermark_and_reads_back_exactly(world):
    world.settings.ssd.admit_after = 1
    world.settings.host.low_watermark = 0.25
    world.settings.host.high_watermark = 0.5
    seqs = []
    for seed in range(2):  # 2 × 4 entries × 2 extents × 128 KiB = 2 MiB = the whole arena
        seqs.append(await world.store_seq(seed))
    assert world.host.stats().usage > world.settings.host.high_watermark
    await world.step()
    assert world.host.stats().usage <= world.settings.host.low_watermark
    for hs, data in seqs:
        status, got = await world.read_back(hs)
        assert status == ["ok"] * 4 and got == data
    assert world.metric("kvd_promotions_total", {"tier": "ssd", "head_class": "global"}) > 0


async def test_arena_never_grows_past_capacity_and_says_no_space(world):
    world.settings.ssd.admit_after = 1
    for seed in range(6):
        await world.store_seq(seed)
        assert world.host.stats().used_bytes <= world.host.capacity_bytes
        await world.step()
        assert world.host.stats().usage <= world.settings.host.high_watermark
    hs, _ = await world.store_seq(99)
    le = await world.store.lease(P.LeaseRequest(fingerprint=world.fp, hashes=hs))
    for s in range(100, 103):
        await world.store_seq(s)
    # An entry larger than the arena: no_space at once, nothing evicted for it.
    before = world.host.stats().used_bytes
    r = await world.store.reserve(P.ReserveRequest(fingerprint=world.fp, entries=[P.ReserveEntry(
        hash="a" * 32, num_tokens=256 * 40)]))
    assert r.entries[0].status == "no_space" and world.host.stats().used_bytes == before
    world.store.release(P.ReleaseRequest(lease_id=le.lease_id))


async def test_reserve_on_a_full_arena_writes_admitted_victims_back_before_dropping_them(world):
    """One eviction path: a reserve that needs room demotes admitted victims (they stay readable from
    SSD) instead of dropping them from the arena unwritten."""
    world.settings.ssd.admit_after = 1
    world.settings.host.high_watermark = 1.0  # no background relief: the reserve itself must make room
    first, data = await world.store_seq(10)
    await world.store_seq(11)
    assert world.host.stats().usage == 1.0 and world.ssd.stats().num_records == 0
    await world.store_seq(12, chunks=1)  # needs 2 slots in a full arena
    assert world.ssd.stats().num_records > 0
    status, got = await world.read_back(first)
    assert status == ["ok"] * 4 and got == data


async def test_corrupt_ssd_record_is_a_miss_never_served(world):
    world.settings.ssd.admit_after = 1
    hs, data = await world.store_seq(3, chunks=1)
    await world.step()
    e = world.entry(hs[0])
    world.store.pipeline.drop_copies(e, world.store.index.levels[0])  # host copies gone: SSD only
    loc = e.extents["global"].copies["ssd"].loc
    with world.ssd._env.begin(write=True, db=world.ssd._data) as txn:  # flip bytes in the payload
        v = bytearray(txn.get(loc.key, db=world.ssd._data))
        v[-100] ^= 0xFF
        txn.put(loc.key, bytes(v), db=world.ssd._data)
    status, got = await world.read_back(hs)
    assert status == ["missing"] and got == {}
    assert world.metric("kvd_checksum_failures_total", {"tier": "ssd"}) == 1
    assert world.entry(hs[0]) is None  # an entry missing an extent is not kept


async def test_restart_keeps_ssd_contents(world):
    world.settings.ssd.admit_after = 1
    hs, data = await world.store_seq(4)
    await world.step()
    assert await world.restart() == 4
    res = (await world.lookup(hs))
    assert res.num_prefix_hits == 4 and {r.tier for r in res.prefix} == {"ssd"}
    status, got = await world.read_back(hs)
    assert status == ["ok"] * 4 and got == data


async def test_drop_codec_keeps_only_what_local_heads_need(tmp_path):
    w = World(tmp_path, codec={"local_cold_codec": "drop"}, ssd={"admit_after": 1})
    try:
        hs, data = await w.store_seq(5)
        await w.step()
        res = (await w.lookup(hs))
        # Chunks 1 and 2 let their (cold) local extents go: incomplete for an exact reader...
        assert res.num_prefix_hits == 1 and [r.complete for r in res.prefix] == [True, False, False, True]
        # ...but a head-aware reader that needs only global heads there still gets them.
        status, got = await w.read_back(hs[1:3], classes=["global"])
        assert status == ["ok", "ok"] and got == {k: v for k, v in data.items() if k[0] in hs[1:3] and k[1] == "global"}
        assert w.metric("kvd_dropped_cold_extents_total") == 2
    finally:
        w.close()


@pytest.mark.parametrize("codec", ["fp8", "int8"])
async def test_lossy_cold_extents_stay_lossy_through_promotion(tmp_path, codec):
    """Regression (issue 11): a promoted extent counted as lossless, so dequantized bytes reached
    exact readers. The old test of this could never run: random bit patterns hold NaN/Inf, so the
    codec always fell back to lossless."""
    w = World(tmp_path, codec={"local_cold_codec": codec}, ssd={"admit_after": 1})
    try:
        hs, data = await w.store_seq(6)
        await w.step()
        e = w.entry(hs[1])
        assert e.extents["local"].copies["ssd"].codec == codec and "host" not in e.extents["local"].copies
        assert not (await w.lookup(hs)).prefix[1].complete and (await w.lookup(hs)).num_prefix_hits == 1
        status, got = await w.read_back(hs[1:2])  # an exact reader: a miss, never approximate bytes
        assert status == ["missing"] and got == {}
        status, got = await w.read_back(hs[1:2], accept_lossy=True)  # a reader that accepts them
        assert status == ["ok"]
        assert got[(hs[1], "global")] == data[(hs[1], "global")]  # global: exact
        approx = np.frombuffer(got[(hs[1], "local")], dtype=np.uint16).astype(np.uint32) << 16
        exact = np.frombuffer(data[(hs[1], "local")], dtype=np.uint16).astype(np.uint32) << 16
        err = np.abs(approx.view(np.float32) - exact.view(np.float32)).max()
        assert 0 < err < 0.6  # quantized, close
        assert w.entry(hs[1]).extents["local"].copies["host"].is_lossy  # and flagged so in the arena
        status, _ = await w.read_back(hs[1:2])  # still a miss for the exact reader afterwards
        assert status == ["missing"]
    finally:
        w.close()


async def test_flush_ignores_admission_and_ssd_full_evicts(tmp_path):
    w = World(tmp_path, ssd={"admit_after": 100, "capacity_bytes": 10 * EXTENT})  # 8 extents fit, not 16
    try:
        hs, _ = await w.store_seq(7)
        assert await w.store.admin.flush(P.FlushRequest()) == 4
        assert w.ssd.stats().num_records == 8
        hs2, _ = await w.store_seq(8)
        assert await w.store.admin.flush(P.FlushRequest()) >= 1
        await w.store.pipeline.drain()
        assert w.ssd.stats().used_bytes <= w.ssd.capacity_bytes
        assert w.metric("kvd_evicted_entries_total", {"tier": "ssd"}) >= 1
    finally:
        w.close()


async def test_a_tenants_ssd_quota_evicts_only_its_own_entries(tmp_path):
    """Tenant "a" may hold 512 KiB on SSD (about four extents' records); "b" has no quota. Writing a's
    sequences one after another evicts a's oldest SSD copies, never b's; a's usage never passes the
    quota (the extents of one write-back batch count before they are indexed) nor falls far below it."""
    quota = 4 * EXTENT
    w = World(tmp_path, tenancy={"partition_of": lambda ns: ns,
                                 "quotas": {"ssd": lambda p: quota if p == "a" else None}},
              host={"capacity_bytes": 8 << 20})
    try:
        w.settings.ssd.admit_after = 1
        b_hs, b_data = await w.store_seq(0, chunks=2, namespace="b")
        await w.step()
        a_seqs = []
        for seed in range(1, 7):
            a_seqs.append((await w.store_seq(seed, chunks=1, namespace="a"))[0][0])
            await w.step()
            assert w.store.index.usage("ssd", "a") <= quota
        ssd_records = lambda ns: [x.copies["ssd"].loc.nbytes for e in w.store.index  # noqa: E731
                                  if e.namespace == ns for x in e.extents.values() if "ssd" in x.copies]
        a_records = ssd_records("a")
        assert w.store.index.usage("ssd", "a") == sum(a_records) > quota - 2 * max(a_records)
        on_ssd = lambda h: any("ssd" in x.copies  # noqa: E731
                               for x in w.store.index.get(("a", w.fp, h)).extents.values())
        assert not on_ssd(a_seqs[0]) and on_ssd(a_seqs[-1])  # the oldest made room for the newest
        assert len(ssd_records("b")) == 4  # b's 2 chunks x 2 extents untouched
        le = await w.store.lease(P.LeaseRequest(fingerprint=w.fp, namespace="b", hashes=b_hs, wait_s=5))
        got = {(e.hash, x.head_class): bytes(w.host.view[x.offset: x.offset + x.nbytes])
               for e in le.entries for x in e.extents}
        w.store.release(P.ReleaseRequest(lease_id=le.lease_id))
        assert got == b_data
    finally:
        w.close()


async def test_a_record_written_again_while_its_old_copy_is_being_dropped_waits_for_the_drop(world):
    """SSD drops run on the I/O executor; an extent written down again before its old record's drop
    ran reserved a key the tier still held (an assertion: 500 on /v1/reserve under eviction churn)."""
    world.settings.ssd.admit_after = 1
    hs, data = await world.store_seq(21, chunks=1)
    await world.step()
    e = world.entry(hs[0])
    ssd = world.store.index.by_name["ssd"]
    assert all("ssd" in x.copies for x in e.extents.values())
    gate = threading.Event()  # the I/O executor is busy: the drop stays queued until the gate opens
    for _ in range(2):
        world.io.submit(gate.wait, 10)
    asyncio.get_running_loop().call_later(0.3, gate.set)
    dropping = world.store.pipeline.drop_copies(e, ssd)
    assert dropping is not None and not dropping.done()
    assert await world.store.pipeline.write_down([e], world.store.index.levels[0]) == len(e.extents)
    assert dropping.done() and all("ssd" in x.copies for x in e.extents.values())
    world.store.pipeline.drop_copies(e, world.store.index.levels[0])  # SSD only now
    status, got = await world.read_back(hs)
    assert status == ["ok"] and got == data


async def test_lookup_rows_follow_an_entry_down_to_ssd_and_back(tmp_path):
    """Each entry caches its lookup row (kvd.store.entries.Copies): the row a lookup answers must
    change with every move of the entry's copies, never lag behind one."""
    w = World(tmp_path, ssd={"admit_after": 1})
    try:
        hs, data = await w.store_seq(5, chunks=2)
        assert {r.tier for r in (await w.lookup(hs)).prefix} == {"host"}  # cached now
        await w.store.admin.flush(P.FlushRequest())
        await w.step()
        assert {r.tier for r in (await w.lookup(hs)).prefix} == {"host"}  # on SSD too: still read from host
        done = await w.store.admin.evict(P.EvictRequest(tier="host", max_bytes=1 << 40))
        await w.store.pipeline.drain()
        assert done.count == 2 and all(not w.entry(h).in_tier("host") for h in hs)
        res = await w.lookup(hs)
        assert res.num_prefix_hits == 2 and {r.tier for r in res.prefix} == {"ssd"}
        await w.lookup(hs, prefetch=True)  # starts bringing them back to the arena
        status, got = await w.read_back(hs)  # the lease waits for those promotions
        assert status == ["ok", "ok"] and got == data
        assert {r.tier for r in (await w.lookup(hs)).prefix} == {"host"}
    finally:
        w.close()


async def test_a_full_disk_fails_writes_down_as_ssd_full_and_relief_goes_on(tmp_path):
    """A full disk makes LMDB's commit fail with a plain ``lmdb.Error`` (a short write is EIO, a file size
    limit EFBIG), not ``MapFullError``/``DiskError``: it escaped ``write_many`` as an unexpected error, so
    every write-down raised, watermark relief (and every promotion or reserve that had to evict an
    admitted entry) failed each round, and no write failure was counted. The disk is made full here by a
    file size limit at the LMDB file's current size (any growth fails)."""
    w = World(tmp_path, ssd={"admit_after": 1}, host={"low_watermark": 0.25, "high_watermark": 0.5})
    try:
        for seed in range(2):  # the whole arena, every entry admitted
            await w.store_seq(seed)
        size = (tmp_path / "ssd" / "data.mdb").stat().st_size
        old = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (size, old[1]))
        try:
            await w.store.background.step()
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, old)
        await w.store.pipeline.drain()
        assert w.host.stats().usage <= 0.25  # relieved: the victims could not be kept, as on SsdFull
        assert w.metric("kvd_tier_write_failures_total", {"tier": "ssd"}) > 0
        assert w.ssd.stats().num_records == 0 and w.ssd.stats().used_bytes == 0  # no reservation left behind
        hs, data = await w.store_seq(5, chunks=1)  # room again: writes go on
        await w.step()
        assert w.ssd.stats().num_records == 2 and await w.read_back(hs) == (["ok"], data)
    finally:
        w.close()


async def test_an_ssd_over_its_capacity_after_a_restart_makes_room_for_the_next_write(tmp_path):
    """``ssd.capacity_bytes`` lowered across a restart: the tier holds more than its budget. A write then
    evicted victims worth only its own size, still found no room, and failed, each time (entries evicted
    for nothing, the budget exceeded until enough writes had failed). It now frees the excess too."""
    w = World(tmp_path, host={"capacity_bytes": 4 << 20}, ssd={"admit_after": 1, "capacity_bytes": 64 * EXTENT})
    try:
        for seed in range(4):
            await w.store_seq(seed)
            await w.step()
        assert w.ssd.stats().num_records == 32
        w.over["ssd"]["capacity_bytes"] = 8 * EXTENT  # less than the records there take
        assert await w.restart() == 16 and w.ssd.stats().used_bytes > w.ssd.capacity_bytes
        hs, data = await w.store_seq(9, chunks=1)
        await w.step()
        assert w.metric("kvd_tier_write_failures_total", {"tier": "ssd"}) == 0
        assert all("ssd" in x.copies for x in w.entry(hs[0]).extents.values())
        assert w.ssd.stats().used_bytes <= w.ssd.capacity_bytes
        w.store.pipeline.drop_copies(w.entry(hs[0]), w.store.index.levels[0])  # on SSD only now
        assert await w.read_back(hs) == (["ok"], data)
    finally:
        w.close()


async def test_an_entry_deleted_while_its_promotion_makes_room_is_a_plain_miss(tmp_path):
    """A promotion picks its sources, then reserves arena slots (evicting, writing victims down); an
    entry deleted meanwhile has no SSD copy left, and the fetch raised KeyError: logged as a failed
    promotion with a traceback and counted in ``kvd_errors_total{kind="promote"}``. It is a miss."""
    w = World(tmp_path, ssd={"admit_after": 1}, host={"high_watermark": 1.0})
    try:
        hs, _ = await w.store_seq(1, chunks=1)
        await w.step()
        w.store.pipeline.drop_copies(w.entry(hs[0]), w.store.index.levels[0])  # on SSD only
        await w.store_seq(2)
        await w.store_seq(3)  # the arena is full of admitted entries with no copy below yet
        gate = threading.Event()  # the I/O executor is busy: the victims' write-down waits for the gate
        for _ in range(2):
            w.io.submit(gate.wait, 10)
        lease = asyncio.create_task(w.store.lease(P.LeaseRequest(fingerprint=w.fp, hashes=hs, wait_s=5)))
        await asyncio.sleep(0.1)
        assert w.store.delete(P.EntriesRequest(fingerprint=w.fp, hashes=hs)).count == 1
        gate.set()
        assert [e.status for e in (await lease).entries] == ["missing"]
        await w.store.pipeline.drain()
        assert w.metric("kvd_errors_total", {"kind": "promote"}) == 0
        assert w.host.stats().used_bytes == sum(c.loc.nbytes for e in w.store.index
                                                for x in e.extents.values() if (c := x.copies.get("host")))
    finally:
        w.close()


async def test_an_entry_deleted_while_its_record_is_read_is_a_miss_not_a_checksum_failure(tmp_path):
    """A delete drops an entry's SSD records on another I/O thread while a promotion reads one: the read
    finds the key gone, which a store whose index says it is there takes for damage. The entry is gone
    meanwhile, so it is a plain miss: no ``kvd_checksum_failures_total``, no "not served" error (audit 9)."""
    w = World(tmp_path, ssd={"admit_after": 1})
    try:
        hs, _ = await w.store_seq(1, chunks=1)
        await w.step()
        w.store.pipeline.drop_copies(w.entry(hs[0]), w.store.index.levels[0])  # on SSD only
        reading, deleted = threading.Event(), threading.Event()
        real_read = w.ssd.read

        def read_after_the_delete(loc):  # the promotion's read of one extent, held until the drop ran
            if b"\x1fglobal\x1f" in loc.key:  # (the other I/O thread stays free for the drop)
                reading.set()
                assert deleted.wait(10)
            return real_read(loc)
        w.ssd.read = read_after_the_delete
        lease = asyncio.create_task(w.store.lease(P.LeaseRequest(fingerprint=w.fp, hashes=hs, wait_s=5)))
        while not reading.is_set():
            await asyncio.sleep(0.01)
        keys = [x.copies["ssd"].loc.key for x in w.entry(hs[0]).extents.values()]
        assert w.store.delete(P.EntriesRequest(fingerprint=w.fp, hashes=hs)).count == 1

        def on_disk() -> bool:
            with w.ssd._env.begin(db=w.ssd._data) as txn:
                return any(txn.get(k) is not None for k in keys)
        while on_disk():  # the drop, on the other I/O thread
            await asyncio.sleep(0.01)
        deleted.set()
        assert [e.status for e in (await lease).entries] == ["missing"]
        await w.store.pipeline.drain()
        assert w.metric("kvd_checksum_failures_total", {"tier": "ssd"}) == 0
    finally:
        w.close()


async def test_a_failed_write_is_counted_as_refused_not_as_records_deleted(tmp_path):
    """A write-down that LMDB could not take gave its reservations back through the record-drop path,
    which counted each one in ``kvd_tier_drops_total`` ("records deleted"): every refused record read
    as refused *and* deleted on the dashboard, though nothing was ever written or deleted."""
    w = World(tmp_path, ssd={"admit_after": 1}, host={"low_watermark": 0.25, "high_watermark": 0.5})
    try:
        for seed in range(2):
            await w.store_seq(seed)
        size = (tmp_path / "ssd" / "data.mdb").stat().st_size
        old = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (size, old[1]))  # the disk is full: every commit fails
        try:
            await w.store.background.step()
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, old)
        await w.store.pipeline.drain()
        assert w.metric("kvd_tier_write_failures_total", {"tier": "ssd"}) > 0
        assert w.metric("kvd_tier_writes_total", {"tier": "ssd"}) == 0 and w.ssd.stats().num_records == 0
        assert w.metric("kvd_tier_drops_total", {"tier": "ssd"}) == 0
        hs, _ = await w.store_seq(5, chunks=1)  # room again: written, then deleted: one drop per record
        await w.step()
        written = w.metric("kvd_tier_writes_total", {"tier": "ssd"})
        assert written == w.ssd.stats().num_records == 2
        w.store.delete(P.EntriesRequest(fingerprint=w.fp, hashes=hs))
        await w.store.pipeline.drain()
        assert w.metric("kvd_tier_drops_total", {"tier": "ssd"}) == written and w.ssd.stats().num_records == 0
    finally:
        w.close()


async def test_tier_io_latency_is_labelled_by_the_operations_the_readme_names(tmp_path):
    """``kvd_tier_io_seconds{op}`` named inner helper functions (``drop_all``, ``produce``) for drops
    and record reads (audit 12): its ops are the documented ones."""
    w = World(tmp_path, ssd={"admit_after": 1})
    try:
        hs, _ = await w.store_seq(1, chunks=2)
        await w.step()  # written down
        w.store.pipeline.drop_copies(w.entry(hs[0]), w.store.index.levels[0])
        await w.store.lease(P.LeaseRequest(fingerprint=w.fp, hashes=hs[:1], wait_s=5))  # read back up
        w.store.delete(P.EntriesRequest(fingerprint=w.fp, hashes=hs))
        await w.store.pipeline.drain()
        ops = {s.labels["op"] for m in w.store.metrics.registry.collect() if m.name == "kvd_tier_io_seconds"
               for s in m.samples if s.name.endswith("_count")}
        assert {"write_many", "read", "drop"} <= ops <= {"read", "write_many", "drop", "find", "scan", "get_meta",
                                                         "put_meta"}, ops
    finally:
        w.close()
