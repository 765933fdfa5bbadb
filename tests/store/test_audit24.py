"""Audit 24: who may read what, and what lookups and leases answer (kvd.store.readers, answers, the
registry's head-map rule the readers rely on)."""

from __future__ import annotations

import pytest

from kvd.core.errors import Conflict
from kvd.core.headmap import HeadMap
from tests.store.test_pipeline import HM, MODEL, World


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
