"""Regression tests of the data-safety defects found by re-checks (issue 11), through the control API.

Each test drives a real daemon application (``create_app``: arena, SSD tier, store, policies) with
the protocol's own requests, writes KV bytes through the shared-memory arena as an engine does, and
says in its docstring what broke. Every one of them failed before its fix.
"""

from __future__ import annotations

import mmap
import os

import numpy as np
import pytest
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client.parser import text_string_to_metric_families

from kvd.core.config import load_settings
from kvd.core.errors import ConfigError
from kvd.core.headmap import HeadMap
from kvd.core.keys import prefix_hashes
from kvd.daemon.service import create_app, create_metrics_app

# 2 layers x 2 KV heads; head 0 global, head 1 local (sink 4, window 256): in a 4-chunk sequence the
# local extents of chunks 1 and 2 are cold (outside sink + window), those of chunks 0 and 3 hot.
HM = HeadMap.from_classes("toy", [[True, False], [True, False]], sink=4, window=256)
MODEL = {"model_id": "toy", "num_layers": 2, "num_kv_heads": 2, "head_dim": 64,
         "head_map": HM.model_dump(mode="json", by_alias=True, exclude_none=True)}
EXTENT = 2 * 2 * 256 * 64 * 2  # one extent: 2 segments (one per layer) of K+V, 256 tokens, bf16


class Api:
    """A daemon app served in-process, with the arena mapped as an engine maps it."""

    def __init__(self, tmp_path, overrides: dict) -> None:
        o = {"host": {"capacity_bytes": 4 << 20, "slot_bytes": 128 << 10, "path": str(tmp_path / "arena")},
             "ssd": {"path": str(tmp_path / "ssd"), "admit_after": 1},
             "daemon": {"socket": str(tmp_path / "kvd.sock")}}
        for k, v in overrides.items():
            o.setdefault(k, {}).update(v)
        self.settings = load_settings(None, environ={}, overrides=o)
        self.app = create_app(self.settings)
        self.http = TestClient(TestServer(self.app))
        self.metrics_http = None
        self.fp = ""
        self.arena: mmap.mmap | None = None

    async def start(self, model: dict = MODEL) -> Api:
        await self.http.start_server()
        doc = await self.post("/v1/models", model)
        self.fp = doc["fingerprint"]
        fd = os.open(doc["arena"]["path"], os.O_RDWR)
        self.arena = mmap.mmap(fd, doc["arena"]["capacity_bytes"])
        os.close(fd)
        self.metrics_http = TestClient(TestServer(create_metrics_app(self.app)))
        await self.metrics_http.start_server()
        return self

    async def close(self) -> None:
        if self.metrics_http is not None:
            await self.metrics_http.close()
        await self.http.close()

    async def post(self, path: str, body: dict, status: int = 200) -> dict:
        r = await self.http.post(path, json=body)
        doc = await r.json()
        assert r.status == status, (path, doc)
        return doc

    def hashes(self, seed: int, chunks: int) -> list[str]:
        return prefix_hashes(np.arange(chunks * 256) + seed * 100000, chunk_tokens=256, namespace="default",
                             fingerprint=self.fp)

    async def store_seq(self, seed: int, chunks: int = 4, **extra) -> tuple[list[str], dict]:
        """Store a ``chunks``-chunk sequence of finite bf16 values; returns hashes and the bytes written."""
        hs = self.hashes(seed, chunks)
        r = await self.post("/v1/reserve", {"fingerprint": self.fp, **extra, "entries": [
            {"hash": h, "num_tokens": 256, "start_token": i * 256, "end_token": chunks * 256}
            for i, h in enumerate(hs)]})
        rng = np.random.default_rng(seed)
        data = {}
        for e in r["entries"]:
            for x in e["extents"]:
                vals = rng.standard_normal(x["nbytes"] // 2).astype(np.float32)  # finite: fp8 can scale it
                b = (vals.view(np.uint32) >> 16).astype(np.uint16).tobytes()  # bf16 = the high half of fp32
                self.arena[x["offset"] : x["offset"] + x["nbytes"]] = b
                data[(e["hash"], x["head_class"])] = b
        if r["reservation_id"]:
            await self.post("/v1/commit", {"reservation_id": r["reservation_id"]})
        return hs, data

    async def lookup(self, hs: list[str], **extra) -> dict:
        return await self.post("/v1/lookup", {"fingerprint": self.fp, "prefix_hashes": hs, "prefetch": False,
                                              **extra})

    async def read_back(self, hs: list[str], **extra) -> tuple[list[str], dict]:
        le = await self.post("/v1/lease", {"fingerprint": self.fp, "hashes": hs, "wait_s": 5, **extra})
        got = {(e["hash"], x["head_class"]): bytes(self.arena[x["offset"] : x["offset"] + x["nbytes"]])
               for e in le["entries"] if e["status"] == "ok" for x in e["extents"]}
        if le["lease_id"]:
            await self.post("/v1/release", {"lease_id": le["lease_id"]})
        return [e["status"] for e in le["entries"]], got

    async def samples(self, name: str) -> list[tuple[dict, float]]:
        text = await (await self.metrics_http.get("/metrics")).text()
        return [(s.labels, s.value) for fam in text_string_to_metric_families(text) for s in fam.samples
                if s.name == name]


@pytest.fixture
async def make_api(tmp_path):
    made: list[Api] = []

    async def make(sub: str = "a", model: dict = MODEL, **overrides) -> Api:
        (tmp_path / sub).mkdir()
        api = await Api(tmp_path / sub, overrides).start(model)
        made.append(api)
        return api

    yield make
    for api in made:
        await api.close()


async def test_lossy_cold_extents_are_never_served_to_an_exact_reader(make_api):
    """With local_cold_codec = fp8, cold local extents went to SSD quantized; a lease promoted them
    back and served the dequantized bytes as ``ok`` to an exact reader (the arena copy counted as
    lossless). Lossiness must survive promotion: the exact reader gets a miss for those entries."""
    api = await make_api(codec={"local_cold_codec": "fp8"})
    hs, data = await api.store_seq(1)
    assert (await api.post("/v1/flush", {}))["count"] == 4
    status, got = await api.read_back(hs)
    for (h, cls), b in got.items():
        assert b == data[(h, cls)], f"entry {hs.index(h)} {cls}: lossy bytes served as exact"
    assert status[0] == "ok" and status[3] == "ok"  # sink and window chunks: exact, hot
    assert status[1] != "ok" and status[2] != "ok"  # their local extents exist only as fp8
    look = await api.lookup(hs)
    assert look["num_prefix_hits"] == 1


async def test_evict_ssd_with_max_bytes_evicts_at_most_that(make_api):
    """``kvctl evict --tier ssd --max-bytes N`` wiped the whole SSD tier: the limit was ignored."""
    api = await make_api()
    for seed in range(3):
        await api.store_seq(seed, chunks=2)
    assert (await api.post("/v1/flush", {}))["count"] == 6
    before = {s.name: s for s in await stats_tiers(api)}["ssd"].num_records
    doc = await api.post("/v1/evict", {"tier": "ssd", "max_bytes": 1})
    assert doc["count"] == 1
    after = {s.name: s for s in await stats_tiers(api)}["ssd"].num_records
    assert 0 < after < before


async def test_evict_host_with_max_bytes_follows_the_eviction_policy(make_api):
    """Host eviction with ``max_bytes`` walked the index in insertion order, not the policy's order:
    the entry used a moment ago went first."""
    api = await make_api(policy={"eviction": "lru"}, ssd={"enabled": False})  # evicted = gone
    old, _ = await api.store_seq(1, chunks=1)
    new, _ = await api.store_seq(2, chunks=1)
    await api.read_back(old)  # old is now the most recently used
    doc = await api.post("/v1/evict", {"tier": "host", "max_bytes": 1})
    assert doc["count"] == 1
    assert (await api.lookup(old))["num_prefix_hits"] == 1  # kept: recently used
    assert (await api.lookup(new))["num_prefix_hits"] == 0  # the LRU victim


async def test_evicting_ssd_copies_never_leaves_partial_entries(make_api):
    """Cold local extents live only on SSD; evicting the SSD tier dropped them while the global
    extents stayed in the arena, leaving entries that exact readers can never load but that still
    occupy the arena and show up in lookups. An entry is whole or gone."""
    api = await make_api()
    hs, _ = await api.store_seq(3)
    assert (await api.post("/v1/flush", {}))["count"] == 4
    await api.post("/v1/evict", {"tier": "ssd"})
    look = await api.lookup(hs)
    assert all(r["complete"] for r in look["prefix"]), look["prefix"]
    listed = (await api.http.get("/v1/entries")).json()
    assert {e["hash"] for e in (await listed)["entries"]} == {r["hash"] for r in look["prefix"]}


async def test_reserve_that_can_never_fit_evicts_nothing(make_api):
    """A reserve larger than the whole arena evicted every entry before answering ``no_space``."""
    api = await make_api(ssd={"enabled": False})  # nothing busy with write-back: everything evictable
    hs, _ = await api.store_seq(4, chunks=2)
    r = await api.post("/v1/reserve", {"fingerprint": api.fp, "entries": [
        {"hash": "a" * 32, "num_tokens": 256 * 64}]})  # 64 chunks' worth of KV in one entry: > 4 MiB
    assert r["entries"][0]["status"] == "no_space"
    assert (await api.lookup(hs))["num_prefix_hits"] == 2


async def test_hit_tokens_never_exceed_lookup_tokens(make_api):
    """Hits were counted once per head class (and tier), and after a missing leading chunk too: the
    hit rate read above 100 %. Hit tokens are tokens a reader can load: the leading run, once."""
    api = await make_api()
    hs, _ = await api.store_seq(5, chunks=2)
    await api.lookup(hs)  # 2 chunks, both hits
    await api.lookup([api.hashes(6, 1)[0], hs[1]])  # a leading miss: nothing usable
    asked = sum(v for _, v in await api.samples("kvd_lookup_tokens_total"))
    hit = sum(v for _, v in await api.samples("kvd_hit_tokens_total"))
    assert asked == 4 * 256 and hit == 2 * 256


async def test_arena_larger_than_its_filesystem_fails_at_start(tmp_path):
    """An arena larger than /dev/shm (Docker's default is 64 MiB) was created sparse and killed the
    first engine that wrote past the real space with SIGBUS. The daemon must refuse to start, naming
    the size, the free space and the setting."""
    st = os.statvfs("/dev/shm")
    too_big = st.f_bavail * st.f_frsize + (1 << 30)
    settings = load_settings(None, environ={}, overrides={
        "host": {"capacity_bytes": too_big, "path": f"/dev/shm/kvd-test-{os.getpid()}.arena"},
        "ssd": {"enabled": False}, "daemon": {"socket": str(tmp_path / "kvd.sock")}})
    server = TestServer(create_app(settings))
    with pytest.raises(ConfigError) as err:
        await server.start_server()
    await server.close()
    msg = str(err.value)
    assert "host.capacity_bytes" in msg and "free" in msg and str(too_big) in msg
    assert not os.path.exists(settings.host.path)


async def test_two_daemons_on_one_ssd_path_refuse(make_api, tmp_path):
    """Two daemons on one SSD directory lost acknowledged writes (no lock; compaction renamed the
    file under the other). The second one must exit with a clear error."""
    first = await make_api("a")
    (tmp_path / "b").mkdir()
    other = Api(tmp_path / "b", {"ssd": {"path": first.settings.ssd.path}})
    with pytest.raises(ConfigError, match="in use"):
        await other.start()
    await other.close()


def test_default_ssd_path_depends_on_the_instance():
    """The default SSD path was per user, so two daemons with different sockets shared it."""
    a = load_settings(None, environ={}, overrides={"daemon": {"socket": "/tmp/a/kvd.sock"}})
    b = load_settings(None, environ={}, overrides={"daemon": {"socket": "/tmp/b/kvd.sock"}})
    assert a.ssd_path() != b.ssd_path()


async def test_head_map_of_another_model_is_refused(make_api):
    """A head map made for another model (another fingerprint) was accepted silently."""
    api = await make_api()
    wrong = HM.model_copy(update={"fingerprint": "0" * 32})
    doc = await api.post("/v1/models", {**MODEL, "model_id": "toy2",
                                         "head_map": wrong.model_dump(mode="json", by_alias=True)}, status=409)
    assert "head map" in doc["message"]


async def test_kv_computed_under_a_head_map_is_not_served_to_an_exact_reader(make_api):
    """KV computed under windowed attention (the transformers adapter with a head map) could be
    loaded by an exact engine of the same model. Entries record what they were computed under."""
    api = await make_api()
    tag = "hm-" + "1" * 16
    hs, data = await api.store_seq(7, chunks=2, computed_under=tag)
    assert (await api.lookup(hs))["num_prefix_hits"] == 0
    status, got = await api.read_back(hs)
    assert status == ["missing", "missing"] and got == {}
    assert (await api.lookup(hs, computed_under=tag))["num_prefix_hits"] == 2
    status, got = await api.read_back(hs, computed_under=tag)
    assert status == ["ok", "ok"] and got == data


async def stats_tiers(api: Api):
    from types import SimpleNamespace

    doc = await (await api.http.get("/v1/stats")).json()
    return [SimpleNamespace(**t) for t in doc["tiers"]]


async def test_the_background_loop_ends_when_cancelled_as_it_wakes(make_api):
    """The daemon's shutdown cancels the background loop and waits for it. The loop slept with
    ``asyncio.wait_for(wake.wait(), 0.2)``, which on Python 3.11 swallows a cancel that arrives as the
    wake-up fires: the loop then ran on and the shutdown hung for good (seen once as a test teardown
    that never ended). Here the wake-up and the cancel land in the same tick."""
    import asyncio

    api = await make_api()
    bg = api.app[__import__("kvd.daemon.api", fromlist=["STORE"]).STORE].background
    for _ in range(20):
        task = asyncio.create_task(bg.run())
        await asyncio.sleep(0.01)
        bg._wake.set()
        await asyncio.sleep(0)  # the wait on the wake-up event has completed, the loop not resumed yet
        task.cancel()
        done, _ = await asyncio.wait({task}, timeout=2)
        assert task in done and task.cancelled(), "the background loop went on after its cancel"
