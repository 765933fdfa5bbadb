"""Two daemons (two hosts: their own sockets, arenas and SSD directories) sharing one real Redis
Cluster: what one host stores, the other finds and loads bit for bit, in one round trip per lookup;
faults of the cluster are misses, never wrong KV."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
import uuid

import pytest

from kvd.core.errors import ConfigError
from kvd.daemon.api import STORE
from tests.store.test_defects import Api

MODEL = {"model_id": "toy", "num_layers": 2, "num_kv_heads": 2, "head_dim": 64}  # every head global


def remote(cluster, prefix: str, **kw) -> dict:
    return {"enabled": True, "startup_nodes": cluster.startup_nodes, "key_prefix": prefix, "timeout_s": 0.3, **kw}


@contextlib.asynccontextmanager
async def two_hosts(tmp_path, cluster, model=MODEL, **over):
    """Hosts a and b (their own sockets, arenas and SSD directories) on one cluster, one key prefix."""
    prefix = "h" + uuid.uuid4().hex[:8]
    made = []
    try:
        for name in ("a", "b"):
            (tmp_path / name).mkdir()
            made.append(await Api(tmp_path / name, {"remote": remote(cluster, prefix), **over}).start(model))
        yield made
    finally:
        for api in made:
            await api.close()


@pytest.fixture
async def hosts(tmp_path, redis_cluster):
    prefix = "h" + uuid.uuid4().hex[:8]
    made = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        made.append(await Api(tmp_path / name, {"remote": remote(redis_cluster, prefix)}).start(MODEL))
    yield made
    for api in made:
        await api.close()


async def wait_for(cond, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not await cond():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.05)


async def test_an_entry_stored_on_one_host_is_loaded_on_another(hosts, redis_cluster):
    a, b = hosts
    hs, data = await a.store_seq(1, chunks=8)

    async def written_through():
        return (await a.http.get("/v1/entries?tier=remote")).status == 200 and len(
            (await (await a.http.get("/v1/entries?tier=remote")).json())["entries"]) == 8
    await wait_for(written_through)  # write-through runs in the background

    tier = b.app[STORE].index.by_name["remote"].tier
    finds, pipelines = [], []  # the manifests' reads: kvd.tiers.resp's per-node pipelines, else redis-py's
    real_find, real_pipe = tier._fast.hgetall_many, tier.client.pipeline
    tier._fast.hgetall_many = lambda nodes: finds.append(nodes) or real_find(nodes)
    tier.client.pipeline = lambda *a_, **k: pipelines.append(1) or real_pipe(*a_, **k)
    calls = redis_cluster.command_calls("hgetall")
    look = await b.lookup(hs)
    assert look["num_prefix_hits"] == 8 and {r["tier"] for r in look["prefix"]} == {"remote"}
    # one round trip: one pipelined write per node, each manifest read once, no redis-py fallback
    assert len(finds) == 1 and sum(len(k) for k in finds[0].values()) == 8 and pipelines == []
    assert redis_cluster.command_calls("hgetall") - calls == 8
    status, got = await b.read_back(hs)
    assert status == ["ok"] * 8 and got == data  # bit for bit, decoded and verified
    assert (await b.lookup(hs))["prefix"][0]["tier"] == "host"  # promoted into b's arena


async def test_lookups_that_miss_while_a_find_is_in_flight_share_the_next_round_trip(tmp_path, redis_cluster):
    """Four engines look up four prompts on B at once: the first lookup's find goes alone, the other
    three wait for it and go out together (kvd.store.shared_find); every lookup finds its prompt."""
    slow = remote(redis_cluster, "c" + uuid.uuid4().hex[:8], lookup_deadline_s=10)  # the held find is waited for
    async with two_hosts(tmp_path, redis_cluster, remote=slow) as (a, b):
        await _coalesced(a, b, redis_cluster)


async def _coalesced(a, b, redis_cluster) -> None:
    seqs = [await a.store_seq(10 + i, chunks=2) for i in range(4)]

    async def written_through():
        got = await (await a.http.get("/v1/entries?tier=remote")).json()
        return len(got.get("entries", [])) == 8
    await wait_for(written_through)
    store = b.app[STORE]
    tier = store.index.by_name["remote"].tier
    finds, gate = [], threading.Event()
    real_find = tier._fast.hgetall_many

    def held_find(nodes):  # the first round trip is held until the others have asked
        finds.append(sum(len(k) for k in nodes.values()))
        if len(finds) == 1:
            gate.wait(10)
        return real_find(nodes)
    tier._fast.hgetall_many = held_find
    calls = redis_cluster.command_calls("hgetall")
    first = asyncio.create_task(b.lookup(seqs[0][0]))
    await wait_for(lambda: asyncio.sleep(0, len(finds) == 1))
    others = [asyncio.create_task(b.lookup(hs)) for hs, _ in seqs[1:]]
    await wait_for(lambda: asyncio.sleep(0, store.finds.waiting("remote") == 6))
    gate.set()
    looks = [await first, *await asyncio.gather(*others)]
    assert [x["num_prefix_hits"] for x in looks] == [2, 2, 2, 2]
    assert finds == [2, 6]  # two round trips for four lookups, each manifest read once
    assert redis_cluster.command_calls("hgetall") - calls == 8


async def test_exact_extents_go_to_the_cluster_raw_when_configured(tmp_path, redis_cluster):
    """remote.exact_codec = "raw": the records host A writes are raw (the manifest and the record
    header say so, and they are the size of the KV plus a header); host B loads them bit for bit."""
    prefix = "r" + uuid.uuid4().hex[:8]
    made = []
    try:
        for name in ("a", "b"):
            (tmp_path / name).mkdir()
            made.append(await Api(tmp_path / name, {"remote": remote(redis_cluster, prefix, exact_codec="raw")}
                                  ).start(MODEL))
        a, b = made
        hs, data = await a.store_seq(3, chunks=4)

        async def written_through():
            got = await (await a.http.get("/v1/entries?tier=remote")).json()
            return len(got.get("entries", [])) == 4
        await wait_for(written_through)
        tier = b.app[STORE].index.by_name["remote"].tier
        found = await asyncio.to_thread(tier.find, [("default", a.fp, h) for h in hs])
        assert found and {r.codec for r in found} == {"raw"}
        assert all(r.location.nbytes - r.raw_nbytes < 512 for r in found)  # uncompressed: KV + header
        status, got = await b.read_back(hs)
        assert status == ["ok"] * 4 and got == data
    finally:
        for api in made:
            await api.close()


async def test_lookup_of_what_nobody_stored_costs_one_round_trip_and_misses(hosts):
    _, b = hosts
    look = await b.lookup(b.hashes(99, 4))
    assert look["num_prefix_hits"] == 0 and look["prefix"] == []


async def test_flipped_bytes_in_the_cluster_are_a_miss(hosts):
    a, b = hosts
    hs, _ = await a.store_seq(2, chunks=1)
    store_a = a.app[STORE]
    e = store_a.index.get(("default", a.fp, hs[0]))

    async def written_through():  # by the daemon's own background loop, or this step
        await store_a.background.step()
        return "remote" in e.extents["global"].copies
    await wait_for(written_through)
    tier = store_a.index.by_name["remote"].tier
    for k in tier.record_keys(e.extents["global"].copies["remote"].loc.key):
        v = bytearray(tier.client.get(k))
        v[-5] ^= 0xFF
        tier.client.set(k, bytes(v))
    status, got = await b.read_back(hs)
    assert status == ["missing"] and got == {}
    samples = await b.samples("kvd_checksum_failures_total")
    assert any(lbl.get("tier") == "remote" and v >= 1 for lbl, v in samples)


async def test_cluster_down_at_start_follows_remote_required(tmp_path):
    down = {"enabled": True, "startup_nodes": ["127.0.0.1:1"], "timeout_s": 0.2}
    (tmp_path / "a").mkdir()
    api = Api(tmp_path / "a", {"remote": {**down, "required": True}})
    with pytest.raises(ConfigError, match="cannot be reached.*remote.required"):
        await api.start(MODEL)
    await api.close()
    (tmp_path / "b").mkdir()
    api = await Api(tmp_path / "b", {"remote": down}).start(MODEL)  # not required: serves without it
    hs, data = await api.store_seq(3, chunks=1)
    status, got = await api.read_back(hs)
    assert status == ["ok"] and got == data
    await api.close()


async def test_a_master_killed_during_loads_serves_no_wrong_kv(tmp_path, redis_cluster_factory):
    cluster = redis_cluster_factory()
    prefix = "k" + uuid.uuid4().hex[:8]
    apis = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        apis.append(await Api(tmp_path / name, {"remote": remote(cluster, prefix)}).start(MODEL))
    a, b = apis
    try:
        seqs = [await a.store_seq(10 + i, chunks=2) for i in range(6)]
        store_a = a.app[STORE]
        await store_a.background.step()
        victim = cluster.masters()[0]
        # Redis replicates asynchronously: a record (or an entry's manifest) acknowledged just before its
        # master dies may be lost with it, and that entry is then a miss for good. That loss is not
        # what this test is about (no wrong KV during a failover, every entry back after it), so the
        # replicas first catch up, as tests/tiers/test_remote.py does (docs/remote.md, "Faults").
        cluster.wait_replicated(victim)
        cluster.kill(victim)
        for hs, data in seqs:  # during the failover: hits or misses, never wrong bytes
            status, got = await b.read_back(hs)
            assert all(got[k] == data[k] for k in got)
        cluster.wait_ok()

        for hs, data in seqs:  # after the replica's promotion: every entry again, once the breaker's
            got = {}  # back-off has passed and the client has learnt the new layout

            async def loaded(hs=hs, got=got):
                status, out = await b.read_back(hs)
                got.update(out)
                return status == ["ok", "ok"]
            await wait_for(loaded, timeout=20)
            assert got == data
    finally:
        for api in apis:
            await api.close()


async def test_an_entry_seen_before_its_local_extents_were_written_is_completed_later(tmp_path, redis_cluster):
    """Host B looked up A's entries after A wrote their global extents through (at commit) and before
    A wrote the local ones back: B indexed them with those extents missing, never asked again, and
    every later exact lookup on B missed although the cluster had the whole entries (the vLLM
    cross-host TTFT run loaded 0 to 1,280 of 3,840 tokens). Now B asks again for what it lacks."""
    from tests.store.test_defects import MODEL as WITH_LOCAL

    async with two_hosts(tmp_path, redis_cluster, WITH_LOCAL, ssd={"enabled": False}) as (a, b):
        hs, data = await a.store_seq(4, chunks=4)
        store_a = a.app[STORE]
        await store_a.background.step()  # global and hot local extents written through, cold local ones not

        async def through_written():
            entries = (await (await a.http.get("/v1/entries?tier=remote")).json())["entries"]
            return len(entries) == 4
        await wait_for(through_written)
        local_there = ["remote" in store_a.index.get(("default", a.fp, h)).extents["local"].copies for h in hs]
        assert local_there == [True, False, False, True]  # the sink chunk and the last window: hot
        assert (await b.lookup(hs))["num_prefix_hits"] == 1  # exact reader: chunk 1's local heads are not there

        assert (await a.post("/v1/flush", {}))["count"] == 4  # A writes its local extents to the cluster
        look = await b.lookup(hs)
        assert look["num_prefix_hits"] == 4 and {r["tier"] for r in look["prefix"]} == {"remote"}
        store_b = b.app[STORE]
        held = [store_b.index.get(("default", b.fp, h)) for h in hs]  # the added copies are on B's books
        assert store_b.index.usage("remote", "") == sum(x.copies["remote"].loc.nbytes for e in held
                                                        for x in e.extents.values())
        status, got = await b.read_back(hs)
        assert status == ["ok"] * 4 and got == data


@pytest.mark.parametrize(("policy", "local_there"), [
    ({"local": "write_through"}, [True, True, True, True]),  # every extent at commit
    ({"local_hot": "off"}, [False, False, False, False]),  # hot local extents kept off the cluster
])
async def test_the_write_policy_of_hot_and_cold_local_extents_is_followed(tmp_path, redis_cluster, policy, local_there):
    from tests.store.test_defects import MODEL as WITH_LOCAL

    (tmp_path / "a").mkdir()
    a = await Api(tmp_path / "a", {"remote": {**remote(redis_cluster, "w" + uuid.uuid4().hex[:8]),
                                              "write_policy": policy}, "ssd": {"enabled": False}}).start(WITH_LOCAL)
    try:
        hs, _ = await a.store_seq(5, chunks=4)
        store_a = a.app[STORE]
        await store_a.background.step()

        async def globals_written():
            return all("remote" in store_a.index.get(("default", a.fp, h)).extents["global"].copies for h in hs)
        await wait_for(globals_written)
        got = ["remote" in store_a.index.get(("default", a.fp, h)).extents["local"].copies for h in hs]
        assert got == local_there
    finally:
        await a.close()


async def test_trimmed_extents_are_found_and_loaded_on_another_host(tmp_path, redis_cluster):
    """Capacity mode on both hosts: host a's trimmed extents (the sink chunk's local groups, 4 tokens)
    reach the cluster as they are, host b rebuilds them with their span from the record's name alone and
    gives a head-aware reader the same tokens; an exact reader of the same KV gets a miss."""
    from tests.store.test_readers import MODEL as WIN
    from tests.store.test_readers import TAG
    from tests.store.test_trim import TRIMMED, tokens_of

    prefix = "t" + uuid.uuid4().hex[:8]
    made = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        made.append(await Api(tmp_path / name, {"remote": remote(redis_cluster, prefix),
                                                "codec": {"local_cold_codec": "drop"}}).start(
            WIN.model_dump(mode="json", exclude_none=True)))
    a, b = made
    try:
        hs, data = await a.store_seq(3, chunks=8, computed_under=TAG)
        store_a = a.app[STORE]

        async def written_through():
            await store_a.background.step()
            return all("remote" in store_a.index.get(("default", a.fp, hs[i])).extents[c].copies for i, c in TRIMMED)
        await wait_for(written_through)
        reader = {"computed_under": TAG, "reader": "head_aware", "head_map": TAG}
        look = await b.lookup(hs, **reader)
        assert look["num_prefix_hits"] == 8
        le = await b.post("/v1/lease", {"fingerprint": b.fp, "hashes": hs, "wait_s": 5, "position": 2048, **reader})
        assert [e["status"] for e in le["entries"]] == ["ok"] * 8
        for i, e in enumerate(le["entries"]):
            for x in e["extents"]:
                span = TRIMMED.get((i, x["head_class"]))
                assert (tuple(x["tokens"]) if x["tokens"] else None) == span
                want = data[(e["hash"], x["head_class"])]
                got = bytes(b.arena[x["offset"]: x["offset"] + x["nbytes"]])
                assert got == (want if span is None else tokens_of(want, 2, *span)), (i, x["head_class"])
        await b.post("/v1/release", {"lease_id": le["lease_id"]})
        exact = await b.lookup(hs[:1], computed_under=TAG)
        assert exact["num_prefix_hits"] == 0
    finally:
        for api in made:
            await api.close()


async def test_a_host_that_finds_a_record_missing_leaves_the_others_in_the_cluster(tmp_path, redis_cluster):
    """Host B reads an entry one of whose records is gone from the cluster (lost with a master): the
    entry is a miss on B and leaves B's index, but its other records and manifest stay in the cluster,
    where other hosts still find them. Before, B deleted them for everyone, so one lost record made the
    whole entry disappear (a lead for the master-kill test's intermittent miss, docs/remote.md). An
    operator's delete still deletes from the cluster."""
    from tests.store.test_defects import MODEL as WITH_LOCAL

    async with two_hosts(tmp_path, redis_cluster, WITH_LOCAL, ssd={"enabled": False}) as (a, b):
        hs, _ = await a.store_seq(5, chunks=4)
        assert (await a.post("/v1/flush", {}))["count"] == 4  # every extent in the cluster
        store_a = a.app[STORE]
        tier = store_a.index.by_name["remote"].tier
        e = store_a.index.get(("default", a.fp, hs[0]))
        keys = {c: tier.record_keys(x.copies["remote"].loc.key) for c, x in e.extents.items()}
        assert (await b.lookup(hs))["num_prefix_hits"] == 4  # B indexes them
        tier.client.delete(*keys["local"])  # the local record is lost
        status, _ = await b.read_back(hs[:1])
        assert status == ["missing"]
        assert all(tier.client.exists(k) for k in keys["global"])  # the other records stay
        assert set(tier.client.hgetall(tier.manifest_key("default", a.fp, hs[0]))) == {b"global", b"local"}
        assert (await a.post("/v1/delete", {"fingerprint": a.fp, "hashes": hs[1:2]}))["count"] == 1  # an operator's delete
        e1 = tier.manifest_key("default", a.fp, hs[1])

        async def deleted():  # the cluster's records are dropped on the I/O executor
            return tier.client.hgetall(e1) == {}
        await wait_for(deleted)


async def test_a_write_through_that_fails_is_tried_again_later(tmp_path, redis_cluster):
    """A write-through that fails because the cluster went down (a master killed mid-write) leaves the
    entries queued: once the breaker's back-off has passed they are written, and another host loads
    them. Before, they left the queue unwritten and stayed on the writing host only (the master-kill
    test's intermittent miss)."""
    async with two_hosts(tmp_path, redis_cluster) as (a, b):
        store_a = a.app[STORE]
        tier = store_a.index.by_name["remote"].tier
        real, calls = tier.write_many, []

        def failing_once(items):
            calls.append(len(items))
            if len(calls) == 1:  # the master dies during the first write
                raise tier._trip("write", ConnectionError("connection refused (test: the master died)"))
            return real(items)
        tier.write_many = failing_once
        hs, data = await a.store_seq(7, chunks=2)

        async def written():
            await store_a.background.step()
            return all("remote" in x.copies for h in hs for x in store_a.index.get(("default", a.fp, h)).extents.values())
        await wait_for(written, timeout=10)
        assert len(calls) >= 2
        assert (await b.lookup(hs))["num_prefix_hits"] == 2
        status, got = await b.read_back(hs)
        assert status == ["ok", "ok"] and got == data


async def test_a_cluster_that_joins_later_gets_the_registrations_made_before(tmp_path, redis_cluster):
    """A daemon that started while the cluster was down (``join_remote_later``) writes its models'
    registrations there when the cluster joins, as it does for every registration made after: other
    hosts' start-up rebuilds need them to index this host's records (audit 5)."""
    from concurrent.futures import ThreadPoolExecutor

    from kvd.core.config import load_settings
    from kvd.daemon.build import remote_tier
    from kvd.store.admin import MODEL_META

    a = await Api(tmp_path, {}).start(MODEL)  # no remote tier yet; the model registered
    io = ThreadPoolExecutor(1)
    try:
        settings = load_settings(None, environ={}, overrides={"remote": remote(redis_cluster, "j" + uuid.uuid4().hex[:8])})
        tier = await remote_tier(settings, io)
        assert tier is not None
        a.app[STORE].add_tier(tier)

        async def persisted():
            return await asyncio.get_running_loop().run_in_executor(io, tier.get_meta, MODEL_META + a.fp) is not None
        await wait_for(persisted)
        doc = await asyncio.get_running_loop().run_in_executor(io, tier.get_meta, MODEL_META + a.fp)
        assert b'"model_id":"toy"' in doc and f'"fingerprint":"{a.fp}"'.encode() in doc
    finally:
        await a.close()
        io.shutdown()


async def test_a_record_of_a_newer_format_is_a_miss_and_stays_in_the_cluster(hosts):
    """During a rolling upgrade a newer kvd writes records of a format this one cannot read: a host
    of this version misses them, and leaves them in the cluster for the hosts that can (before, it
    counted them as corrupt and deleted them for everyone)."""
    import xxhash

    from kvd.tiers.record import RECORD_FORMAT, RECORD_HEAD

    a, b = hosts
    hs, _ = await a.store_seq(6, chunks=1)
    store_a = a.app[STORE]
    e = store_a.index.get(("default", a.fp, hs[0]))

    async def written_through():
        await store_a.background.step()
        return "remote" in e.extents["global"].copies
    await wait_for(written_through)
    tier = store_a.index.by_name["remote"].tier
    keys = tier.record_keys(e.extents["global"].copies["remote"].loc.key)
    for k in keys:  # the same record, as format RECORD_FORMAT + 1 would head it (header checksum valid)
        v = bytearray(tier.client.get(k))
        fields = list(RECORD_HEAD.unpack_from(v))
        fields[1] = RECORD_FORMAT + 1
        RECORD_HEAD.pack_into(v, 0, *fields)
        end = RECORD_HEAD.size + fields[-2] + fields[-1]
        v[end : end + 8] = xxhash.xxh3_64_intdigest(bytes(v[:end])).to_bytes(8, "little")
        tier.client.set(k, bytes(v))
    status, got = await b.read_back(hs)
    assert status == ["missing"] and got == {}
    assert all(tier.client.exists(k) for k in keys)  # left for the hosts that read it
