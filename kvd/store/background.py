"""The store's background work: write-back of admitted entries, watermark relief and prefetches.

When things move (this module) is apart from how they move (``kvd.store.pipeline``):

- **write-back**: an entry *admitted* to the record tiers (seen ``ssd.admit_after`` times, or pinned;
  ``kvd.policies.admission``) is queued, and the background task writes it down through the memory
  tiers (GPU pool -> arena -> SSD) with the codec head-aware placement chose at commit; cold extents
  then leave each memory tier they were written down from.
- **relief**: above a memory tier's high watermark (``host.high_watermark``, for the GPU pool too),
  victims of its eviction policy leave it until usage is under the low watermark, through the one
  eviction path (the GPU pool's go down to the arena; admitted ones are written first).
- **prefetch**: a lookup that finds extents only in record tiers starts promoting them into the arena;
  a lease waits for that (or for a copy down from the GPU pool, for a reader that does not map it),
  up to a deadline.

One task (``run``) does write-back then relief in rounds; prefetches are tasks of their own, one per
entry at a time. Failures are logged and counted; the loop survives them.

**Loads first.** Write-back and write-through batches wait while an engine is loading (a lease held,
or a lookup hit in the last ``LOAD_QUIET_S``: its lease is usually a step away), at most
``ssd.yield_to_loads_s`` per batch. Why: a lookup hit is what admits an entry (its second sighting),
so its write-back used to start at the very moment the engine loaded it, and encoding and writing
94 MB beside the engine's step slowed every op of that step's forward pass 2-3x on a 2-core VM (a
one-off cProfile); ``benchmarks/vllm_hit_profile.py`` measured the 4K hit at 297 ms before, 206 after. Relief never waits: it frees the
arena for stores, and writes down what it evicts at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import Callable

from kvd.core.config import Settings
from kvd.daemon.metrics import Metrics
from kvd.policies.admission import SsdAdmission
from kvd.store.entries import Entry, EntryKey
from kvd.store.index import Index
from kvd.store.pipeline import Pipeline
from kvd.store.promote import Promotion

logger = logging.getLogger(__name__)

MAX_QUEUE = 65536  # entries waiting for write-back; beyond it the oldest waits for relief instead
BATCH_BYTES = 64 << 20  # raw bytes written per batch: bounds memory in flight
IDLE_S = 0.2
RELIEF_ROUNDS = 64  # bounded: each round frees at least one victim or stops
LOAD_QUIET_S = 0.1  # a lookup hit counts as a load starting for this long (its lease follows in the step)
YIELD_POLL_S = 0.01


class Background:
    def __init__(self, index: Index, pipeline: Pipeline, admission: SsdAdmission, settings: Settings,
                 metrics: Metrics, *, leases_held: Callable[[], int] = lambda: 0) -> None:
        self.index = index
        self.pipeline = pipeline
        self.promotion = Promotion(pipeline)
        self.admission = admission
        self.settings = settings
        self.metrics = metrics
        self._queue: OrderedDict[EntryKey, None] = OrderedDict()  # admitted, waiting for write-back
        self._through: OrderedDict[EntryKey, None] = OrderedDict()  # committed, waiting for write-through
        self._prefetching: dict[EntryKey, asyncio.Task] = {}
        self._wake = asyncio.Event()
        self.leases_held = leases_held  # the store's count of held leases: engines loading
        self._last_hit = float("-inf")  # time.monotonic() of the last lookup that found entries

    @property
    def has_lower(self) -> bool:
        """A record tier of this host's own (SSD) to write admitted entries back to. The cluster is not
        one: it gets extents written through, or as they leave this host (docs/remote.md)."""
        return any(not lv.tier.shared for lv in self.index.records)

    # ---- hooks from the store ------------------------------------------------------------------

    def admitted(self, e: Entry) -> bool:
        self.admission.admit_after = self.settings.ssd.admit_after  # reloadable (SIGHUP)
        return self.admission.admit(e.key, pinned=e.pinned, seen=e.seen)

    def on_seen(self, e: Entry) -> None:
        """A store or lookup hit: count it, and queue the entry for write-back once admitted.

        The admission table (history that outlives the entry) hears of a sighting only while the
        entry's own count (``Entry.seen``, which ``admitted`` also reads) has not passed
        ``admit_after``: beyond that no sighting changes an answer, and recording each hit of a hot
        entry was a sixth of a 128-hit lookup's store time."""
        if e.seen <= self.settings.ssd.admit_after:
            self.admission.record(e.key)
        if not self.has_lower or e.key in self._queue or not self.pipeline.needs_write(e):
            return
        if self.admitted(e):
            self._enqueue(e)
        else:
            self.metrics.admission_refusals.inc()

    def on_hit(self) -> None:
        """A lookup found entries: an engine is about to lease them (write-backs hold off)."""
        self._last_hit = time.monotonic()

    def loading(self) -> bool:
        """An engine is loading: a lease is held, or a lookup hit was just answered."""
        return self.leases_held() > 0 or time.monotonic() - self._last_hit < LOAD_QUIET_S

    async def yield_to_loads(self) -> None:
        """Wait until no engine is loading, at most ``ssd.yield_to_loads_s`` (0: never wait). Real time,
        not the store's clock: tests freeze that one."""
        limit = self.settings.ssd.yield_to_loads_s
        if limit <= 0 or not self.loading():
            return
        t0 = time.monotonic()
        while self.loading() and time.monotonic() - t0 < limit:
            await asyncio.sleep(YIELD_POLL_S)
        self.metrics.background_yield_seconds.inc(time.monotonic() - t0)

    def on_pin(self, e: Entry) -> None:
        if self.has_lower and self.pipeline.needs_write(e):
            self._enqueue(e)
        self.on_commit(e)  # pinned: every head class is written through to shared tiers

    def on_commit(self, e: Entry) -> None:
        """Queue the entry for the tiers that take some of its head classes at commit (write-through)."""
        if any(self._through_classes(e, lv) for lv in self.index.levels[1:]):
            self._through[e.key] = None
            self._wake.set()

    def _through_classes(self, e: Entry, lv) -> set[str]:
        return {c for c, x in e.extents.items() if lv.name not in x.copies and lv.write_policy is not None
                and (lv.writes_through(c, x.is_hot) or (e.pinned and lv.accepts(c, x.is_hot)))}

    def on_remove(self, e: Entry) -> None:
        """The entry was deleted: its sightings are forgotten (an eviction keeps them)."""
        self._queue.pop(e.key, None)
        self.admission.forget(e.key)

    def _enqueue(self, e: Entry) -> None:
        self._queue[e.key] = None
        while len(self._queue) > MAX_QUEUE:
            self._queue.popitem(last=False)
        self._wake.set()

    # ---- prefetch ------------------------------------------------------------------------------

    def prefetch(self, e: Entry, classes: list[str] | None = None, accept_lossy: bool = False,
                 readable: frozenset[str] | None = None) -> asyncio.Task | None:
        """Start bringing what a reader (of the tiers ``readable``; default the arena) needs of ``e``
        into the arena; the task, or None if nothing to do."""
        task = self._prefetching.get(e.key)
        if task is not None:
            return task
        if not self.promotion.missing(e, classes, accept_lossy, readable):
            return None
        task = asyncio.get_running_loop().create_task(self._promote(e, classes, accept_lossy, readable))
        self._prefetching[e.key] = task
        task.add_done_callback(lambda _t, k=e.key: self._prefetching.pop(k, None))
        return task

    async def _promote(self, e: Entry, classes: list[str] | None, accept_lossy: bool,
                       readable: frozenset[str] | None) -> bool:
        try:
            return await self.promotion.promote(e, classes, accept_lossy, readable)
        except Exception:  # noqa: BLE001 - a failed prefetch is a miss; the daemon keeps serving
            logger.exception("promoting %s failed", e.hash)
            self.metrics.errors.labels("promote").inc()
            return False

    async def wait_for_top(self, entries: list[Entry], classes_of: Callable[[Entry], list[str] | None],
                           accept_lossy: bool, wait_s: float, readable: frozenset[str] | None = None) -> None:
        """Start the promotions ``entries`` need (``classes_of(e)``: the classes its reader reads, from
        the tiers ``readable``) and wait for them, at most ``wait_s`` seconds."""
        tasks = [t for e in entries if (t := self.prefetch(e, classes_of(e), accept_lossy, readable)) is not None]
        if not tasks:
            return  # nothing to bring, and nothing awaited: a second look would find the same
        deadline = time.monotonic() + wait_s  # both waits together: a client times its call by wait_s
        if wait_s > 0:
            await asyncio.wait(tasks, timeout=wait_s)
        # A prefetch started for another reader may have brought less (e.g. exact only): one more try.
        again = [t for e in entries if self.promotion.missing(e, classes_of(e), accept_lossy, readable)
                 and (t := self.prefetch(e, classes_of(e), accept_lossy, readable)) is not None]
        if again and (left := deadline - time.monotonic()) > 0:
            await asyncio.wait(again, timeout=left)

    # ---- the background task -------------------------------------------------------------------

    async def run(self) -> None:
        while True:
            # asyncio.timeout, not wait_for: on Python 3.11 a cancel that arrives as the wake-up fires
            # is swallowed by wait_for, and this loop then ran on forever, so the daemon's shutdown
            # (which cancels it and waits) hung (tests/store/test_defects.py).
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(IDLE_S):
                    await self._wake.wait()
            self._wake.clear()
            try:
                await self.step()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - the loop survives; the failure is logged and counted
                logger.exception("background step failed")
                self.metrics.errors.labels("background").inc()

    async def step(self) -> None:
        """One round of background work (the loop's body; tests call it directly)."""
        await self.write_through()
        await self.write_back()
        await self.relieve()

    async def write_through(self) -> None:
        """Copy committed entries' write-through head classes to the tiers that take them at commit,
        from the fastest tier above that holds them (the arena, or the SSD tier if it was evicted from
        the arena meanwhile). A tier that is unavailable keeps its entries queued for a later round."""
        while self._through:
            batch = []
            while self._through and len(batch) < self.settings.ssd.write_batch:
                key, _ = self._through.popitem(last=False)
                if (e := self.index.get(key)) is not None:
                    batch.append(e)
            if batch:
                await self.yield_to_loads()
            for dst in self.index.levels[1:]:
                todo = [e for e in batch if self._through_classes(e, dst)]
                if todo and not dst.tier.is_available:
                    self._requeue(batch)
                    return
                for src in self.index.levels[: dst.level]:
                    here = [e for e in todo if any(src.name in x.copies for x in e.extents.values())]
                    if here:
                        await self.pipeline.write_down(here, src, dst=dst,
                                                       classes=lambda e, dst=dst: self._through_classes(e, dst))
                # A write that failed because the tier went down (its breaker is open now) is tried again
                # in a later round. Before, such entries left the queue unwritten: a master killed during
                # a write-through left those entries on this host only, a miss on every other host.
                if not dst.tier.is_available and any(self._through_classes(e, dst) for e in todo):
                    self._requeue(batch)
                    return

    def _requeue(self, batch: list[Entry]) -> None:
        """The batch's entries still to be written through somewhere wait for a later round (every
        level is looked at again then: one that was written is skipped by ``_through_classes``)."""
        for e in batch:
            if self.index.get(e.key) is e and any(self._through_classes(e, lv) for lv in self.index.levels[1:]):
                self._through[e.key] = None

    def pending_through(self, e: Entry) -> bool:
        """Still to be written through somewhere: eviction writes it down rather than drop it."""
        return e.key in self._through

    async def close(self) -> None:
        for t in list(self._prefetching.values()):
            t.cancel()
        for t in list(self._prefetching.values()):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        await self.pipeline.close()

    async def write_back(self) -> None:
        batch_size = self.settings.ssd.write_batch
        busy: list[EntryKey] = []  # being moved now: queued again for the next step, not dropped
        while self._queue and self.has_lower:
            batch: list[Entry] = []
            nbytes = 0
            while self._queue and nbytes < BATCH_BYTES and len(batch) < batch_size:
                key, _ = self._queue.popitem(last=False)
                e = self.index.get(key)
                if e is None or not self.pipeline.needs_write(e):
                    continue
                if key in self.pipeline.busy:
                    busy.append(key)
                    continue
                batch.append(e)
                nbytes += e.nbytes
            if batch:
                await self.yield_to_loads()
            for lv in self.index.memory:  # GPU pool -> arena, then arena -> SSD
                await self.pipeline.write_down(batch, lv)
        for key in busy:
            self._queue.setdefault(key, None)

    async def relieve(self) -> None:
        """Bring each memory tier under its low watermark once it passed the high one (top first: the
        GPU pool's victims land in the arena, which is relieved next)."""
        for lv in self.index.memory:
            await self._relieve(lv)

    async def _relieve(self, top) -> None:
        """Per partition (tenant) of a tier split in several (its arenas or GPU pools): each is relieved
        by its own usage, of its own entries. Before, the usage of all of them together was compared
        and victims taken among every tenant's: one tenant filling its arena evicted another's entries
        (which freed nothing where the pressure was)."""
        parts = getattr(top.tier, "arenas", None) or getattr(top.tier, "pools", None) or {}
        for p in list(parts) if len(parts) > 1 else [None]:
            await self._relieve_partition(top, p)

    async def _relieve_partition(self, top, partition: str | None) -> None:
        cfg = self.settings.host

        def stats():
            return top.tier.stats() if partition is None else top.tier.partition_stats(partition)

        if stats().usage <= cfg.high_watermark:
            return
        target = int(cfg.low_watermark * stats().capacity_bytes)
        for _ in range(RELIEF_ROUNDS):
            excess = stats().used_bytes - target
            if excess <= 0:
                return
            victims = self.pipeline.space.victims(top, excess, partial=True, partition=partition)
            if not victims or not await self.pipeline.evict(victims, top):
                return
