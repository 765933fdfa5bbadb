"""The daemon's garbage-collector policy (``kvd.daemon.collector``): full collections freeze their
survivors, a maintenance pass collects cycles that were frozen, and the index holds no cycles (so
freezing it leaks nothing: an evicted or deleted entry is freed by reference counting)."""

from __future__ import annotations

import asyncio
import gc
import weakref

import pytest

from kvd.core import protocol as P
from kvd.daemon.collector import Collector
from kvd.daemon.metrics import Metrics
from kvd.store import entries as E
from tests.store.test_store import HM, commit, hashes, lease, make_store, reserve


class Node:  # weak-referenceable, can hold a cycle
    def __init__(self) -> None:
        self.other: Node | None = None


def count(m: Metrics, generation: str) -> float:
    return m.registry.get_sample_value("kvd_gc_pause_seconds_count", {"generation": generation})


@pytest.fixture
async def collector():
    m = Metrics()
    c = Collector(m.gc_pauses, m.gc_frozen, full_interval_s=0)
    c.start()
    yield c, m
    c.stop()
    gc.unfreeze()  # the test process's collector as it was


async def test_full_collections_freeze_their_survivors(collector):
    c, m = collector
    assert count(m, "maintenance") == 1  # at start: what was built so far, frozen
    assert m.registry.get_sample_value("kvd_gc_frozen_objects") >= gc.get_freeze_count() > 0
    young = [Node() for _ in range(1000)]
    assert any(o is young[0] for o in gc.get_objects())
    frozen0, full0 = gc.get_freeze_count(), count(m, "2")
    gc.collect()  # as an automatic full collection would: timed, then the survivors frozen on the loop
    assert count(m, "2") == full0 + 1
    await asyncio.sleep(0)
    assert gc.get_freeze_count() >= frozen0 + 1000
    assert not any(o is young[0] for o in gc.get_objects())  # out of every later scan
    del young[1:]  # frozen objects are still freed by reference counting
    r = weakref.ref(young.pop())
    assert r() is None


async def test_maintenance_collects_a_cycle_that_was_frozen(collector):
    c, m = collector
    a, b = Node(), Node()
    a.other, b.other = b, a
    r = weakref.ref(a)
    gc.collect()
    await asyncio.sleep(0)  # frozen while alive (a request's objects caught in flight)
    del a, b
    gc.collect()
    assert r() is not None  # unreachable, but frozen: the automatic passes do not see it
    assert c.maintain() >= 2 and r() is None
    assert count(m, "maintenance") == 2


async def test_index_objects_hold_no_cycles(tmp_path):
    """Entries stored, leased, released and deleted, then evicted: none of the store's entry objects is
    left for the cyclic collector (all freed by reference counting), so freezing the index leaks none."""
    s = make_store(tmp_path)
    s.fp = s.register_model(P.RegisterModelRequest(model_id="toy", num_layers=2, num_kv_heads=2, head_dim=64,
                                                   head_map=HM)).fingerprint
    gc.collect()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        for round_ in range(6):  # 4 entries fit the arena: later rounds evict earlier ones
            hs = hashes(3, start=3 * round_)
            await commit(s, (await reserve(s, hs)).reservation_id)
            got = await lease(s, hs)
            s.release(P.ReleaseRequest(lease_id=got.lease_id))
            if round_ % 2:
                s.delete(P.EntriesRequest(hashes=hs[:1]))
        gc.collect()
        kinds = (E.Entry, E.Extent, E.Copy, E.Copies, E.ModelRecord)
        cyclic = [type(o).__name__ for o in gc.garbage if isinstance(o, kinds)]
        assert not cyclic, f"entry objects freed only by the cyclic collector: {cyclic[:10]}"
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
        s.host.close()
