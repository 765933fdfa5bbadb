"""Room in a tier: which entries to evict when it needs space.

Decisions only: this module picks victims (through the tier's eviction policy, from metadata) and never
moves or frees a byte; ``kvd.store.pipeline`` acts on its answers, along the one eviction path
(``Pipeline.make_room``), for every caller: a reserve, a promotion, watermark relief, ``kvctl evict``.

Rules:
- only *evictable* entries are candidates: committed, not pinned, no holds (leases, moves in flight),
  not busy in the pipeline, with a copy in the tier;
- "cannot right now" changes nothing: when the candidates cannot free enough, ``victims`` answers
  empty (``partial=True``, for ``kvctl evict --max-bytes``, answers what there is);
- a request that can never fit the tier (larger than the tier itself) is refused before anything is
  evicted (``Tier.fits``).

Fragmentation (memory tiers with slot runs: the arena and the GPU pool): eviction by priority frees bytes wherever the victims
live. With extents of mixed sizes the freed slots may never be adjacent, and a large extent finds no
run although most of the arena is evictable. Then victims are chosen by *place*: the window of
``count`` consecutive slots whose occupants can all be evicted, with the fewest occupants.

Worked example, 8 slots, free ``.``, evictable entries ``a``..``c``, blocked ``#`` (leased, pinned,
pending): ``a.#bbc.c``, count 3 -> windows [3,6) = {b, c} and [5,8) = {c}: evict c, and slots 5-7
become a free run.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from kvd.store.entries import Entry, EntryKey
from kvd.store.index import Index, Level
from kvd.tiers.arena import Arena
from kvd.tiers.gpu import GpuPool, GpuTier
from kvd.tiers.host import HostTier


class Space:
    def __init__(self, index: Index, *, is_busy: Callable[[EntryKey], bool], clock: Callable[[], float],
                 partition_of: Callable[[str], str] = lambda namespace: "") -> None:
        self.index = index
        self.is_busy = is_busy
        self.clock = clock
        self.partition_of_namespace = partition_of  # a tenant's entries make room only among themselves

    def partition_of(self, name) -> str | None:
        """The partition (tenant) an extent name belongs to; None for no name (no restriction)."""
        return None if name is None else self.partition_of_namespace(name.namespace)

    def evictable(self, e: Entry, lv: Level) -> bool:
        return (not e.pinned and e.holds == 0 and not self.is_busy(e.key) and e.in_tier(lv.name)
                and self.index.get(e.key) is e)

    def victims(self, lv: Level, nbytes: int, *, match: Callable[[Entry], bool] | None = None,
                partial: bool = False, partition: str | None = None) -> list[Entry]:
        """Entries to evict from ``lv``, in its policy's order, freeing at least ``nbytes`` there
        (``partition``: only among that tenant's entries, whose room it is). Empty when that is
        impossible (``partial``: whatever matches, up to ``nbytes``)."""
        def can(key) -> bool:
            e = self.index.get(key)
            return (e is not None and self.evictable(e, lv) and (match is None or match(e))
                    and (partition is None or self.partition_of_namespace(e.namespace) == partition))

        keys = lv.policy.victims(nbytes, now=self.clock(), can_evict=can)
        out = [e for k in keys if (e := self.index.get(k)) is not None]
        freed = sum(self.index.meta(e, lv).nbytes for e in out)
        return out if partial or freed >= nbytes else []

    def by_place(self, lv: Level, nbytes: int, partition: str | None = None) -> list[Entry]:
        """Victims that free a run of slots for ``nbytes`` in a fragmented memory tier (empty if none)."""
        tier = lv.tier
        p = partition or ""
        if isinstance(tier, HostTier):
            slots: Arena | GpuPool | None = tier.arena(p)
        elif isinstance(tier, GpuTier):
            slots = tier.slot_space(p)
        else:
            return []
        if slots is None:
            return []
        evictable = (e for e in self.index if self.evictable(e, lv) and self.partition_of_namespace(e.namespace) == p)
        return evictable_window(slots, evictable, slots.slots_for(nbytes), tier.name) or []


def evictable_window(host: Arena | GpuPool, evictable: Iterable[Entry], count: int,
                     tier: str = "host") -> list[Entry] | None:
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
            copy = x.copies.get(tier)
            if copy is not None:
                first = copy.loc.offset // host.slot_bytes
                for slot in range(first, first + copy.loc.nbytes // host.slot_bytes):
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
