"""Making room in the arena when it is fragmented: choose a window of slots to clear.

Eviction by priority frees bytes wherever the victims happen to live. With extents of mixed sizes
(one-slot entries of a small model beside eight-slot entries of a large one) the freed slots may
never be adjacent, and a large extent finds no run although most of the arena is evictable. Then
the store evicts by *place*: the window of ``count`` consecutive slots whose occupants can all be
evicted, choosing the one with the fewest occupants.

Worked example, 8 slots, free ``.``, evictable entries ``a``..``c``, blocked ``#`` (leased, pinned,
pending): ``a.#bbc.c``, count 3 -> windows [3,6) = {b, c} and [5,8) = {c}: evict c, and slots 5-7
become a free run.
"""

from __future__ import annotations

from collections.abc import Iterable

from kvd.store.entries import Entry
from kvd.tiers.host import HostTier


def evictable_window(host: HostTier, evictable: Iterable[Entry], count: int) -> list[Entry] | None:
    """Entries to evict so that ``count`` consecutive slots become free; None if no window can be cleared.

    ``evictable``: the entries the caller may evict now. Every other allocated slot is blocked,
    including slots of reservations in flight and of entries outside the index.
    """
    n = host.num_slots
    owner: list[Entry | None] = [None] * n  # slot -> evictable entry holding it
    blocked = [True] * n
    for start, length in host.allocator.free_runs():
        blocked[start : start + length] = [False] * length
    for e in evictable:
        for x in e.extents.values():
            if x.host is not None:
                first = x.host.offset // host.slot_bytes
                for slot in range(first, first + x.host.nbytes // host.slot_bytes):
                    owner[slot], blocked[slot] = e, False
    best: tuple[int, int] | None = None  # (distinct occupants, start)
    start, occupants = 0, {}  # sliding window [start, end]: id(entry) -> slots of it inside
    for end in range(n):
        if blocked[end]:
            start, occupants = end + 1, {}
            continue
        if owner[end] is not None:
            occupants[id(owner[end])] = occupants.get(id(owner[end]), 0) + 1
        if end - start + 1 > count:
            o = owner[start]
            if o is not None:
                occupants[id(o)] -= 1
                if not occupants[id(o)]:
                    del occupants[id(o)]
            start += 1
        if end - start + 1 == count and (best is None or len(occupants) < best[0]):
            best = (len(occupants), start)
    if best is None:
        return None
    chosen: dict[int, Entry] = {}
    for slot in range(best[1], best[1] + count):
        if owner[slot] is not None:
            chosen[id(owner[slot])] = owner[slot]
    return list(chosen.values())
