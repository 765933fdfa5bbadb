"""Choosing room: the fragmented-arena window (the eviction-by-policy scenarios live in test_store)."""

from kvd.core.extents import ExtentPlan
from kvd.store.entries import Copy, Entry, Extent
from kvd.store.space import evictable_window
from kvd.tiers.host import HostTier

PLAN = ExtentPlan("global", ((0, 0),), 1, 1, 1)


def entry(name: str, *locs) -> Entry:
    extents = {cls: Extent(plan=PLAN, copies={"host": Copy(loc, "raw", None)}) for cls, loc in zip(("global", "local"), locs)}
    return Entry(key=("ns", "fp", name), kind="prefix", num_tokens=1, start_token=0, end_token=1,
                 computed_under="exact", extents=extents, created=0, last_access=0)


def test_window_with_fewest_occupants_around_blocked_slots(tmp_path):
    """The module docstring's example: a.#bbc.c (c's two extents at 5 and 7), count 3 -> evict only c."""
    host = HostTier(tmp_path / "a", 8 * 4096, 4096)
    a = entry("a", host.reserve(4096))
    gap1 = host.reserve(4096)
    host.reserve(4096)  # slot 2: held by something outside the evictable set (a lease, a reservation)
    b = entry("b", host.reserve(2 * 4096))
    c_first = host.reserve(4096)
    gap2 = host.reserve(4096)
    c = entry("c", c_first, host.reserve(4096))
    host.drop(gap1)
    host.drop(gap2)
    assert evictable_window(host.arena(), [a, b, c], 3) == [c]
    assert set(map(id, evictable_window(host.arena(), [a, b, c], 5))) == {id(b), id(c)}  # slots 3-7
    assert evictable_window(host.arena(), [a, b], 3) is None  # c not evictable: every window of 3 is blocked
    host.close()
