"""Scenario tests of the store: each step is one call, with the state it must leave."""

from concurrent.futures import ThreadPoolExecutor

import pytest

from kvd.core import protocol as P
from kvd.core.config import load_settings
from kvd.core.errors import (
    Conflict,
    FingerprintMismatch,
    Forbidden,
    InvalidRequest,
    NotFound,
    RequestTooLarge,
)
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


POOL = ThreadPoolExecutor(2)


def make_store(tmp_path, capacity=1 << 20, slot=128 << 10, policy="lru", policies=None, **over):
    settings = load_settings(None, environ={}, overrides={
        "host": {"capacity_bytes": capacity, "slot_bytes": slot}, "policy": {"eviction": policy}, **over})
    clock = FakeClock()
    host = HostTier(tmp_path / "arena", capacity, slot)
    s = Store(settings, [host], metrics=Metrics(), cpu=POOL, io=POOL, clock=clock, policies=policies)
    s.clock_fake = clock
    return s


@pytest.fixture(params=["lru", "cost_aware"])
def store(tmp_path, request):
    """A 1 MiB arena of 8 slots = 4 entries; scenarios run under LRU and the default policy."""
    s = make_store(tmp_path, policy=request.param)
    s.fp = s.register_model(P.RegisterModelRequest(model_id="toy", num_layers=2, num_kv_heads=2, head_dim=64,
                                                   head_map=HM)).fingerprint
    yield s
    s.host.close()


def hashes(n, start=0):
    return prefix_hashes(list(range(start * 256, (start + n) * 256)), chunk_tokens=256, namespace="default",
                         fingerprint="x")


async def reserve(store, hs, **kw):
    return await store.reserve(P.ReserveRequest(fingerprint=store.fp, entries=[
        P.ReserveEntry(hash=h, num_tokens=256, start_token=256 * i) for i, h in enumerate(hs)]), **kw)


async def commit(store, rid, **kw):
    return await store.commit(P.CommitRequest(reservation_id=rid, **kw))


async def lookup(store, hs):
    return await store.lookup(P.LookupRequest(fingerprint=store.fp, prefix_hashes=hs))


async def lease(store, hs, **kw):
    return await store.lease(P.LeaseRequest(fingerprint=store.fp, hashes=hs), **kw)


async def test_entries_become_visible_only_at_commit(store):
    hs = hashes(2)
    r = await reserve(store, hs)
    assert [e.status for e in r.entries] == ["reserved", "reserved"]
    assert {x.head_class for x in r.entries[0].extents} == {"global", "local"}
    assert (await lookup(store, hs)).num_prefix_hits == 0  # pending: invisible
    assert (await reserve(store, hs)).entries[0].status == "exists"  # but blocked for other writers
    await commit(store, r.reservation_id)
    res = (await lookup(store, hs))
    assert res.num_prefix_hits == 2 and res.prefix[0].tier == "host" and res.prefix[0].complete
    with pytest.raises(Conflict, match="already committed"):
        await commit(store, r.reservation_id)
    with pytest.raises(NotFound):
        await commit(store, "f" * 32)


async def test_leading_hits_stop_at_the_first_gap(store):
    hs = hashes(3)
    await commit(store, (await reserve(store, [hs[0], hs[2]])).reservation_id)
    res = (await lookup(store, hs))
    assert res.num_prefix_hits == 1 and [(r.index, r.tier) for r in res.prefix] == [(0, "host"), (2, "host")]


async def test_partial_commit_aborts_the_rest(store):
    hs = hashes(2)
    r = await reserve(store, hs)
    await commit(store, r.reservation_id, hashes=[hs[0]])
    assert (await lookup(store, hs)).num_prefix_hits == 1
    assert store.host.stats().used_bytes == 2 * (128 << 10)


async def test_reservation_expires_and_returns_slots(store):
    r = await reserve(store, hashes(1))
    assert store.host.stats().used_bytes > 0
    store.clock_fake.advance(store.settings.host.reservation_ttl_s + 1)
    assert store.expire(is_alive=lambda pid: True) == 1
    assert store.host.stats().used_bytes == 0
    with pytest.raises(NotFound, match="expired"):
        await commit(store, r.reservation_id)


async def test_lease_protects_and_expires(store):
    hs = hashes(4)
    await commit(store, (await reserve(store, hs)).reservation_id)  # arena full: 4 entries × 2 slots
    le = await lease(store, hs[:1], owner_pid=4242)
    assert le.entries[0].status == "ok" and le.lease_id
    # A new entry evicts the least recently used *unleased* entry, never the leased one.
    await commit(store, (await reserve(store, hashes(1, start=10))).reservation_id)
    res = (await lookup(store, hs))
    assert res.prefix[0].index == 0 and res.prefix[0].tier == "host" and len(res.prefix) == 3
    # The owner dies: its lease is taken back at the next expiry pass.
    assert store.expire(is_alive=lambda pid: pid != 4242) == 1
    assert len(store.holds.leases) == 0
    with pytest.raises(NotFound, match="not held"):
        store.release(P.ReleaseRequest(lease_id=le.lease_id))


async def test_renew_keeps_a_live_hold_past_its_ttl_and_only_its_owner_may(store):
    """A step longer than the TTL renews its lease and reservation; without a renewal both expire, and a
    renewal then says so (the caller must not trust what it copies after)."""
    hs = hashes(2)
    await commit(store, (await reserve(store, hs[:1])).reservation_id)
    le = await lease(store, hs[:1], owner_pid=7)
    res = await reserve(store, hs[1:], owner_pid=7)
    ttl = store.settings.host.lease_ttl_s
    assert store.settings.host.reservation_ttl_s == ttl
    for _ in range(3):  # three TTLs in all, renewed every 2/3 of one
        store.clock_fake.advance(ttl * 2 / 3)
        for hold in (le.lease_id, res.reservation_id):
            assert store.renew(P.RenewRequest(hold_id=hold), owner_pid=7).count == 1
        assert store.expire(is_alive=lambda pid: True) == 0
    with pytest.raises(Forbidden, match="belongs to process 7"):
        store.renew(P.RenewRequest(hold_id=le.lease_id), owner_pid=8)
    await commit(store, res.reservation_id)  # still live: committed
    assert (await lookup(store, hs)).num_prefix_hits == 2
    store.clock_fake.advance(ttl + 1)
    assert store.expire(is_alive=lambda pid: True) == 1
    with pytest.raises(NotFound, match="not held"):
        store.renew(P.RenewRequest(hold_id=le.lease_id), owner_pid=7)


async def test_no_space_when_everything_is_leased_changes_nothing(store):
    hs = hashes(4)
    await commit(store, (await reserve(store, hs)).reservation_id)
    await lease(store, hs)
    before = store.host.stats().used_bytes
    r = await reserve(store, hashes(1, start=20))
    assert r.entries[0].status == "no_space" and r.reservation_id is None
    assert store.host.stats().used_bytes == before


async def test_pinned_entries_are_never_evicted(store):
    hs = hashes(4)
    await commit(store, (await reserve(store, hs)).reservation_id)
    store.set_pinned(P.EntriesRequest(fingerprint=store.fp, hashes=hs), True)
    assert (await reserve(store, hashes(1, start=30))).entries[0].status == "no_space"
    store.set_pinned(P.EntriesRequest(fingerprint=store.fp, hashes=hs[:1]), False)
    assert (await reserve(store, hashes(1, start=30))).entries[0].status == "reserved"


async def test_delete_while_leased_frees_on_release(store):
    hs = hashes(1)
    await commit(store, (await reserve(store, hs)).reservation_id)
    le = await lease(store, hs)
    assert store.delete(P.EntriesRequest(fingerprint=store.fp, hashes=hs)).count == 1
    assert (await lookup(store, hs)).num_prefix_hits == 0
    assert store.host.stats().used_bytes > 0  # the reader still copies from it
    store.release(P.ReleaseRequest(lease_id=le.lease_id))
    assert store.host.stats().used_bytes == 0


async def test_lease_of_missing_and_class_filter(store):
    hs = hashes(2)
    await commit(store, (await reserve(store, hs[:1])).reservation_id)
    le = await (store.lease(P.LeaseRequest(fingerprint=store.fp, hashes=hs, classes=["local"])))
    assert [e.status for e in le.entries] == ["ok", "missing"]
    assert [x.head_class for x in le.entries[0].extents] == ["local"]
    with pytest.raises(InvalidRequest, match="head classes"):
        await (store.lease(P.LeaseRequest(fingerprint=store.fp, hashes=hs, classes=["medium"])))


async def test_model_registration_rules(store):
    req = P.RegisterModelRequest(model_id="toy", num_layers=2, num_kv_heads=2, head_dim=64, head_map=HM)
    assert store.register_model(req).fingerprint == store.fp  # idempotent
    with pytest.raises(FingerprintMismatch):
        store.register_model(req.model_copy(update={"fingerprint": "0" * 32}))
    await commit(store, (await reserve(store, hashes(1))).reservation_id)
    other = HeadMap.all_global("toy", 2, 2)
    with pytest.raises(Conflict, match="another head map"):
        store.register_model(req.model_copy(update={"head_map": other}))
    with pytest.raises(NotFound, match="not registered"):
        await store.lookup(P.LookupRequest(fingerprint="1" * 32, prefix_hashes=[]))


async def test_request_limits(store):
    store.settings.daemon.max_entries_per_request = 3
    with pytest.raises(RequestTooLarge):
        await reserve(store, hashes(4))
    with pytest.raises(InvalidRequest, match="twice"):
        await reserve(store, [hashes(1)[0]] * 2)


async def test_lookup_result_json_is_a_lookup_response(store):
    hs = hashes(3)
    await commit(store, (await reserve(store, hs[1:])).reservation_id)
    res = (await lookup(store, hs))
    doc = P.LookupResponse.model_validate_json(res.to_json())
    assert doc.num_prefix_hits == 0 and [(e.index, e.tier, e.complete) for e in doc.prefix] == [
        (1, "host", True), (2, "host", True)]
    assert set(doc.prefix[0].classes) == {"global", "local"}


async def test_lookup_by_token_ids_matches_hashes(store):
    toks = list(range(600))
    hs = prefix_hashes(toks, chunk_tokens=256, namespace="default", fingerprint=store.fp)
    await commit(store, (await reserve(store, hs)).reservation_id)
    res = await store.lookup(P.LookupRequest(fingerprint=store.fp, token_ids=toks))
    assert res.num_prefix_hits == 2 and [s.hash for s in res.prefix] == hs
    m = store.metrics.registry.get_sample_value
    assert m("kvd_lookup_tokens_total", {"kind": "prefix"}) == 512
    assert m("kvd_hit_tokens_total", {"kind": "prefix", "tier": "host"}) == 512  # once, not per head class


async def test_fragmented_arena_evicts_a_window_for_a_large_extent(tmp_path):
    """Regression: single-slot entries scattered over the arena left no run for a larger extent, and
    evicting by priority freed bytes that were not adjacent; reserve said no_space forever."""
    store = make_store(tmp_path, slot=64 << 10)  # 16 slots
    small = store.register_model(P.RegisterModelRequest(model_id="s", num_layers=1, num_kv_heads=1,
                                                        head_dim=64)).fingerprint  # 64 KiB entries
    big = store.register_model(P.RegisterModelRequest(model_id="b", num_layers=4, num_kv_heads=1,
                                                      head_dim=64)).fingerprint  # 256 KiB entries
    hs = hashes(16)
    await commit(store, (await store.reserve(P.ReserveRequest(fingerprint=small, entries=[
        P.ReserveEntry(hash=h, num_tokens=256) for h in hs]))).reservation_id)
    # Recency order that is not address order: touch every other entry, so LRU victims alternate.
    for h in hs[::2]:
        le = await (store.lease(P.LeaseRequest(fingerprint=small, hashes=[h])))
        store.release(P.ReleaseRequest(lease_id=le.lease_id))
    r = await store.reserve(P.ReserveRequest(fingerprint=big, entries=[P.ReserveEntry(hash=hashes(1, 50)[0], num_tokens=256)]))
    assert r.entries[0].status == "reserved"
    # Two rounds of policy victims (8 odd slots), then one window of 4 slots with 2 occupants: 10 go.
    # Priority-only eviction needed a third round and evicted 12.
    survivors = (await store.lookup(P.LookupRequest(fingerprint=small, prefix_hashes=hs))).prefix
    assert len(survivors) == 6
    store.host.close()


class FailingLru(LruEviction):
    """LRU with a failure switch: ``on_insert`` of ``fail_on`` raises (a policy bug, a full table)."""

    fail_on = None

    def on_insert(self, key, meta, now=None):
        if key == self.fail_on:
            raise RuntimeError("policy failure (injected)")
        super().on_insert(key, meta, now)


async def test_a_commit_failing_half_way_indexes_nothing_and_leaks_nothing(tmp_path):
    """Regression: a commit indexed each entry before its policy call, with no rollback. When the
    call failed for the second entry the first stayed indexed, the reservation was gone, the failed
    keys answered ``exists`` forever and their arena slots were never freed."""
    policy = FailingLru()
    store = make_store(tmp_path, policies={"host": policy})
    store.fp = store.register_model(P.RegisterModelRequest(model_id="toy", num_layers=2, num_kv_heads=2,
                                                           head_dim=64, head_map=HM)).fingerprint
    hs = hashes(3)
    r = await reserve(store, hs)
    policy.fail_on = ("default", store.fp, hs[1])
    with pytest.raises(RuntimeError, match="injected"):
        await commit(store, r.reservation_id)
    assert (await lookup(store, hs)).prefix == []  # all or nothing: nothing indexed
    policy.fail_on = None
    assert store.abort(P.AbortRequest(reservation_id=r.reservation_id)).count == 3  # the reservation is intact
    assert store.host.stats().used_bytes == 0  # every slot back
    assert [e.status for e in (await reserve(store, hs)).entries] == ["reserved"] * 3  # nothing blocks the keys
    store.host.close()


async def test_prefix_aliases_name_an_entrys_leading_tokens(store):
    """A stored chunk registered under its block-prefix keys serves a shorter prompt's tail lookup."""
    hs = hashes(2)
    alias, other = hashes(2, start=40)
    r = await store.reserve(P.ReserveRequest(fingerprint=store.fp, entries=[
        P.ReserveEntry(hash=hs[0], num_tokens=256, aliases=[P.PrefixAlias(hash=alias, num_tokens=112)])]))
    assert (await lookup(store, [alias])).prefix == []  # pending: invisible, aliases too
    await commit(store, r.reservation_id)
    row = (await lookup(store, [alias])).prefix[0]
    assert (row.hash, row.num_tokens, row.complete) == (alias, 112, True)
    le = await lease(store, [alias])
    assert le.entries[0].status == "ok" and le.entries[0].num_tokens == 256  # the extents hold the chunk
    store.release(P.ReleaseRequest(lease_id=le.lease_id))
    # An alias key is taken: a writer of it is told it exists (the alias serves it).
    assert (await reserve(store, [alias])).entries[0].status == "exists"
    # Aliases sent with an entry that exists already are registered then.
    await store.reserve(P.ReserveRequest(fingerprint=store.fp, entries=[
        P.ReserveEntry(hash=hs[0], num_tokens=256, aliases=[P.PrefixAlias(hash=other, num_tokens=16)])]))
    assert (await lookup(store, [other])).prefix[0].num_tokens == 16
    # The entry goes, its aliases with it.
    store.delete(P.EntriesRequest(fingerprint=store.fp, hashes=[hs[0]]))
    assert (await lookup(store, [alias, other])).prefix == []


async def test_lossy_flag_and_attention_tag_are_part_of_what_readers_see(store):
    hs = hashes(1)
    r = await store.reserve(P.ReserveRequest(fingerprint=store.fp, computed_under="hm-" + "a" * 16, entries=[
        P.ReserveEntry(hash=hs[0], num_tokens=256)]))
    assert all(not x.lossy for x in r.entries[0].extents)
    await commit(store, r.reservation_id)
    assert (await lookup(store, hs)).prefix == []  # an exact reader does not see it
    le = await store.lease(P.LeaseRequest(fingerprint=store.fp, hashes=hs, computed_under="hm-" + "a" * 16))
    assert le.entries[0].status == "ok"
    store.release(P.ReleaseRequest(lease_id=le.lease_id))


async def test_a_tenant_cannot_remap_a_model_another_tenant_registered(tmp_path):
    """Models are registered daemon-wide. With no entries stored yet, any client's registration with
    another head map replaced the model's map: under tenants, tenant B (or a client of no tenant)
    could re-map tenant A's model, and A's head-aware reads were refused (head map mismatch) until A
    registered again, and so back and forth. A map change is now refused while another tenant has
    registered the model, unless an admin asks; the same map registers as before."""
    s = make_store(tmp_path)
    try:
        req = P.RegisterModelRequest(model_id="toy", num_layers=2, num_kv_heads=2, head_dim=64, head_map=HM)
        other = req.model_copy(update={"head_map": HeadMap.all_global("toy", 2, 2)})
        fp = s.register_model(req, tenant="a", may_remap=False).fingerprint
        assert s.register_model(req, tenant="b", may_remap=False).fingerprint == fp  # same map
        with pytest.raises(Conflict, match="another tenant"):
            s.register_model(other, tenant="b", may_remap=False)
        with pytest.raises(Conflict, match="another tenant"):
            s.register_model(other, tenant=None, may_remap=False)  # a client of no tenant
        assert s.registry.get(fp).head_map == HM
        s.register_model(other, may_remap=True)  # an admin (or one trust domain): as before
        assert s.registry.get(fp).head_map.num_global == 4
        # a tenant alone with its model may change its own map while nothing is stored
        s2 = make_store(tmp_path / "2")
        s2.register_model(req, tenant="a", may_remap=False)
        assert s2.register_model(other, tenant="a", may_remap=False).num_global_heads == 4
        s2.host.close()
    finally:
        s.host.close()


@pytest.mark.parametrize("policy", ["lru", "arc", "cost_aware"])
async def test_eviction_takes_a_sequences_tail_before_its_head(tmp_path, policy):
    """A prefix entry is reachable only while every entry before it in its sequence is there, so under
    pressure a sequence must lose its tail first. Every policy took the head first: LRU and ARC met a
    sequence's entries head first (commit and lease touch them in order, so the head was the least
    recent), and cost-aware scored a chunk by its own recompute cost, lowest at the start; one eviction
    then left the whole rest of the sequence unreachable (an audit's run: 93 of 94 SSD entries were
    third chunks whose first chunks were gone)."""
    s = make_store(tmp_path, policy=policy)  # 4 entries fit
    try:
        s.fp = s.register_model(P.RegisterModelRequest(model_id="toy", num_layers=2, num_kv_heads=2, head_dim=64,
                                                       head_map=HM)).fingerprint
        seqs = [hashes(2, start=10 * k) for k in range(3)]
        for hs in seqs[:2]:
            r = await s.reserve(P.ReserveRequest(fingerprint=s.fp, entries=[
                P.ReserveEntry(hash=h, num_tokens=256, start_token=256 * i, end_token=512) for i, h in enumerate(hs)]))
            await commit(s, r.reservation_id)
            s.clock_fake.advance(1.0)
        held = await lease(s, seqs[0])  # the first sequence read again, in order
        s.release(P.ReleaseRequest(lease_id=held.lease_id))
        r = await s.reserve(P.ReserveRequest(fingerprint=s.fp, entries=[
            P.ReserveEntry(hash=seqs[2][0], num_tokens=256, start_token=0, end_token=256)]))  # evicts one entry
        assert r.entries[0].status == "reserved"
        hits = [(await lookup(s, hs)).num_prefix_hits for hs in seqs[:2]]
        assert sorted(hits) == [1, 2], hits  # a tail went; both heads stayed
    finally:
        s.host.close()
