"""Moving extents between adjacent tiers: the one path for write-back, demotion, promotion and eviction.

The store's tiers form an ordered list of ``Level``s (``kvd.store.index``; top first). Every move of
bytes is one of two generic steps between two levels, whatever the tiers are:

- **down** (``write_down``: write-back and demotion): read the upper copy, make the lower tier's
  form of it (memory -> record: encode with the extent's placement codec; record -> record: the
  record as it is; memory -> memory, GPU pool -> arena: the raw bytes, checked against the commit
  checksum), find room below (``reserve``, which may evict there in turn), write, place the new copy.
  Cold extents then leave the memory tier they were written down from.
- **up** (``kvd.store.promote``): find room in the arena (``Index.landing``), read the nearest usable
  copy elsewhere, decode and verify it into the arena's slots, place the copy, flagged lossy when its
  source was.

Eviction has one path, ``make_room`` -> ``evict``: victims chosen by ``kvd.store.space``; those that
must be kept (admitted, with no copy below yet) are written down first; then their copies leave the
tier. An entry that loses the last copy of an extent (not let go on purpose) leaves the index whole:
a partial entry is never kept (exact readers could never load it).

Threads: codecs and checksums run on the CPU executor, blocking tiers' I/O on the I/O executor, so a
stalled disk (``kvctl compact``) never holds up commit checksums. While an entry is being moved it
is *busy* and held (``Entry.holds``): nothing frees its bytes under the move.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import Executor

from kvd.codecs import Codecs
from kvd.core.errors import CorruptData, KvdError
from kvd.daemon.metrics import Metrics
from kvd.store.entries import Entry, EntryKey, Extent
from kvd.store.forms import Forms, Payload
from kvd.store.index import Index, Level
from kvd.store.puts import Puts
from kvd.store.space import Space
from kvd.tiers.base import ExtentName, Location
from kvd.tiers.record import name_key

logger = logging.getLogger(__name__)


async def _no_registrations(lv: Level, fingerprints: set[str]) -> None:
    return None


class Pipeline:
    def __init__(self, index: Index, *, codecs: Codecs, cpu: Executor, io: Executor, metrics: Metrics,
                 admitted: Callable[[Entry], bool], dtype_of: Callable[[str], str],
                 clock: Callable[[], float]) -> None:
        self.index = index
        self.levels = index.levels
        self.forms = Forms(codecs, metrics, dtype_of)
        self.cpu_pool, self.io_pool = cpu, io
        self.metrics = metrics
        self.admitted = admitted  # may an entry be written below the top tier (kvd.policies.admission)
        self.keep_for: Callable[[Entry], bool] = lambda e: False  # owed to a lower tier (write-through)
        self.registered = _no_registrations  # models' registrations made durable in a tier (Admin.registered)
        self.clock = clock
        self.busy: set[EntryKey] = set()
        self.space = Space(index, is_busy=self.busy.__contains__, clock=clock, partition_of=index.partition_of)
        self._tasks: set[asyncio.Task] = set()
        self.puts = Puts(self)  # a batch of copies into one tier: reserve, write, index
        # Record drops still running, per (tier, record key): a record tier keys records by extent name,
        # so a new copy of an extent whose old copy is being dropped must wait for that drop (else the
        # tier still holds the key, or the late drop deletes the new record).
        self._dropping: dict[tuple[str, bytes], asyncio.Task] = {}

    # ---- plumbing ------------------------------------------------------------------------------

    async def on_cpu(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.cpu_pool, fn, *args)

    async def on_io(self, lv: Level, fn, *args, op: str | None = None):
        """``fn(*args)`` for ``lv``'s tier: on the I/O executor for blocking tiers, timed as ``op`` (or fn's name)."""
        if not lv.tier.blocking:
            return fn(*args)
        t0 = time.perf_counter()
        try:
            return await asyncio.get_running_loop().run_in_executor(self.io_pool, fn, *args)
        finally:
            self.metrics.tier_io_seconds.labels(lv.name, op or fn.__name__).observe(time.perf_counter() - t0)

    def below(self, lv: Level) -> Level | None:
        return self.levels[lv.level + 1] if lv.level + 1 < len(self.levels) else None

    def hold(self, e: Entry) -> None:
        """One more reader or move of ``e``: it is not evicted or freed until ``unhold``."""
        e.holds += 1

    def unhold(self, e: Entry) -> None:
        e.holds -= 1
        assert e.holds >= 0, f"hold count of {e.key} went negative"
        if e.holds == 0 and self.index.doomed.pop(id(e), None) is not None:
            self._free_all(e)

    async def drain(self) -> None:
        """Wait for the frees in flight (so a tier's accounting is up to date)."""
        if self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def close(self) -> None:
        await self.drain()

    # ---- freeing -------------------------------------------------------------------------------

    def discard(self, lv: Level, locs: list[Location], *, written: bool = True) -> asyncio.Task | None:
        """Give ``locs`` back to ``lv``'s tier: now for memory tiers, in the I/O executor otherwise.
        ``written=False``: reservations a failed write never filled (not counted as records dropped)."""
        if not locs:
            return None
        if not lv.tier.blocking:
            for loc in locs:
                lv.tier.drop(loc)
            return None

        def drop_all() -> None:
            for loc in locs:
                try:
                    lv.tier.drop(loc)
                except Exception:  # noqa: BLE001 - a failed delete leaks disk, never data; logged
                    logger.warning("could not drop %s record %s", lv.name, loc.key, exc_info=True)

        task = asyncio.get_running_loop().create_task(self.on_io(lv, drop_all, op="drop"))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        keys = [(lv.name, loc.key) for loc in locs]
        for k in keys:  # a new copy of the same record waits for this drop (``reserve``)
            self._dropping[k] = task
        task.add_done_callback(lambda t: [self._dropping.pop(k, None) for k in keys if self._dropping.get(k) is t])
        if written:
            self.metrics.tier_drops.labels(lv.name).inc(len(locs))
        return task

    def drop_copies(self, e: Entry, lv: Level) -> asyncio.Task | None:
        """``e`` leaves ``lv``'s tier. If that was the last copy of an extent, ``e`` leaves the index."""
        locs = [c.loc for x in e.extents.values() if (c := self.index.unplace(e, x, lv)) is not None]
        task = self.discard(lv, locs)
        if not e.is_whole():
            self.remove(e)
        return task

    def remove(self, e: Entry, *, shared: bool = False) -> None:
        """``e`` leaves the index; its bytes are freed now, or at its last release if it is held.
        Its records in a shared tier (the remote cluster) are other hosts' too: they stay there (the
        cluster's TTL and memory policy retire them) unless ``shared`` (an operator's delete). Before,
        a host that found one record of an entry missing, e.g. across a failover, deleted the entry's
        other records and manifest from the cluster, for every host."""
        if not shared:
            for lv in self.levels:
                if lv.tier.shared:
                    for x in e.extents.values():
                        self.index.unplace(e, x, lv)
        self.index.forget(e)
        if e.holds:
            # Readers hold memory copies only; its records go now: a record tier keys them by extent
            # name, and the same key stored again meanwhile must find the key free (``reserve`` waits
            # for these drops).
            for lv in self.index.records:
                self.discard(lv, [c.loc for x in e.extents.values() if (c := x.copies.pop(lv.name, None))])
            self.index.doomed[id(e)] = e
        else:
            self._free_all(e)

    def _free_all(self, e: Entry) -> None:
        for lv in self.levels:
            self.discard(lv, [c.loc for x in e.extents.values() if (c := x.copies.pop(lv.name, None))])

    # ---- room ----------------------------------------------------------------------------------

    async def reserve(self, lv: Level, nbytes: int, name: ExtentName | None = None) -> Location | None:
        """Room for ``nbytes`` in ``lv``, evicting there if needed; ``None`` if it cannot be made now.
        A request larger than the tier itself is refused before anything is evicted."""
        if not lv.tier.fits(nbytes, name):
            return None
        if lv.tier.holds_records and name is not None and self._dropping:
            pending = self._dropping.get((lv.name, name_key(name)))
            if pending is not None:
                await asyncio.wait([pending])
        partition = self.space.partition_of(name)
        if not await self._within_quota(lv, nbytes, partition):
            return None
        for by_place in (False, False, True):  # the policy's choice first: usually it frees a run
            loc = lv.tier.reserve(nbytes, name)
            if loc is not None:
                return loc
            need = nbytes
            if lv.tier.holds_records:  # a byte budget: over it (capacity lowered across a restart), free the excess too
                st = lv.tier.stats()
                need = max(nbytes, st.used_bytes + nbytes - st.capacity_bytes)
            victims = (self.space.by_place(lv, nbytes, partition) if by_place
                       else self.space.victims(lv, need, partition=partition))
            if victims:
                await self.evict(victims, lv)
        return lv.tier.reserve(nbytes, name)

    async def _within_quota(self, lv: Level, nbytes: int, partition: str | None) -> bool:
        """A tenant's quota in ``lv``: evict among its own entries until ``nbytes`` more fit, or say no."""
        quota = lv.quota(partition) if lv.quota is not None and partition is not None else None
        if quota is None:
            return True
        if nbytes > quota:
            return False
        in_flight = self.puts.in_flight.get((lv.name, partition), 0)
        over = self.index.usage(lv.name, partition) + in_flight + nbytes - quota
        if over > 0:
            victims = self.space.victims(lv, over, partition=partition)
            if victims:
                await self.evict(victims, lv)
        in_flight = self.puts.in_flight.get((lv.name, partition), 0)
        return self.index.usage(lv.name, partition) + in_flight + nbytes <= quota

    async def evict(self, entries: list[Entry], lv: Level) -> int:
        """Evict ``entries`` from ``lv`` (the one eviction path); returns the bytes freed there. Entries
        that must be kept are written to the next tier first; entries held meanwhile are skipped."""
        lower = self.below(lv)
        # Measured before the write-down: the cold extents of a kept entry leave ``lv`` in it (``_cool``).
        held_here = [self.index.meta(e, lv).nbytes for e in entries]
        if lower is not None:
            keep = [e for e in entries if self._must_keep(e, lv)]
            if keep:
                await self.write_down(keep, lv)
        freed, tasks = 0, []
        for e, nbytes in zip(entries, held_here):
            if not self.space.evictable(e, lv):
                continue
            freed += nbytes
            tasks.append(self.drop_copies(e, lv))
            self.metrics.evicted_entries.labels(lv.name).inc()
        waits = [t for t in tasks if t is not None]
        if waits:  # deletes done: the room is real before the caller reserves again
            await asyncio.gather(*waits, return_exceptions=True)
        return freed

    def _must_keep(self, e: Entry, lv: Level) -> bool:
        """Some exact extent lives only at ``lv`` or above and the next tier takes it, and the entry may
        go below: admission guards the way from the memory tiers into the record tiers only (the GPU
        pool's victims always go down to the arena, and record tiers' down to the next one)."""
        lower = self.below(lv)
        deeper = {x.name for x in self.levels[lv.level + 1 :]}
        only_here = any(lv.name in x.copies and not x.copies[lv.name].is_lossy and not deeper & x.copies.keys()
                        and lower is not None and lower.accepts(x.head_class, x.is_hot) for x in e.extents.values())
        gated = lower is not None and lower.tier.holds_records and not lv.tier.holds_records
        return only_here and (not gated or self.admitted(e) or self.keep_for(e))

    # ---- down ----------------------------------------------------------------------------------

    def needs_write(self, e: Entry) -> bool:
        """Some exact extent of ``e`` lives only in memory tiers (and placement keeps it), and there is a
        record tier to write it to."""
        if not self.index.records:
            return False
        memory = self.index.memory_names
        for x in e.extents.values():  # loops, not nested any(<generator>): every lookup hit asks this
            copies = x.copies
            if copies and not x.dropped and copies.keys() <= memory:
                for c in copies.values():
                    if not c.is_lossy:
                        return True
        return False

    async def write_down(self, entries: list[Entry], lv: Level, dst: Level | None = None,
                         classes: Callable[[Entry], set[str]] | None = None) -> int:
        """Give every extent of ``entries`` held at ``lv`` a copy in ``dst`` (default: the next tier;
        write-through skips tiers in between), durable there on return; cold extents then leave the
        top tier. ``classes``: per entry, the head classes to write (default all that ``dst`` takes).
        Returns the number of extents written."""
        lower = dst or self.below(lv)
        if lower is None:
            return 0
        adjacent = lower.level == lv.level + 1
        jobs: list[tuple[Entry, Extent]] = []
        for e in entries:
            if e.key in self.busy or self.index.get(e.key) is not e:
                continue
            wanted = classes(e) if classes is not None else None
            for x in e.extents.values():
                copy = x.copies.get(lv.name)
                if (copy is None or copy.is_lossy or lower.name in x.copies or x.dropped
                        or not lower.accepts(x.head_class, x.is_hot)
                        or (wanted is not None and x.head_class not in wanted)):
                    continue  # a lossy copy came from below: never re-encoded as if exact
                if x.lower_codec is None and lower.tier.holds_records:
                    if adjacent:
                        self._let_go(e, x, lv)
                    continue
                jobs.append((e, x))
        if not jobs:
            return 0
        held = {e.key: e for e, _ in jobs}
        for e in held.values():
            self.busy.add(e.key)
            self.hold(e)
        t0 = time.perf_counter()
        corrupt: list[tuple[Entry, Extent]] = []
        try:
            payloads = await self._produce_all(jobs, lv, lower, corrupt)
            kept = [(j, p) for j, p in zip(jobs, payloads) if p is not None]
            written = await self.puts.put_all([j for j, _ in kept], [p for _, p in kept], lower)
        finally:
            for e in held.values():
                self.busy.discard(e.key)
                self.unhold(e)
        self.metrics.moved_seconds.labels("demote", lower.name).inc(time.perf_counter() - t0)
        self._drop_corrupt(corrupt, lv)
        if not lv.tier.holds_records and adjacent:
            for e in held.values():
                self._cool(e, lv, lower)
        return written

    def _drop_corrupt(self, corrupt: list[tuple[Entry, Extent]], lv: Level) -> None:
        """Copies in a memory tier that failed their commit checksum on the way down (an engine wrote
        over them): they leave the index, and the entry with them if that was its last copy."""
        for e, x in corrupt:
            self.metrics.checksum_failures.labels(lv.name).inc()
            bad = self.index.unplace(e, x, lv)
            self.discard(lv, [bad.loc] if bad else [])
            if self.index.get(e.key) is e and not e.is_whole():
                self.remove(e)

    def _let_go(self, e: Entry, x: Extent, lv: Level) -> None:
        """Placement keeps this extent only in memory (``local_cold_codec = drop``): it is let go."""
        if e.holds == 0 and not lv.tier.holds_records and not x.is_hot:
            copy = self.index.unplace(e, x, lv)
            self.discard(lv, [copy.loc] if copy else [])
            x.dropped = True
            self.metrics.dropped_cold_extents.inc()

    def _cool(self, e: Entry, top: Level, lower: Level) -> None:
        """Cold extents (placement) leave a memory tier once a copy below holds them."""
        if e.holds or self.index.get(e.key) is not e:
            return
        locs = [c.loc for x in e.extents.values()
                if not x.is_hot and lower.name in x.copies and (c := self.index.unplace(e, x, top)) is not None]
        self.discard(top, locs)

    async def _produce_all(self, jobs: list[tuple[Entry, Extent]], lv: Level, lower: Level,
                           corrupt: list[tuple[Entry, Extent]]) -> list[Payload | None]:
        def produce() -> list[Payload | None]:
            out: list[Payload | None] = []
            for e, x in jobs:
                try:
                    out.append(self.forms.produce(e, x, lv, lower))
                except KvdError as err:  # unreadable source (corrupt, gone, unreachable): not written
                    logger.warning("not written to %s: %s", lower.name, err)
                    self.metrics.tier_errors.labels(lv.name, "read").inc()
                    if isinstance(err, CorruptData) and not lv.tier.holds_records:
                        corrupt.append((e, x))  # dropped on the loop (``_drop_corrupt``)
                    out.append(None)
            return out

        if lv.tier.holds_records:  # record -> record: reading is the work
            return await self.on_io(lv, produce, op="read")  # records read to be re-encoded
        return await self.on_cpu(produce)
