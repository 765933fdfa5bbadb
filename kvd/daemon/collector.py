"""The daemon's policy for Python's cyclic garbage collector: full collections that scan only what is new.

Why. CPython's full collection (generation 2) walks every container object the process tracks, and
the daemon's index is made of them (per entry: the entry, its extents, their copies, the policies'
records). The collection runs on the thread that happens to allocate, holding the GIL, so every
request in flight waits for it. Measured on the 2-core VM under remote-hit lookups (8 clients, each
lookup adopting 8 entries, ``benchmarks/notes/remote_lookup_load.py``): full collections of 12 ms with
~4K entries adopted and 27 ms with ~12K, growing with the index, against a lookup p50 of 3-4 ms; with
8 clients in flight one such pause delays 8 lookups at once, which is the whole 1 % tail. A daemon
holding 100K entries would pause for hundreds of milliseconds.

What. At start the daemon collects and freezes everything built so far (``gc.freeze``: frozen objects
leave the collector's scans). After every full collection it freezes the survivors again (on the
event loop, right after the collection) and resets CPython's count of long-lived objects (``_freeze``),
so full collections keep coming at the young generations' pace and each scans only what survived
since the last: its length follows the allocation between collections, not the size of the index.

The price, and how it is bounded. A frozen object is still freed by reference counting, and the
index's objects form no cycles (an evicted or deleted entry is freed at once: checked in
``tests/daemon/test_collector.py``). But a frozen object that later becomes part of an unreachable
cycle (a request's objects caught in flight by a freeze) is not collected by the automatic passes.
A maintenance pass every ``daemon.gc_full_interval_s`` (default 3600 s; 0: never) unfreezes, collects
everything and freezes again: one full-length pause per interval instead of one every few seconds
of load. ``kvd_gc_pause_seconds{generation}`` (0, 1, 2, ``maintenance``) shows every pause and
``kvd_gc_frozen_objects`` what is frozen.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time

from prometheus_client import Gauge, Histogram

logger = logging.getLogger(__name__)

GENERATIONS = ("0", "1", "2", "maintenance")


class Collector:
    """Installed by the daemon's own process (``kvd.daemon.service``), never by an embedded daemon: the
    garbage collector is the process's, not one daemon's."""

    def __init__(self, pauses: Histogram, frozen: Gauge, full_interval_s: float) -> None:
        self.pauses, self.frozen = pauses, frozen
        self.full_interval_s = full_interval_s
        self._loop: asyncio.AbstractEventLoop | None = None
        self._t0 = 0.0
        self._freeze_pending = False
        self._ours = False  # a collection of ours (maintain, the freeze): timed as "maintenance" or not at all
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        """Collect and freeze what the start-up built, then keep full collections short (module doc)."""
        self._loop = asyncio.get_running_loop()
        self.maintain()
        gc.callbacks.append(self._on_gc)
        if self.full_interval_s > 0:
            self._task = asyncio.create_task(self._maintenance(), name="kvd-gc-maintenance")

    def stop(self) -> None:
        if self._on_gc in gc.callbacks:
            gc.callbacks.remove(self._on_gc)
        if self._task is not None:
            self._task.cancel()

    def maintain(self) -> int:
        """Unfreeze, collect everything, freeze the survivors; returns the objects collected."""
        t0 = time.perf_counter()
        self._ours = True
        try:
            gc.unfreeze()
            collected = gc.collect()
            _freeze()
        finally:
            self._ours = False
        self.pauses.labels("maintenance").observe(time.perf_counter() - t0)
        self.frozen.set(gc.get_freeze_count())
        return collected

    async def _maintenance(self) -> None:
        while True:
            await asyncio.sleep(self.full_interval_s)
            n = self.maintain()
            if n:
                logger.info("gc maintenance: %d unreachable objects collected", n)

    def _on_gc(self, phase: str, info: dict) -> None:
        # Called by the collector itself, on whichever thread triggered it: only time it and schedule
        # the freeze (freezing from inside a collection is not something CPython documents).
        if self._ours:
            return
        if phase == "start":
            self._t0 = time.perf_counter()
            return
        self.pauses.labels(str(info["generation"])).observe(time.perf_counter() - self._t0)
        if info["generation"] == 2 and not self._freeze_pending and self._loop is not None:
            self._freeze_pending = True
            try:
                self._loop.call_soon_threadsafe(self._freeze)
            except RuntimeError:  # the loop is closed: the daemon is stopping
                self._freeze_pending = False

    def _freeze(self) -> None:
        self._freeze_pending = False
        self._ours = True
        try:
            _freeze()
        finally:
            self._ours = False
        self.frozen.set(gc.get_freeze_count())


def _freeze() -> None:
    """Freeze every tracked object, then reset the collector's count of long-lived objects: CPython
    starts a full collection once the objects that reached the oldest generation since the last one
    outnumber a quarter of what that one left there, and a freeze does not lower that count. Without
    the reset, the next full collection would wait for (and scan) a quarter of everything frozen, an
    index-sized pause again; with it, full collections come at the young generations' pace and scan
    only what survived since. (The collection after the freeze scans nothing: all is frozen.)"""
    gc.freeze()
    gc.collect()
