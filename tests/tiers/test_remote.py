"""The remote tier against a real Redis Cluster (3 masters + 3 replicas on loopback): records, replicas,
manifests and find, scan, faults (a killed master, flipped bytes, wrong credentials, no cluster)."""

from __future__ import annotations

import time
import uuid

import numpy as np
import pytest

from kvd.codecs import Codecs, raw_nbytes
from kvd.core.config import RemoteSettings
from kvd.core.errors import ConfigError, CorruptData, RecordMissing, TierUnavailable
from kvd.tiers.base import ExtentName
from kvd.tiers.record import decode_record_into, encode_record
from kvd.tiers.remote import RemoteTier, connect

CODECS = Codecs()
SHAPE = (2, 64, 32)
FP = "f" * 32


def kv(seed: int) -> bytes:
    x = np.random.default_rng(seed).standard_normal(raw_nbytes("bfloat16", SHAPE) // 2).astype(np.float32)
    return (x.view(np.uint32) >> 16).astype(np.uint16).tobytes()


def name(h: str, cls: str = "global", ns: str = "default") -> ExtentName:
    return ExtentName(ns, FP, h, cls, "prefix", 0, 64, 64, "exact")


def settings(cluster, **kw) -> RemoteSettings:
    return RemoteSettings(enabled=True, startup_nodes=cluster.startup_nodes, key_prefix="t" + uuid.uuid4().hex[:8],
                          **kw)


@pytest.fixture
def tier(redis_cluster):
    s = settings(redis_cluster)
    t = RemoteTier(connect(s), s)
    yield t
    t.close()


def put(tier: RemoteTier, n: ExtentName, raw: bytes, codec: str = "lossless"):
    rec = encode_record(CODECS, n, raw, dtype="bfloat16", shape=SHAPE, codec=codec)
    loc = tier.reserve(len(rec.data), n)
    tier.write(loc, rec.data)
    return loc, rec


def get(tier: RemoteTier, loc) -> bytes:
    out = bytearray(raw_nbytes("bfloat16", SHAPE))
    decode_record_into(CODECS, tier.read(loc), loc.key, out)
    return bytes(out)


@pytest.mark.parametrize("codec", ["raw", "lossless", "fp8"])
def test_round_trip_and_find(tier, codec):
    loc, rec = put(tier, name("a" * 32), kv(1), codec)
    assert tier.read(loc) == rec.data
    if codec != "fp8":
        assert get(tier, loc) == kv(1)
    found = tier.find([("default", FP, "a" * 32), ("default", FP, "b" * 32)])
    assert [(r.name, r.codec, r.raw_xxh) for r in found] == [(name("a" * 32), codec, rec.raw_xxh)]


def test_find_reads_manifests_on_its_own_pipeline_and_agrees_with_redis_py(tier, monkeypatch):
    """Finds read the manifests on kvd.tiers.resp's per-node pipelines: the same records as redis-py's
    cluster pipeline for the same keys (present, absent, spread over every master). A reply only the
    client can follow (here: every key sent to the wrong node, answered -MOVED) falls back to
    redis-py, and the find still answers right."""
    stored = {f"{h:032x}": put(tier, name(f"{h:032x}", cls), kv(h))[1]
              for h in range(40) for cls in (("global", "local.0") if h % 3 else ("global",))}
    keys = [("default", FP, f"{h:032x}") for h in range(48)]  # 8 never stored
    mkeys = [tier.manifest_key(*k) for k in keys]
    pipe = tier.client.pipeline(transaction=False)
    for k in mkeys:
        pipe.hgetall(k)
    assert tier._fast_find(mkeys) == pipe.execute()
    found = tier.find(keys)
    assert sorted((r.name.hash, r.name.head_class) for r in found) == sorted(
        (h, c) for h in stored for c in (("global", "local.0") if int(h, 16) % 3 else ("global",)))
    assert all(r.raw_xxh == stored[r.name.hash].raw_xxh for r in found if r.name.head_class == "global")

    masters = tier.client.get_primaries()
    wrong = {m.port: masters[(i + 1) % len(masters)] for i, m in enumerate(masters)}
    real = tier.client.get_node_from_key
    monkeypatch.setattr(tier.client, "get_node_from_key", lambda k, replica=False: wrong[real(k).port])
    assert tier._fast_find(mkeys) is None  # -MOVED: not followed here
    assert sorted((r.name.hash, r.name.head_class) for r in tier.find(keys)) == sorted(
        (r.name.hash, r.name.head_class) for r in found)


def test_extents_spread_over_slots_and_global_ones_are_replicated(tier, redis_cluster):
    keys = [k for h in range(12) for k in tier.record_keys(put(tier, name(f"{h:032x}"), kv(h))[0].key)]
    assert len(keys) == 24  # two copies of each global extent
    slots = {int(redis_cluster.cli(redis_cluster.ports[0], "cluster", "keyslot", k.decode()).strip()) for k in keys}
    assert len(slots) == 24  # every copy on a slot of its own
    local = put(tier, name("c" * 32, "local"), kv(3))[0]
    assert len(tier.record_keys(local.key)) == 1


def test_scan_lists_the_prefix(tier):
    for h in range(5):
        put(tier, name(f"{h:032x}"), kv(h))
    assert {r.name.hash for r in tier.scan()} == {f"{h:032x}" for h in range(5)}


def test_drop_deletes_records_and_manifest(tier):
    loc, _ = put(tier, name("d" * 32), kv(4))
    tier.drop(loc)
    with pytest.raises(RecordMissing):
        tier.read(loc)
    assert tier.find([("default", FP, "d" * 32)]) == []


def test_flipped_bytes_are_caught_never_served(tier):
    loc, rec = put(tier, name("e" * 32, "local"), kv(5))
    (k,) = tier.record_keys(loc.key)
    bad = bytearray(rec.data)
    bad[-10] ^= 0xFF
    tier.client.set(k, bytes(bad))
    with pytest.raises(CorruptData, match="checksum"):
        get(tier, loc)


def test_a_killed_master_is_survived(redis_cluster_factory):
    """A master dies: a read gets the right bytes (from the other copy of a replicated global extent)
    or fails as TierUnavailable, fast once the breaker is open; after the replica's promotion it all
    works again."""
    cluster = redis_cluster_factory()
    s = settings(cluster, timeout_s=0.3)
    t = RemoteTier(connect(s), s)
    locs = [put(t, name(f"{h:032x}"), kv(h))[0] for h in range(16)]
    victim = cluster.masters()[0]
    # Redis replicates asynchronously: a write the master acknowledged may not have reached its replica
    # when the master dies, and is then a miss after the failover (docs/remote.md). This test is about
    # the failover path, so the victim's replica is caught up first; a record the cluster lost reads as
    # RecordMissing (a miss), checked above.
    cluster.wait_replicated(victim)
    cluster.kill(victim)
    for i, loc in enumerate(locs):
        t0 = time.monotonic()
        try:
            assert get(t, loc) == kv(i)  # never wrong bytes
        except TierUnavailable:
            assert time.monotonic() - t0 < 2.0  # bounded by the command timeout, then the breaker
    cluster.wait_ok()  # a replica took over
    deadline = time.monotonic() + 30
    for i, loc in enumerate(locs):  # each read works again once the back-off passed and the layout is learnt
        while True:
            try:
                assert get(t, loc) == kv(i)
                break
            except TierUnavailable:
                assert time.monotonic() < deadline, "the cluster did not serve again after the failover"
                time.sleep(0.2)
    t.close()


def test_wrong_password_is_a_config_error(redis_cluster_factory):
    cluster = redis_cluster_factory(requirepass="s3cret")
    with pytest.raises(ConfigError, match="refused the credentials"):
        connect(settings(cluster, password="wrong"))
    t = RemoteTier(connect(settings(cluster, password="s3cret")), settings(cluster))
    put(t, name("f" * 32), kv(6))
    t.close()


def test_no_cluster_is_unavailable(tmp_path):
    with pytest.raises(TierUnavailable, match="cannot be reached"):
        connect(RemoteSettings(enabled=True, startup_nodes=["127.0.0.1:1"], timeout_s=0.2))


def test_receive_buffers_are_reused_only_once_given_back(tier):
    """A value read from the cluster comes in a receive buffer; once its reader gives it back
    (``recycle``) the next read of a similar size reuses it, and a buffer longer than the value never
    makes a read take the socket's next bytes (reads after it on the same connection stay right)."""
    if tier._fast is None:
        pytest.skip("TLS: redis-py reads")
    big, small = name("c" * 32), name("d" * 32)
    small_raw = kv(4)[: len(kv(4)) * 3 // 4] + bytes(len(kv(4)) // 4)  # compresses to between half and all of big
    loc_big, rec_big = put(tier, big, kv(3), "raw")
    loc_small, rec_small = put(tier, small, small_raw, "lossless")
    assert len(rec_big.data) // 2 <= len(rec_small.data) < len(rec_big.data)
    first = tier.read(loc_big)
    held = tier.read(loc_big)  # not given back: never reused while its reader holds it
    assert first == rec_big.data and first.obj is not held.obj
    tier.recycle(first)
    again = tier.read(loc_small)  # into the bigger buffer given back
    assert again.obj is first.obj and again == rec_small.data and held == rec_big.data
    assert tier.read(loc_small) == rec_small.data and tier.read(loc_big) == rec_big.data  # same socket, in step
    tier.recycle(again)
    tier.recycle(b"not ours")  # bytes (redis-py's path) are ignored
    assert get(tier, loc_small) == small_raw


def test_close_closes_every_threads_fast_path_connections(redis_cluster):
    """The fast read path keeps a connection per I/O thread and node; the I/O threads outlive a closed
    tier, so closing it closes their connections (they stayed open before)."""
    import threading

    s = settings(redis_cluster)
    t = RemoteTier(connect(s), s)
    if t._fast is None:
        t.close()
        pytest.skip("TLS: redis-py reads")
    loc, rec = put(t, name("e" * 32), kv(5))
    got = []
    th = [threading.Thread(target=lambda: got.append(bytes(t.read(loc)))) for _ in range(2)]
    for x in th:
        x.start()
    for x in th:
        x.join()
    assert got == [rec.data] * 2
    socks = list(t._fast._open)
    assert len(socks) >= 2 and all(x.fileno() >= 0 for x in socks)
    t.close()
    assert all(x.fileno() == -1 for x in socks)


async def test_refused_credentials_follow_remote_required(redis_cluster_factory):
    """docs/remote.md, Failures: wrong credentials with ``required = true`` stop the start (naming the
    setting); with ``required = false`` the daemon starts without the remote tier (logged) and the
    join retries later. The start used to fail either way: the ConfigError went past ``required``."""
    from concurrent.futures import ThreadPoolExecutor

    from kvd.core.config import Settings
    from kvd.daemon.build import remote_tier

    cluster = redis_cluster_factory(requirepass="s3cret")
    io = ThreadPoolExecutor(2)
    try:
        required = Settings(remote=settings(cluster, password="wrong", required=True))
        with pytest.raises(ConfigError, match="refused the credentials"):
            await remote_tier(required, io)
        assert await remote_tier(Settings(remote=settings(cluster, password="wrong")), io) is None
    finally:
        io.shutdown()


def test_tls_verifies_the_certificate_and_the_host_name(monkeypatch):
    """``tls = true`` asks redis-py for the CA check and the host-name check by name: redis-py 5 (which
    pyproject allows) defaults ``ssl_check_hostname`` to False, so any certificate the CA (by default
    every public one) signed for any name was accepted, silently. The client is built with every node
    refusing, so only the settings it was given are looked at."""
    import redis.cluster

    given = {}

    class Refusing(redis.cluster.RedisCluster):
        def __init__(self, **kw):
            given.update(kw)
            raise redis.exceptions.RedisClusterException("no node answered")

    monkeypatch.setattr(redis.cluster, "RedisCluster", Refusing)
    with pytest.raises(TierUnavailable):
        connect(RemoteSettings(enabled=True, startup_nodes=["127.0.0.1:1"], tls=True, tls_ca_file="/etc/ca.pem"))
    assert given["ssl"] is True and given["ssl_ca_certs"] == "/etc/ca.pem"
    assert given.get("ssl_cert_reqs", "required") == "required" and given.get("ssl_check_hostname") is True
