"""Eviction policies: scenario tests (a script of calls, each with the expected state)."""

from __future__ import annotations

import random

import pytest

from kvd.core.config import PolicySettings
from kvd.core.errors import ConfigError
from kvd.policies.eviction import (
    ArcEviction,
    CostAwareEviction,
    EntryMeta,
    LruEviction,
    make_eviction,
    recompute_cost,
)


def meta(nbytes: int = 10, **kw) -> EntryMeta:
    return EntryMeta(nbytes=nbytes, num_tokens=kw.pop("num_tokens", 256), num_layers=kw.pop("num_layers", 30), **kw)


def everyone(key) -> bool:
    return True


class SimTier:
    """A tier of ``capacity`` bytes driven the way the store drives a policy: evict victims until an
    insert fits, telling the policy about every removal."""

    def __init__(self, policy, capacity: int) -> None:
        self.policy, self.capacity = policy, capacity
        self.resident: dict = {}  # key -> bytes
        self.evicted: list = []

    def insert(self, key, m: EntryMeta, now: float = 0.0) -> None:
        need = sum(self.resident.values()) + m.nbytes - self.capacity
        if need > 0:
            for victim in self.policy.victims(need, now=now, can_evict=everyone):
                self.policy.on_remove(victim)
                self.evicted.append(victim)
                del self.resident[victim]
        self.resident[key] = m.nbytes
        self.policy.on_insert(key, m, now)

    def get(self, key, now: float = 0.0) -> bool:
        if key in self.resident:
            self.policy.on_access(key, now)
            return True
        return False


# ---- LRU ----------------------------------------------------------------------------------------


def test_lru_evicts_least_recently_used_first():
    p = LruEviction()
    for k in "abc":
        p.on_insert(k, meta())  # order: a b c
    p.on_access("a", now=1)  # order: b c a
    assert p.victims(15, now=2, can_evict=everyone) == ["b", "c"]
    assert p.victims(15, now=2, can_evict=everyone) == ["b", "c"]  # pure: asking twice changes nothing
    assert p.victims(15, now=2, can_evict=lambda k: k != "b") == ["c", "a"]  # leased b is skipped
    p.on_remove("b")
    assert p.victims(100, now=3, can_evict=everyone) == ["c", "a"]  # fewer bytes than asked: all it has


# ---- ARC ----------------------------------------------------------------------------------------


def test_arc_new_keys_go_to_t1_and_hits_promote_to_t2():
    p = ArcEviction(capacity_bytes=100)
    p.on_insert("a", meta())
    p.on_insert("b", meta())
    assert list(p.t1) == ["a", "b"] and not p.t2
    p.on_access("a", now=1)
    assert list(p.t1) == ["b"] and list(p.t2) == ["a"]
    # T1 (10 bytes) is above p (0): victims come from T1 first
    assert p.victims(10, now=2, can_evict=everyone) == ["b"]


def _scan_then_reuse(policy, capacity=100):
    tier = SimTier(policy, capacity)
    working = [f"w{i}" for i in range(5)]
    for k in working:  # a working set of 50 bytes, each used twice
        tier.insert(k, meta())
        tier.get(k)
    for i in range(12):  # a one-shot scan of 120 bytes streams through
        tier.insert(f"s{i}", meta())
    return tier, working


def test_arc_keeps_the_working_set_through_a_scan_where_lru_does_not():
    arc, working = _scan_then_reuse(ArcEviction(capacity_bytes=100))
    lru, _ = _scan_then_reuse(LruEviction())
    assert all(k in arc.resident for k in working)  # the scan only displaced scan keys (T1)
    assert not any(k in lru.resident for k in working)  # LRU lost all of them


def test_arc_adapts_p_up_on_b1_hits_and_down_on_b2_hits():
    p = ArcEviction(capacity_bytes=100)
    tier, working = _scan_then_reuse(p)
    # Scan victims s0..s6 left ghosts in B1; |T1| + |B1| ≤ c keeps the 5 most recent.
    assert p.p == 0 and list(p.b1) == ["s2", "s3", "s4", "s5", "s6"]
    # The scan turns out to be reused: re-inserting a key from B1 means T1 was too small.
    tier.insert("s6", meta(), now=1)
    grown = p.p
    assert grown >= 10 and "s6" in p.t2
    tier.insert("s5", meta(), now=2)
    assert p.p > grown
    # Now the old working set is wanted back: evict w0 from T2, then re-insert it from B2.
    for k in list(p.t2):
        if k.startswith("w"):
            tier.policy.on_remove(k)
            del tier.resident[k]
            break
    assert "w0" in p.b2
    before = p.p
    tier.insert("w0", meta(), now=3)
    assert p.p < before and "w0" in p.t2


def test_arc_ghost_lists_stay_bounded_by_capacity():
    p = ArcEviction(capacity_bytes=100)
    tier = SimTier(p, 100)
    for i in range(500):
        tier.insert(i, meta(nbytes=random.Random(i).randint(1, 30)))
    assert p.t1_bytes + p.b1_bytes <= 100
    assert p.t1_bytes + p.t2_bytes + p.b1_bytes + p.b2_bytes <= 200


def test_arc_without_capacity_learns_it_from_the_resident_peak():
    p = ArcEviction()
    tier = SimTier(p, 100)
    for i in range(30):
        tier.insert(i, meta())
    assert p.c == 100 and p.b1_bytes <= 100


# ---- cost-aware ---------------------------------------------------------------------------------


def test_recompute_cost_grows_with_tokens_layers_position_and_global_share():
    base = recompute_cost(256, 30, 0, 1.0)
    assert base == pytest.approx(30 * 256 * (1 + 127.5 / 4096))  # the docstring's example
    assert recompute_cost(256, 30, 8192, 1.0) == pytest.approx(30 * 256 * (1 + 8319.5 / 4096))
    assert recompute_cost(512, 30, 0) > base and recompute_cost(256, 60, 0) > base
    assert recompute_cost(256, 30, 0, 0.0) == pytest.approx(base * 0.5)  # all local heads: half weight
    assert recompute_cost(0, 30, 0) == 0


def test_cost_aware_priority_is_the_formula():
    p = CostAwareEviction(half_life_s=100)
    m = meta(num_tokens=256, num_layers=30, start_token=1024, global_fraction=0.2)
    p.on_insert("a", m, now=0)
    p.on_access("a", now=50)
    p.on_access("a", now=60)  # reuse_count 2, last access at 60
    want = 3 * recompute_cost(256, 30, 1024, 0.2) * 0.5 ** ((260 - 60) / 100)
    assert p.priority("a", now=260) == pytest.approx(want)


def test_cost_aware_orders_victims_by_the_formula():
    p = CostAwareEviction(half_life_s=60)
    p.on_insert("cheap", meta(num_tokens=64), now=0)  # small chunk: cheap to recompute
    p.on_insert("deep", meta(start_token=32768), now=0)  # far into a long context: dear
    p.on_insert("hot", meta(), now=0)
    for t in (10, 20, 30):
        p.on_access("hot", now=t)  # reused three times
    p.on_insert("stale", meta(), now=-600)  # ten half-lives old
    order = p.victims(10**9, now=40, can_evict=everyone)
    assert order == sorted(order, key=lambda k: p.priority(k, 40))
    assert order == ["stale", "cheap", "hot", "deep"]


def test_cost_aware_order_matches_brute_force_at_any_time():
    """The heap ranks by a time-free key; check it against the formula at several later times."""
    rng = random.Random(7)
    p = CostAwareEviction(half_life_s=30)
    keys = list(range(40))
    for k in keys:
        p.on_insert(k, meta(num_tokens=rng.choice([64, 256]), start_token=rng.randrange(0, 20000),
                            global_fraction=rng.random()), now=rng.uniform(0, 100))
    for _ in range(60):
        p.on_access(rng.choice(keys), now=rng.uniform(100, 200))
    for k in keys[:5]:
        p.on_remove(k)
    for now in (200.0, 500.0, 5000.0):
        got = p.victims(10**9, now=now, can_evict=everyone)
        want = sorted(keys[5:], key=lambda k: p.priority(k, now))
        assert [round(p.priority(k, now), 6) for k in got] == [round(p.priority(k, now), 6) for k in want]
        assert set(got) == set(keys[5:])


def test_cost_aware_victims_stop_once_enough_bytes_are_found():
    p = CostAwareEviction()
    for i in range(10):
        p.on_insert(i, meta(nbytes=10), now=i)  # older = lower priority
    assert p.victims(25, now=10, can_evict=everyone) == [0, 1, 2]
    assert len(p) == 10  # victims() removed nothing


# ---- every policy -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["lru", "arc", "cost_aware"])
def test_pinned_entries_never_leave_under_pressure(name):
    policy = make_eviction(PolicySettings(eviction=name), capacity_bytes=100)
    tier = SimTier(policy, 100)
    tier.insert("pinned", meta(pinned=True), now=0)  # oldest, cheapest, never accessed
    for i in range(200):
        tier.insert(i, meta(nbytes=7 + i % 5), now=i)
        if i % 3 == 0:
            tier.get(i - 1, now=i)
    assert "pinned" in tier.resident and "pinned" not in tier.evicted


@pytest.mark.parametrize("name", ["lru", "arc", "cost_aware"])
def test_can_evict_rejection_is_respected(name):
    policy = make_eviction(PolicySettings(eviction=name))
    for i in range(5):
        policy.on_insert(i, meta(), now=i)
    got = policy.victims(30, now=10, can_evict=lambda k: k % 2 == 0)
    assert set(got) == {0, 2, 4}
    assert policy.victims(30, now=10, can_evict=lambda k: False) == []


@pytest.mark.parametrize("name", ["lru", "arc", "cost_aware"])
def test_unknown_keys_are_ignored_and_reinsert_updates_meta(name):
    policy = make_eviction(PolicySettings(eviction=name))
    policy.on_access("ghost", now=1)
    policy.on_remove("ghost")
    policy.on_insert("a", meta(nbytes=10), now=1)
    policy.on_insert("a", meta(nbytes=10, pinned=True), now=2)  # pinned later (kvctl pin)
    assert policy.victims(10, now=3, can_evict=everyone) == []
    assert len(policy) == 1



@pytest.mark.parametrize("name", ["lru", "arc", "cost_aware"])
def test_reinsert_with_a_new_size_keeps_the_keys_place(name):
    """The index re-inserts a key whenever its size in the tier changes (an extent written down and let
    go): not a use. LRU and cost_aware moved it to the most recent end."""
    policy = make_eviction(PolicySettings(eviction=name))
    policy.on_insert("old", meta(nbytes=20), now=0)
    policy.on_insert("new", meta(nbytes=20), now=500)
    policy.on_insert("old", meta(nbytes=10), now=600)  # half of it left the tier
    assert policy.victims(1, now=600, can_evict=everyone) == ["old"]
    assert policy.victims(30, now=600, can_evict=everyone) == ["old", "new"]

def test_make_eviction_names_supported_policies_on_error():
    bad = PolicySettings.model_construct(eviction="fifo", recency_half_life_s=300.0)
    with pytest.raises(ConfigError, match="lru, arc, cost_aware"):
        make_eviction(bad)
    assert make_eviction(PolicySettings()).name == "cost_aware"  # the default
