"""Audit 24: who may read what, and what lookups and leases answer (kvd.store.readers, answers, the
registry's head-map rule the readers rely on)."""

from __future__ import annotations

import pytest

from kvd.core import protocol as P
from kvd.core.errors import Conflict
from kvd.core.headmap import HeadMap
from tests.store.test_pipeline import HM, MODEL, World
from tests.store.test_readers import CHUNKS, TAG, W64, head_aware
from tests.store.test_readers import lease as trim_lease
from tests.store.test_readers import world as trim_world


@pytest.fixture
async def w(tmp_path):
    w = World(tmp_path)
    yield w
    w.close()


async def test_a_head_map_of_other_windows_is_refused_while_entries_follow_the_old_one(w):
    """The registry refused a new head map while entries exist only when its global/local grid
    differed: a map with the same grid and other windows (or sinks) was taken, and the model's plans
    changed under entries laid out by the old map (extents are grouped and tagged by sink and window),
    so exact lookups answered hits that every client of the new map refuses at the lease (another
    layout), and head-aware rules ran on the old windows."""
    hs, _ = await w.store_seq(1)
    other = HeadMap.from_classes("toy", [[True, False], [True, False]], sink=4, window=64)
    assert other.class_grid() == HM.class_grid()
    with pytest.raises(Conflict, match="another head map"):
        w.store.register_model(MODEL.model_copy(update={"head_map": other}))
    model = w.store.registry.get(w.fp)
    assert model.head_map == HM
    assert model.plans(256)["local"].layout == w.entry(hs[0]).extents["local"].plan.layout


async def test_a_lease_does_not_grant_a_trimmed_extent_that_lacks_what_the_reader_reads(tmp_path):
    """A head-aware lookup counts a trimmed extent (capacity mode) only from the position where it holds
    all the reader reads (``trimmed_from``), but the lease granted it ``ok`` at any position, and without
    a position too (every token read): the reader of chunk 7 at 2000 was given w64's tokens [192, 256)
    where its window reads from 145 on, while the lookup just before said 7 hits, not 8."""
    w = trim_world(tmp_path, local_cold_codec="drop")
    try:
        hs, _ = await w.store_seq(1, chunks=CHUNKS, computed_under=TAG)
        assert w.entry(hs[7]).extents[W64].plan.span == (192, 256)
        found = await w.store.lookup(P.LookupRequest(fingerprint=w.fp, prefix_hashes=hs, computed_under=TAG,
                                                     prefetch=False, max_tokens=2000, **head_aware()))
        assert found.num_prefix_hits == 7
        le = await trim_lease(w, hs, **head_aware(position=2000))
        assert [e.status for e in le.entries] == ["ok"] * 7 + ["missing"]
        le = await trim_lease(w, hs, **head_aware())  # no position: every token of every class
        assert [e.status for e in le.entries] == ["missing"] + ["ok"] * 6 + ["missing"]
        le = await trim_lease(w, hs, **head_aware(position=CHUNKS * 256))  # where the store kept them for
        assert [e.status for e in le.entries] == ["ok"] * CHUNKS
    finally:
        w.close()
