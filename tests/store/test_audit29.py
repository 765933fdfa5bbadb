"""Defects found by audit 29 (admin actions, recovery, holds)."""

from __future__ import annotations

import uuid

from kvd.daemon.api import STORE
from tests.store.test_defects import MODEL, Api, make_api  # noqa: F401 - a fixture
from tests.store.test_remote_hosts import remote
from tests.store.test_remote_layouts import MODEL_SWAPPED, _store_other_bytes, _written


async def test_a_shared_record_of_another_layout_does_not_make_recovery_drop_the_ssd_copies(tmp_path, redis_cluster):
    """Host A keeps an entry on its SSD; host B (the same model under another head map) writes the same
    names into the cluster. At A's restart the entry's records were rebuilt together: B's cluster
    records did not fit A's layout, so the whole entry was refused and A's own, good SSD records were
    dropped as orphans. A shared tier's misfit is only left out; A serves its SSD copy."""
    prefix = "l" + uuid.uuid4().hex[:8]
    later = {c: "write_back" for c in ("global", "local_hot", "local")}  # A's entries go to its SSD only
    over = {"remote": {**remote(redis_cluster, prefix), "write_policy": later}}
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = await Api(tmp_path / "a", over).start(MODEL)
    b = await Api(tmp_path / "b", {"remote": {**remote(redis_cluster, prefix), "write_policy": {"local": "write_through"}},
                                   "ssd": {"enabled": False}}).start(MODEL_SWAPPED)
    try:
        hs, data_a = await a.store_seq(1, chunks=2)
        assert (await a.post("/v1/flush", {}))["count"] == 2
        ssd = a.app[STORE].index.by_name["ssd"].tier
        assert len(ssd.scan()) == 4  # both extents of both entries, on A's SSD only
        await _store_other_bytes(b, hs)  # over A's records in the cluster
        await _written(b, hs)
        await a.close()
        a = await Api(tmp_path / "a", over).start(MODEL)
        store = a.app[STORE]
        assert all(store.index.get(("default", a.fp, h)) is not None for h in hs), "A's SSD entries dropped"
        assert await a.read_back(hs) == (["ok", "ok"], data_a)
    finally:
        await a.close()
        await b.close()


async def test_a_host_restarts_with_its_own_registration_not_the_one_another_host_left_in_the_cluster(
        tmp_path, redis_cluster):
    """A registers the model and writes its entries through to the cluster (none on its SSD yet); B
    registers the same model under another head map, which overwrites the cluster's registration
    record. At A's restart the rebuild took the model's registration from the cluster, B's, though A's
    SSD kept A's own: A then adopted B's entries and refused its own engine's registration (409,
    'registered with another head map and has stored entries'). Its own tiers' registration wins."""
    prefix = "l" + uuid.uuid4().hex[:8]
    over = {"remote": {**remote(redis_cluster, prefix), "write_policy": {"local": "write_through"}}}
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = await Api(tmp_path / "a", over).start(MODEL)
    b = await Api(tmp_path / "b", {**over, "ssd": {"enabled": False}}).start(MODEL_SWAPPED)
    try:
        hs, data_a = await a.store_seq(1, chunks=2)
        await _written(a, hs)
        data_b = await _store_other_bytes(b, hs)  # over A's records and registration in the cluster
        await _written(b, hs)
        await a.close()
        a = await Api(tmp_path / "a", over).start(MODEL)  # 409 before
        status, got = await a.read_back(hs)
        assert all(got[k] == data_a[k] for k in got) and not any(got[k] == data_b[k] for k in got)
        assert status == ["missing", "missing"]  # the cluster holds B's heads only
        assert await b.read_back(hs) == (["ok", "ok"], data_b)
    finally:
        await a.close()
        await b.close()


async def test_flush_counts_an_entry_named_twice_once(make_api):  # noqa: F811
    """Flush by hashes wrote an entry once per time its hash was named, in one batch: the second copy's
    SSD reservation of the same record key failed an assertion (500), and the reservations made before
    it in the batch were never written nor given back, so the key stayed 'already reserved' and the
    entry could never reach SSD again (every later flush or demotion of it failed the same way). An
    entry named twice is written (and counted) once, as delete, pin and unpin count it."""
    api = await make_api(ssd={"admit_after": 5})
    hs, _ = await api.store_seq(1, chunks=2)
    body = {"namespace": "default", "fingerprint": api.fp}
    assert (await api.post("/v1/flush", {**body, "hashes": [hs[0], hs[1], hs[0]]}))["count"] == 2
    assert (await api.post("/v1/flush", {**body, "hashes": hs}))["count"] == 2
    assert api.app[STORE].index.by_name["ssd"].tier.stats().used_bytes == sum(
        c.loc.nbytes for h in hs for x in api.app[STORE].index.get(("default", api.fp, h)).extents.values()
        for t, c in x.copies.items() if t == "ssd")
