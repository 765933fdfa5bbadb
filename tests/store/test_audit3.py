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
