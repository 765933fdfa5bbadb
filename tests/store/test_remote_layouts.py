"""Records in the shared cluster written by daemons whose extents hold other heads (audit 5).

The model fingerprint leaves the head map out, so two hosts that register one model with different
head maps (one re-profiled) name their extents alike, ``global`` and ``local``, while these hold
other heads. Before, a host adopted the other's records (same size: same number of global heads)
and served their bytes as its own heads' KV, and a host whose record the other overwrote served
that one. Now every record says which heads it holds, and a record of another layout is a miss.
"""

from __future__ import annotations

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
