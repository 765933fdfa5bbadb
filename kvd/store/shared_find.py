"""Finds in a shared tier, coalesced: lookups that miss locally while a find is in flight go out together.

Every lookup that misses locally asks the remote cluster for its chunks (``kvd.store.recovery.
find_shared``). With many engines looking up at once, one find per lookup makes one pipelined round
trip per lookup: each costs the daemon a thread hand-over, a write and a read per node, and each
node a wake-up, all on the CPUs the engines use too. Here at most one find per shared tier is in
flight; the keys asked meanwhile wait for it to finish and then go out together in the next one (no
timer: a lone lookup goes at once, as before). A batch's records are adopted into the index once, by
the batch, and every caller then reads the index as if it had asked alone.

A caller waits at most its own deadline (``remote.lookup_deadline_s``, the caller's ``asyncio.timeout``):
a batch a caller stops waiting for still runs to the end, so its entries are indexed for the next
lookup. An error of the batch (``TierUnavailable``) reaches every caller in it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from kvd.store.entries import EntryKey
from kvd.store.index import Level

Find = Callable[[Level, list[EntryKey]], Awaitable[int]]  # (level, keys) -> entries adopted


@dataclass
class _Batch:
    done: asyncio.Future
    keys: dict[EntryKey, None] = field(default_factory=dict)  # ordered, each key once


class SharedFinds:
    """At most one ``find(level, keys)`` in flight per shared level; the keys asked meanwhile go in the next."""

    def __init__(self, find: Find) -> None:
        self._find = find
        self._next: dict[str, _Batch] = {}  # level name -> the batch still taking keys
        self._runners: dict[str, asyncio.Task] = {}  # level name -> the task sending its batches

    async def find(self, lv: Level, keys: list[EntryKey]) -> int:
        """``keys`` found in ``lv`` and adopted (with whatever the other callers of the same batch asked);
        returns how many entries the batch adopted. Cancelling the caller does not cancel the batch."""
        batch = self._next.get(lv.name)
        if batch is None:
            batch = self._next[lv.name] = _Batch(asyncio.get_running_loop().create_future())
            # Callers that all stopped waiting must not leave an exception nobody retrieved.
            batch.done.add_done_callback(lambda f: f.cancelled() or f.exception())
        batch.keys.update(dict.fromkeys(keys))
        if lv.name not in self._runners:
            self._runners[lv.name] = asyncio.create_task(self._run(lv), name=f"kvd-find-{lv.name}")
        return await asyncio.shield(batch.done)

    def waiting(self, level: str) -> int:
        """Keys waiting for the next batch of ``level``."""
        batch = self._next.get(level)
        return len(batch.keys) if batch is not None else 0

    async def _run(self, lv: Level) -> None:
        try:
            while (batch := self._next.pop(lv.name, None)) is not None:
                try:
                    batch.done.set_result(await self._find(lv, list(batch.keys)))
                except asyncio.CancelledError:
                    batch.done.cancel()
                    raise
                except Exception as e:  # noqa: BLE001 - every caller of the batch gets it
                    batch.done.set_exception(e)
        finally:
            del self._runners[lv.name]
            if (left := self._next.pop(lv.name, None)) is not None:
                left.done.cancel()  # closing: nobody will send it

    def close(self) -> None:
        """Stop sending (the store is closing): callers waiting on a batch see it cancelled."""
        for task in list(self._runners.values()):
            task.cancel()
        for batch in self._next.values():
            batch.done.cancel()
        self._next.clear()
