"""Scenario tests of the store: each step is one call, with the state it must leave."""

import asyncio

import pytest

from kvd.core import protocol as P
from kvd.core.config import load_settings
from kvd.core.errors import Conflict, FingerprintMismatch, InvalidRequest, NotFound, RequestTooLarge
from kvd.core.headmap import HeadMap
from kvd.core.keys import ModelSpec, prefix_hashes
from kvd.daemon.metrics import Metrics
from kvd.policies.eviction import LruEviction
from kvd.store.store import Store
from kvd.tiers.host import HostTier
from tests.fakes import FakeClock

SPEC = ModelSpec("toy", num_layers=2, num_kv_heads=2, head_dim=64, kv_dtype="bfloat16")
HM = HeadMap.from_classes("toy", [[True, False], [False, True]], sink=4, window=64)
SEG = SPEC.segment_bytes(256)  # 64 KiB; an entry = 2 global + 2 local segments = 2 extents of 128 KiB


@pytest.fixture
def store(tmp_path):
    settings = load_settings(None, environ={}, overrides={
        "host": {"capacity_bytes": 1 << 20, "slot_bytes": 128 << 10}})  # 8 slots = 4 entries
    clock = FakeClock()
    host = HostTier(tmp_path / "arena", 1 << 20, 128 << 10)
    s = Store(settings, host, metrics=Metrics(), clock=clock, host_policy=LruEviction())
    s.clock_fake = clock
    fp = s.register_model(P.RegisterModelRequest(model_id="toy", num_layers=2, num_kv_heads=2, head_dim=64,
                                                 head_map=HM)).fingerprint
    s.fp = fp
    yield s
    host.close()


def hashes(n, start=0):
    return prefix_hashes(list(range(start * 256, (start + n) * 256)), chunk_tokens=256, namespace="default",
                         fingerprint="x")


def reserve(store, hs, **kw):
    return store.reserve(P.ReserveRequest(fingerprint=store.fp, entries=[
        P.ReserveEntry(hash=h, num_tokens=256, start_token=256 * i) for i, h in enumerate(hs)]), **kw)


def commit(store, rid, **kw):
    return asyncio.run(store.commit(P.CommitRequest(reservation_id=rid, **kw)))


def lookup(store, hs):
    return store.lookup(P.LookupRequest(fingerprint=store.fp, prefix_hashes=hs))


def lease(store, hs, **kw):
    return asyncio.run(store.lease(P.LeaseRequest(fingerprint=store.fp, hashes=hs), **kw))


def test_entries_become_visible_only_at_commit(store):
    hs = hashes(2)
    r = reserve(store, hs)
    assert [e.status for e in r.entries] == ["reserved", "reserved"]
    assert {x.head_class for x in r.entries[0].extents} == {"global", "local"}
    assert lookup(store, hs).num_prefix_hits == 0  # pending: invisible
    assert reserve(store, hs).entries[0].status == "exists"  # but blocked for other writers
    commit(store, r.reservation_id)
    res = lookup(store, hs)
    assert res.num_prefix_hits == 2 and res.prefix[0].tier == "host" and res.prefix[0].complete
    with pytest.raises(Conflict, match="already committed"):
        commit(store, r.reservation_id)
    with pytest.raises(NotFound):
        commit(store, "f" * 32)


def test_leading_hits_stop_at_the_first_gap(store):
    hs = hashes(3)
    commit(store, reserve(store, [hs[0], hs[2]]).reservation_id)
    res = lookup(store, hs)
    assert res.num_prefix_hits == 1 and [(r.index, r.tier) for r in res.prefix] == [(0, "host"), (2, "host")]


def test_partial_commit_aborts_the_rest(store):
    hs = hashes(2)
    r = reserve(store, hs)
    commit(store, r.reservation_id, hashes=[hs[0]])
    assert lookup(store, hs).num_prefix_hits == 1
    assert store.host.stats().used_bytes == 2 * (128 << 10)


def test_reservation_expires_and_returns_slots(store):
    r = reserve(store, hashes(1))
    assert store.host.stats().used_bytes > 0
    store.clock_fake.advance(store.settings.host.reservation_ttl_s + 1)
    assert store.expire(is_alive=lambda pid: True) == 1
    assert store.host.stats().used_bytes == 0
    with pytest.raises(NotFound, match="expired"):
        commit(store, r.reservation_id)


def test_lease_protects_and_expires(store):
    hs = hashes(4)
    commit(store, reserve(store, hs).reservation_id)  # arena full: 4 entries × 2 slots
    le = lease(store, hs[:1], owner_pid=4242)
    assert le.entries[0].status == "ok" and le.lease_id
    # A new entry evicts the least recently used *unleased* entry, never the leased one.
    commit(store, reserve(store, hashes(1, start=10)).reservation_id)
    res = lookup(store, hs)
    assert res.prefix[0].index == 0 and res.prefix[0].tier == "host" and len(res.prefix) == 3
    # The owner dies: its lease is taken back at the next expiry pass.
    assert store.expire(is_alive=lambda pid: pid != 4242) == 1
    assert store.num_leases() == 0
    with pytest.raises(NotFound, match="not held"):
        store.release(P.ReleaseRequest(lease_id=le.lease_id))


def test_no_space_when_everything_is_leased_changes_nothing(store):
    hs = hashes(4)
    commit(store, reserve(store, hs).reservation_id)
    lease(store, hs)
    before = store.host.stats().used_bytes
    r = reserve(store, hashes(1, start=20))
    assert r.entries[0].status == "no_space" and r.reservation_id is None
    assert store.host.stats().used_bytes == before


def test_pinned_entries_are_never_evicted(store):
    hs = hashes(4)
    commit(store, reserve(store, hs).reservation_id)
    store.set_pinned(P.EntriesRequest(fingerprint=store.fp, hashes=hs), True)
    assert reserve(store, hashes(1, start=30)).entries[0].status == "no_space"
    store.set_pinned(P.EntriesRequest(fingerprint=store.fp, hashes=hs[:1]), False)
    assert reserve(store, hashes(1, start=30)).entries[0].status == "reserved"


def test_delete_while_leased_frees_on_release(store):
    hs = hashes(1)
    commit(store, reserve(store, hs).reservation_id)
    le = lease(store, hs)
    assert store.delete(P.EntriesRequest(fingerprint=store.fp, hashes=hs)).count == 1
    assert lookup(store, hs).num_prefix_hits == 0
    assert store.host.stats().used_bytes > 0  # the reader still copies from it
    store.release(P.ReleaseRequest(lease_id=le.lease_id))
    assert store.host.stats().used_bytes == 0


def test_lease_of_missing_and_class_filter(store):
    hs = hashes(2)
    commit(store, reserve(store, hs[:1]).reservation_id)
    le = asyncio.run(store.lease(P.LeaseRequest(fingerprint=store.fp, hashes=hs, classes=["local"])))
    assert [e.status for e in le.entries] == ["ok", "missing"]
    assert [x.head_class for x in le.entries[0].extents] == ["local"]
    with pytest.raises(InvalidRequest, match="head classes"):
        asyncio.run(store.lease(P.LeaseRequest(fingerprint=store.fp, hashes=hs, classes=["medium"])))


def test_model_registration_rules(store):
    req = P.RegisterModelRequest(model_id="toy", num_layers=2, num_kv_heads=2, head_dim=64, head_map=HM)
    assert store.register_model(req).fingerprint == store.fp  # idempotent
    with pytest.raises(FingerprintMismatch):
        store.register_model(req.model_copy(update={"fingerprint": "0" * 32}))
    commit(store, reserve(store, hashes(1)).reservation_id)
    other = HeadMap.all_global("toy", 2, 2)
    with pytest.raises(Conflict, match="another head map"):
        store.register_model(req.model_copy(update={"head_map": other}))
    with pytest.raises(NotFound, match="not registered"):
        store.lookup(P.LookupRequest(fingerprint="1" * 32, prefix_hashes=[]))


def test_request_limits(store):
    store.settings.daemon.max_entries_per_request = 3
    with pytest.raises(RequestTooLarge):
        reserve(store, hashes(4))
    with pytest.raises(InvalidRequest, match="twice"):
        reserve(store, [hashes(1)[0]] * 2)


def test_lookup_result_json_is_a_lookup_response(store):
    hs = hashes(3)
    commit(store, reserve(store, hs[1:]).reservation_id)
    res = lookup(store, hs)
    doc = P.LookupResponse.model_validate_json(res.to_json())
    assert doc.num_prefix_hits == 0 and [(e.index, e.tier, e.complete) for e in doc.prefix] == [
        (1, "host", True), (2, "host", True)]
    assert set(doc.prefix[0].classes) == {"global", "local"}


def test_lookup_by_token_ids_matches_hashes(store):
    toks = list(range(600))
    hs = prefix_hashes(toks, chunk_tokens=256, namespace="default", fingerprint=store.fp)
    commit(store, reserve(store, hs).reservation_id)
    res = store.lookup(P.LookupRequest(fingerprint=store.fp, token_ids=toks))
    assert res.num_prefix_hits == 2 and [s.hash for s in res.prefix] == hs
    m = store.metrics.registry.get_sample_value
    assert m("kvd_lookup_tokens_total", {"kind": "prefix"}) == 512
    assert m("kvd_hit_tokens_total", {"kind": "prefix", "tier": "host", "head_class": "global"}) == 512


def test_fragmented_arena_evicts_a_window_for_a_large_extent(tmp_path):
    """Regression: single-slot entries scattered over the arena left no run for a larger extent, and
    evicting by priority freed bytes that were not adjacent; reserve said no_space forever."""
    settings = load_settings(None, environ={}, overrides={"host": {"capacity_bytes": 1 << 20, "slot_bytes": 64 << 10}})
    host = HostTier(tmp_path / "arena", 1 << 20, 64 << 10)  # 16 slots
    store = Store(settings, host, metrics=Metrics(), clock=FakeClock(), host_policy=LruEviction())
    small = store.register_model(P.RegisterModelRequest(model_id="s", num_layers=1, num_kv_heads=1,
                                                        head_dim=64)).fingerprint  # 64 KiB entries
    big = store.register_model(P.RegisterModelRequest(model_id="b", num_layers=4, num_kv_heads=1,
                                                      head_dim=64)).fingerprint  # 256 KiB entries
    hs = hashes(16)
    commit(store, store.reserve(P.ReserveRequest(fingerprint=small, entries=[
        P.ReserveEntry(hash=h, num_tokens=256) for h in hs])).reservation_id)
    # Recency order that is not address order: touch every other entry, so LRU victims alternate.
    for h in hs[::2]:
        le = asyncio.run(store.lease(P.LeaseRequest(fingerprint=small, hashes=[h])))
        store.release(P.ReleaseRequest(lease_id=le.lease_id))
    r = store.reserve(P.ReserveRequest(fingerprint=big, entries=[P.ReserveEntry(hash=hashes(1, 50)[0], num_tokens=256)]))
    assert r.entries[0].status == "reserved"
    # Two rounds of policy victims (8 odd slots), then one window of 4 slots with 2 occupants: 10 go.
    # Priority-only eviction needed a third round and evicted 12.
    survivors = store.lookup(P.LookupRequest(fingerprint=small, prefix_hashes=hs)).prefix
    assert len(survivors) == 6
    host.close()
