"""Defects found by the 2026-12-07 audit of the store's races (each test failed before its fix)."""

import pytest

from kvd.core import protocol as P
from tests.store.test_store import commit, hashes, lease, reserve, store  # noqa: F401 - fixture


async def test_a_key_deleted_twice_while_leased_frees_both_entries(store):  # noqa: F811
    """Delete an entry while leased (doomed), store the same key again, lease and delete that one too:
    ``doomed`` held one entry per key, the second replaced the first, whose arena slots were then
    never freed at its release (a leak for the daemon's life)."""
    h = hashes(1)
    await commit(store, (await reserve(store, h)).reservation_id)
    le1 = await lease(store, h)
    assert store.delete(P.EntriesRequest(fingerprint=store.fp, hashes=h)).count == 1
    await commit(store, (await reserve(store, h)).reservation_id)  # the same prefix, stored again
    le2 = await lease(store, h)
    assert le2.entries[0].status == "ok"
    assert store.delete(P.EntriesRequest(fingerprint=store.fp, hashes=h)).count == 1
    store.release(P.ReleaseRequest(lease_id=le1.lease_id))
    store.release(P.ReleaseRequest(lease_id=le2.lease_id))
    assert store.host.stats().used_bytes == 0


async def test_a_key_stored_again_while_its_deleted_entry_is_leased_is_written_down(tmp_path):
    """Delete an entry with an SSD record while a reader holds it (doomed: its record stays until the
    release), store the same prefix again and flush it: the new entry's record has the same key, and
    the SSD tier's reserve asserted "already reserved or stored" (a 500 on flush, on the reserve whose
    eviction writes it down, and write-back never wrote it)."""
    from tests.store.test_pipeline import World

    w = World(tmp_path)
    try:
        hs, _ = await w.store_seq(31, chunks=1)
        assert await w.store.flush(P.FlushRequest()) is not None
        assert all("ssd" in x.copies for x in w.entry(hs[0]).extents.values())
        le = await w.store.lease(P.LeaseRequest(fingerprint=w.fp, hashes=hs))
        assert w.store.delete(P.EntriesRequest(fingerprint=w.fp, hashes=hs)).count == 1
        hs2, data = await w.store_seq(31, chunks=1)
        assert hs2 == hs
        assert (await w.store.flush(P.FlushRequest())).count == 1
        w.store.release(P.ReleaseRequest(lease_id=le.lease_id))
        await w.store.pipeline.drain()
        w.store.pipeline.drop_copies(w.entry(hs[0]), w.store.index.levels[0])  # SSD only now
        status, got = await w.read_back(hs)
        assert status == ["ok"] and got == data
    finally:
        w.close()


def tenant_store(tmp_path, arenas: dict[str, int]):
    """A store whose arena is split per tenant (namespace = tenant), as ``kvd.daemon.tenants`` builds it."""
    from kvd.core.config import load_settings
    from kvd.daemon.metrics import Metrics
    from kvd.store.store import Store
    from kvd.tiers.host import ArenaSpec, HostTier
    from tests.fakes import FakeClock
    from tests.store.test_store import HM, POOL

    slot = 128 << 10
    settings = load_settings(None, environ={}, overrides={"policy": {"eviction": "lru"}})
    host = HostTier(tmp_path / "unused", 0, slot, partition_of=lambda ns: ns if ns in arenas else "",
                    partitions={p: ArenaSpec(tmp_path / f"arena-{p or 'default'}", n) for p, n in arenas.items()})
    s = Store(settings, [host], metrics=Metrics(), cpu=POOL, io=POOL, clock=FakeClock(),
              partition_of=host.partition_of)
    s.fp = s.register_model(P.RegisterModelRequest(model_id="toy", num_layers=2, num_kv_heads=2, head_dim=64,
                                                   head_map=HM)).fingerprint
    return s


async def store_in(s, namespace: str, hs: list[str]) -> None:
    r = await s.reserve(P.ReserveRequest(fingerprint=s.fp, namespace=namespace, entries=[
        P.ReserveEntry(hash=h, num_tokens=256, start_token=256 * i) for i, h in enumerate(hs)]))
    assert all(e.status == "reserved" for e in r.entries)
    await s.commit(P.CommitRequest(reservation_id=r.reservation_id))


async def test_watermark_relief_never_evicts_another_tenants_entries(tmp_path):
    """Tenant a fills its own (large) arena; tenant b's arena is half empty. Relief compared the usage
    of all arenas together with the watermarks and took victims among every tenant's entries: b's
    entries were evicted (lost: no SSD) to make room in a's arena, which that cannot even do
    (docs/security.md: a tenant filling its arena evicts only its own entries)."""
    s = tenant_store(tmp_path, {"": 256 << 10, "a": 8 << 20, "b": 1 << 20})
    try:
        b_hs = hashes(2, start=100)
        await store_in(s, "b", b_hs)  # 512 KiB of b's 1 MiB, and the oldest entries
        await store_in(s, "a", hashes(32))  # a's 8 MiB arena, full
        await s.background.relieve()
        found = await s.lookup(P.LookupRequest(fingerprint=s.fp, namespace="b", prefix_hashes=b_hs))
        assert found.num_prefix_hits == 2, "tenant b's entries were evicted by tenant a's pressure"
        assert s.host.partition_stats("a").usage <= s.settings.host.low_watermark  # a relieved, of its own
    finally:
        s.host.close()


@pytest.mark.parametrize("error", ["InvalidRequest", "MemoryError"])
async def test_a_failed_promotion_frees_its_slots_only_after_every_decode_into_them_ended(tmp_path, error):
    """A promotion decodes each extent into its reserved arena slots on the CPU pool, all at once
    (``asyncio.gather``). When one fetch raised something other than the three errors ``_fetch``
    tells apart (e.g. ``InvalidRequest`` from ``decode_record_into``, a record of another size under
    the same key), the slots were given back at once while the other decodes still wrote into them:
    slots another writer may hold by then. And the promotion failed with an exception instead of a miss."""
    import time

    from kvd.core.errors import InvalidRequest
    from tests.store.test_pipeline import World

    w = World(tmp_path)
    try:
        hs, data = await w.store_seq(41, chunks=1)
        await w.store.flush(P.FlushRequest())
        e = w.entry(hs[0])
        w.store.pipeline.drop_copies(e, w.store.index.levels[0])  # SSD only now
        forms = w.store.pipeline.forms
        real, events = forms.place_into, []

        def place_into(src, copy, data, out, layout):
            if out.nbytes == e.extents["global"].nbytes and not events:
                events.append("raised")
                raise InvalidRequest("output buffer of another size") if error == "InvalidRequest" else MemoryError()
            time.sleep(0.3)
            events.append("decoded")
            return real(src, copy, data, out, layout)

        discard = w.store.pipeline.discard

        def discard_logged(lv, locs):
            if lv.name == "host" and locs:
                events.append("freed")
            return discard(lv, locs)

        forms.place_into = place_into
        w.store.pipeline.discard = discard_logged
        status, _ = await w.read_back(hs)
        if error == "InvalidRequest":
            assert status == ["missing"]  # a record that does not decode is a miss, and dropped as corrupt
        else:
            assert events.index("decoded") < events.index("freed"), events
    finally:
        w.close()


async def test_a_reserve_that_fails_half_way_leaves_no_pending_key_nor_slots(tmp_path):
    """A reserve whose eviction fails with an unexpected error (here the SSD tier's LMDB raising while
    the victims are written down) answered 500 and left the new key pending for ever: every later
    writer of that prefix was told "exists", every reader missed it, and the slots its earlier
    extents took were never given back."""
    import lmdb

    from tests.store.test_pipeline import World

    w = World(tmp_path)
    try:
        w.settings.ssd.admit_after = 1
        w.settings.host.high_watermark = 1.0
        await w.store_seq(10)
        await w.store_seq(11)  # the arena is full; every entry admitted, none on SSD yet
        assert w.host.stats().usage == 1.0
        real = w.ssd.write_many

        def broken(items):
            raise lmdb.PanicError("injected")

        w.ssd.write_many = broken
        hs = prefix_hashes_of(w, 12)
        req = P.ReserveRequest(fingerprint=w.fp, entries=[P.ReserveEntry(hash=hs[0], num_tokens=256)])
        with pytest.raises(lmdb.Error):
            await w.store.reserve(req)
        w.ssd.write_many = real
        assert ("default", w.fp, hs[0]) not in w.store.index.pending
        r = await w.store.reserve(req)
        assert r.entries[0].status == "reserved"
    finally:
        w.close()


def prefix_hashes_of(w, seed: int) -> list[str]:
    import numpy as np

    from kvd.core.keys import prefix_hashes

    return prefix_hashes(np.arange(256) + seed * 100000, chunk_tokens=256, namespace="default", fingerprint=w.fp)
