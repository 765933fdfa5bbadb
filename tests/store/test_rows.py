"""Lookup rows cached on entries (``Entry.rows``): every change of a copy or a plan empties the cache,
so a lookup never answers from a row older than the entry's copies."""

from types import SimpleNamespace

import pytest

from kvd.core.extents import ExtentPlan
from kvd.store import answers as L
from kvd.store.entries import Copies, Copy, Entry, Extent
from kvd.tiers.base import Location

PLAN = ExtentPlan("global", ((0, 0),), 4, 1, 1)  # 4 tokens of head dim 1, 1-byte elements
LEVELS = [SimpleNamespace(level=0, name="host"), SimpleNamespace(level=1, name="ssd")]  # what rows read of a Level
BY_NAME = {lv.name: lv for lv in LEVELS}


def entry() -> Entry:
    extents = {c: Extent(plan=PLAN, copies={"host": Copy(Location("host", i * 4096, 4096), "raw", None)})
               for i, c in enumerate(("global", "local"))}
    return Entry(key=("ns", "fp", "h"), kind="prefix", num_tokens=4, start_token=0, end_token=4,
                 computed_under="exact", extents=extents, created=0, last_access=0)


def parts(e: Entry, lossy: bool = False):
    return L.cached_parts(LEVELS, BY_NAME, e, lossy)


def test_an_entry_binds_every_extents_copies_to_its_cache():
    e = entry()
    assert all(isinstance(x.copies, Copies) and x.copies.rows is e.rows for x in e.extents.values())
    assert parts(e) == ("host", ("global", "local"), True)
    assert e.rows  # cached


@pytest.mark.parametrize("change", [
    lambda c, cp: c.__setitem__("ssd", cp), lambda c, cp: c.pop("host"), lambda c, cp: c.__delitem__("host"),
    lambda c, cp: c.popitem(), lambda c, cp: c.clear(), lambda c, cp: c.update(ssd=cp),
    lambda c, cp: c.setdefault("ssd", cp), lambda c, cp: c.__ior__({"ssd": cp}),
])
def test_every_change_of_copies_empties_the_cached_rows(change):
    e = entry()
    parts(e)
    change(e.extents["local"].copies, Copy(Location("ssd", 0, 4096, b"k"), "fp8", 1))
    assert e.rows == {}
    assert parts(e) == L.row_parts(LEVELS, BY_NAME, e, False)  # recomputed from the copies as they are now


def test_rows_follow_a_demotion_and_lossy_copies():
    e = entry()
    assert parts(e) == ("host", ("global", "local"), True)
    local = e.extents["local"].copies
    local["ssd"] = Copy(Location("ssd", 0, 4096, b"k"), "fp8", 1)
    del local["host"]
    assert parts(e) == ("host", ("global",), False)  # an exact reader cannot use the lossy copy
    assert parts(e, lossy=True) == ("ssd", ("global", "local"), True)


def test_a_new_plan_empties_the_cache_and_trimmed_follows_it():
    e = entry()
    assert not e.is_trimmed and parts(e)
    e.extents["local"].set_plan(PLAN.trim(1, 3))
    assert e.rows == {}
    assert e.is_trimmed
