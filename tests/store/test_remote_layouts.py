"""Records in the shared cluster written by daemons whose extents hold other heads (audit 5).

The model fingerprint leaves the head map out, so two hosts that register one model with different
head maps (one re-profiled) name their extents alike, ``global`` and ``local``, while these hold
other heads. Before, a host adopted the other's records (same size: same number of global heads)
and served their bytes as its own heads' KV, and a host whose record the other overwrote served
that one. Now every record says which heads it holds, and a record of another layout is a miss.
"""

from __future__ import annotations

import asyncio
import uuid

import numpy as np

from kvd.core.headmap import HeadMap
from kvd.daemon.api import STORE
from tests.store.test_defects import MODEL, Api
from tests.store.test_remote_hosts import remote, wait_for

# MODEL's map has head 0 global and head 1 local in both layers; this one the other way round: the
# same number of global heads, so the extents have the same names and sizes but other heads.
SWAPPED = HeadMap.from_classes("toy", [[False, True], [False, True]], sink=4, window=256)
MODEL_SWAPPED = {**MODEL, "head_map": SWAPPED.model_dump(mode="json", by_alias=True, exclude_none=True)}


async def _written(api: Api, hs: list[str]) -> None:
    store = api.app[STORE]

    async def written():
        await store.background.step()
        return all("remote" in x.copies for h in hs for x in store.index.get(("default", api.fp, h)).extents.values())
    await wait_for(written)


async def _store_other_bytes(api: Api, hs: list[str]) -> dict:
    """Store the entries ``hs`` with bytes of another seed than ``store_seq``'s (the same prompt computed
    on another host's heads)."""
    r = await api.post("/v1/reserve", {"fingerprint": api.fp, "entries": [
        {"hash": h, "num_tokens": 256, "start_token": i * 256, "end_token": len(hs) * 256} for i, h in enumerate(hs)]})
    data, rng = {}, np.random.default_rng(99)
    for e in r["entries"]:
        for x in e["extents"]:
            b = (rng.standard_normal(x["nbytes"] // 2).astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)
            api.arena[x["offset"] : x["offset"] + x["nbytes"]] = data[(e["hash"], x["head_class"])] = b.tobytes()
    await api.post("/v1/commit", {"reservation_id": r["reservation_id"]})
    return data


async def test_records_of_another_head_map_are_never_served(tmp_path, redis_cluster):
    over = {"remote": {**remote(redis_cluster, "l" + uuid.uuid4().hex[:8]), "write_policy": {"local": "write_through"}},
            "ssd": {"enabled": False}}
    made = []
    try:
        for name, model in (("a", MODEL), ("b", MODEL_SWAPPED)):
            (tmp_path / name).mkdir()
            made.append(await Api(tmp_path / name, over).start(model))
        a, b = made
        assert a.fp == b.fp  # one model: the head map is not part of the fingerprint
        hs, data_a = await a.store_seq(1, chunks=2)
        await _written(a, hs)

        # B finds A's entries in the cluster: their extents hold other heads than B's of the same name
        assert (await b.lookup(hs))["num_prefix_hits"] == 0
        status, got = await b.read_back(hs)
        assert status == ["missing", "missing"] and got == {}

        # B stores the same prompt and writes it through, over A's records (one key per extent name);
        # A, whose arena no longer holds it, reads the cluster: B's records are not A's KV
        data_b = await _store_other_bytes(b, hs)
        await _written(b, hs)
        assert (await a.post("/v1/evict", {"tier": "host"}))["count"] == 2
        status, got = await a.read_back(hs)
        assert all(got[k] == data_a[k] for k in got), "another head map's KV served as this host's"
        assert status == ["missing", "missing"]
        assert await b.read_back(hs) == (["ok", "ok"], data_b)  # B's own records are left in the cluster
    finally:
        for api in made:
            await api.close()


async def test_a_record_found_gone_is_not_a_hit_again(tmp_path, redis_cluster):
    """The cluster's LRU dropped a record whose manifest (small, read by every find) it kept. Before, every
    lookup on another host adopted the entry again from the manifest and answered it as a hit, and
    every lease of it missed, for as long as the manifest lived. Now a host that found the record gone
    leaves that manifest field out of its finds (nothing is deleted from the cluster); the record
    written again (a new field) is found again."""
    from tests.store.test_defects import MODEL as WITH_LOCAL
    from tests.store.test_remote_hosts import two_hosts

    async with two_hosts(tmp_path, redis_cluster, WITH_LOCAL, ssd={"enabled": False}) as (a, b):
        hs, data = await a.store_seq(5, chunks=4)
        assert (await a.post("/v1/flush", {}))["count"] == 4  # every extent in the cluster
        tier = a.app[STORE].index.by_name["remote"].tier
        e = a.app[STORE].index.get(("default", a.fp, hs[0]))
        tier.client.delete(*tier.record_keys(e.extents["local"].copies["remote"].loc.key))  # evicted
        assert (await b.lookup(hs))["num_prefix_hits"] == 4  # B cannot know before it reads
        assert (await b.read_back(hs[:1]))[0] == ["missing"]
        for _ in range(2):
            assert (await b.lookup(hs))["num_prefix_hits"] == 0  # chunk 0's local heads are not there
            assert (await b.read_back(hs[:1]))[0] == ["missing"]
        assert set(tier.client.hgetall(tier.manifest_key("default", a.fp, hs[0]))) == {b"global", b"local"}

        assert (await a.post("/v1/delete", {"fingerprint": a.fp, "hashes": hs[:1]}))["count"] == 1
        await wait_for(lambda: asyncio.to_thread(lambda: not tier.client.hgetall(
            tier.manifest_key("default", a.fp, hs[0]))))
        again = (await a.store_seq(5, chunks=4))[1]  # chunk 0 stored again (the others are there)
        assert again == {k: v for k, v in data.items() if k[0] == hs[0]}
        assert (await a.post("/v1/flush", {}))["count"] == 4
        assert (await b.lookup(hs))["num_prefix_hits"] == 4
        assert await b.read_back(hs) == (["ok"] * 4, data)
