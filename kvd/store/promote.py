"""Promotion: bringing what a reader needs of an entry into the arena (``Index.landing``), which it maps.

For each extent a reader needs that has no usable copy in a memory tier it maps (``readable``: the
arena, and the GPU pool for a reader that maps it) — exact, or lossy for a reader that accepts it:
find room in the arena (``Pipeline.reserve``, the one eviction path), read the fastest usable copy
elsewhere (exact copies first: the GPU pool's, for a reader of the arena only, or the nearest record
tier's), verify and decode it into the slots (``kvd.store.forms``), place the copy — flagged lossy
when its source was. Promotions never land in the GPU pool: it holds what engines stored. What can go wrong is told apart: a copy that fails
verification (``corrupt``) or that its tier no longer holds (``missing``) is dropped from the index,
and the entry with it if that was its last copy; a tier that cannot be asked now (``unavailable``,
e.g. the remote cluster mid-failover) keeps its copy for a later try. The reader misses either way.
"""

from __future__ import annotations

import asyncio
import logging
import time

from kvd.core.errors import CorruptData, KvdError, RecordMissing, StorageFormatError, TierUnavailable
from kvd.core.extents import class_kind
from kvd.store.entries import Copy, Entry, Extent
from kvd.store.index import Level
from kvd.store.pipeline import Pipeline
from kvd.tiers.base import Location

logger = logging.getLogger(__name__)


class Promotion:
    def __init__(self, pipeline: Pipeline) -> None:
        self.pipeline = pipeline

    def readable(self, gpu: bool) -> frozenset[str]:
        """The memory tiers a reader maps: every one if it maps the GPU pool, else the arena."""
        index = self.pipeline.index
        return frozenset(lv.name for lv in index.memory) if gpu else frozenset((index.landing.name,))

    def missing(self, e: Entry, classes: list[str] | None, accept_lossy: bool,
                readable: frozenset[str] | None = None) -> list[Extent]:
        """Extents of ``classes`` with no usable copy in the tiers ``readable`` (default: the arena)."""
        where = readable or frozenset((self.pipeline.index.landing.name,))
        return [x for c, x in e.extents.items() if (classes is None or c in classes)
                and not any(t in x.copies and (accept_lossy or not x.copies[t].is_lossy) for t in where)]

    def source(self, x: Extent, accept_lossy: bool) -> Level | None:
        """The fastest level other than the arena holding a usable copy of ``x`` (exact ones first)."""
        landing = self.pipeline.index.landing
        for lossy_ok in (False, True) if accept_lossy else (False,):
            for lv in self.pipeline.levels:
                c = x.copies.get(lv.name)
                if lv is not landing and c is not None and (lossy_ok or not c.is_lossy):
                    return lv
        return None

    async def promote(self, e: Entry, classes: list[str] | None, accept_lossy: bool = False,
                      readable: frozenset[str] | None = None) -> bool:
        """Copy what a reader of ``classes`` (mapping the tiers ``readable``; default the arena) needs of
        ``e`` into the arena. False if some part could not be brought (no room now, no usable copy,
        corrupt): the reader then misses that entry."""
        top = self.pipeline.index.landing
        want = self.missing(e, classes, accept_lossy, readable)
        sources = [self.source(x, accept_lossy) for x in want]
        if not want or None in sources or e.key in self.pipeline.busy:
            return not want
        if any(top.name in x.copies for x in want) and e.holds > e.waiting:
            return False  # a lossy copy in use up there (leased): an exact one cannot take its place now
        t0 = time.perf_counter()
        self.pipeline.hold(e)
        self.pipeline.busy.add(e.key)
        slots: list[tuple[Extent, Level, Location]] = []
        try:
            for x, src in zip(want, sources):
                loc = await self.pipeline.reserve(top, x.nbytes, e.name(x.head_class))
                if loc is None:  # no room now: give back what this promotion took; the reader recomputes
                    self.pipeline.discard(top, [s[2] for s in slots])
                    self.pipeline.metrics.prefetch_failures.inc()
                    return False
                slots.append((x, src, loc))
            # Every fetch ends before any slot is given back: a decode still writing into freed slots
            # would write into another writer's reservation.
            results = await asyncio.gather(*(self._fetch(e, x, src, top, loc) for x, src, loc in slots),
                                           return_exceptions=True)
            failed = [r for r in results if isinstance(r, BaseException)]
            if failed:
                raise failed[0]
        except BaseException:
            self.pipeline.discard(top, [s[2] for s in slots])
            raise
        finally:
            self.pipeline.busy.discard(e.key)
            self.pipeline.unhold(e)
        ok = self._place_promoted(e, slots, results, top)
        if ok:  # (a copy found corrupt or gone counts there: kvd_checksum_failures, kvd_tier_misses)
            self.pipeline.metrics.prefetches.inc()
            self.pipeline.metrics.prefetch_latency.observe(time.perf_counter() - t0)
        self.pipeline.metrics.moved_seconds.labels("promote", sources[0].name).inc(time.perf_counter() - t0)
        return ok

    async def _fetch(self, e: Entry, x: Extent, src: Level, top: Level, loc: Location) -> Copy | str:
        """Bring ``x``'s copy at ``src`` into ``loc`` (top): the new copy, or why not: ``corrupt`` (failed
        verification), ``missing`` (the tier no longer holds it), ``unavailable`` (cannot be asked now)."""
        copy = x.copies.get(src.name)
        if copy is None:  # the entry was deleted while this promotion made room: its records went with it
            return "missing"
        out = top.tier.read(loc)[: x.nbytes]
        try:
            data = await self.pipeline.on_io(src, src.tier.read, copy.loc)
            codec, checksum = await self.pipeline.on_cpu(self.pipeline.forms.place_into, src, copy, data, out,
                                                         x.plan.layout)
            # The decode has finished reading it (and only then: a cancelled await may leave the worker
            # thread still reading, so that path does not give it back).
            src.tier.recycle(data)
            return Copy(loc, codec, checksum)
        except RecordMissing as err:
            logger.info("%s", err)
            self.pipeline.metrics.tier_misses.labels(src.name).inc()
            return "missing"
        except StorageFormatError as err:  # another kvd version's record (a rolling upgrade): a miss here,
            logger.warning("not served: %s", err)  # left for the hosts that read it, never deleted as corrupt
            self.pipeline.metrics.tier_misses.labels(src.name).inc()
            return "missing"
        except CorruptData as err:
            if x.copies.get(src.name) is not copy:  # deleted (or moved) while read: gone, not damaged
                return "missing"
            logger.error("not served: %s", err)
            self.pipeline.metrics.checksum_failures.labels(src.name).inc()
            return "corrupt"
        except TierUnavailable as err:
            logger.debug("%s", err)
            self.pipeline.metrics.tier_errors.labels(src.name, "read").inc()
            return "unavailable"
        except KvdError as err:  # e.g. a record of another size under this key: unusable, as corrupt
            logger.error("not served: %s", err)
            self.pipeline.metrics.checksum_failures.labels(src.name).inc()
            return "corrupt"

    def _place_promoted(self, e: Entry, slots, results: list[Copy | str], top: Level) -> bool:
        ok = True
        for (x, src, loc), copy in zip(slots, results):
            if self.pipeline.index.get(e.key) is not e:  # deleted meanwhile
                self.pipeline.discard(top, [loc])
                continue
            if isinstance(copy, str):
                ok = False
                self.pipeline.discard(top, [loc])
                if copy != "unavailable":  # corrupt or gone below: so is the entry if it was the last copy
                    bad = self.pipeline.index.unplace(e, x, src)
                    self.pipeline.discard(src, [bad.loc] if bad and copy == "corrupt" else [])
                    if not e.is_whole():
                        self.pipeline.remove(e)
                continue
            if e.holds > e.waiting and top.name in x.copies:  # the lossy copy was leased meanwhile: it stays
                self.pipeline.discard(top, [loc])  # (freed, its reader would read another entry's bytes)
                ok = False
                continue
            old = self.pipeline.index.unplace(e, x, top)  # a lossy copy an exact one replaces
            self.pipeline.discard(top, [old.loc] if old else [])
            self.pipeline.index.place(e, x, top, copy)
            self.pipeline.metrics.promotions.labels(src.name, class_kind(x.head_class)).inc()
            self.pipeline.metrics.moved_bytes.labels("promote", src.name).inc(x.nbytes)
        return ok
