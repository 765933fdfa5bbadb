"""Defects found by the 2026-12-07 audit of the store's races (each test failed before its fix)."""

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
