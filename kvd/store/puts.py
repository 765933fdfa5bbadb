"""Writing a batch of copies into one tier: the last step of every write-down (``Pipeline.write_down``).

For each copy: room in the tier (``Pipeline.reserve``, which may evict there in turn); then one write of
them all (a transaction per ``write_batch`` in LMDB); then each copy that landed is placed in the index.
Every reservation ends as an indexed copy or is given back: refused by the tier (``SsdFull``), its
entry deleted (or placed by another move) meanwhile, or the batch failing half-way.

This is the only writer to the tiers quotas apply to (record tiers): a batch's reservations count
against the quota until indexed (``in_flight``), since a batch reserves before it indexes anything.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from kvd.core.errors import SsdFull, TierUnavailable
from kvd.core.extents import class_kind
from kvd.store.entries import Copy, Entry, Extent
from kvd.store.forms import Payload
from kvd.store.index import Level

if TYPE_CHECKING:  # the pipeline owns this writer: a type here only
    from kvd.store.pipeline import Pipeline

logger = logging.getLogger(__name__)


class Puts:
    def __init__(self, pipeline: Pipeline) -> None:
        self.pipeline = pipeline
        # Bytes reserved in a tier with quotas but not yet placed in the index, per (tier, partition).
        self.in_flight: dict[tuple[str, str], int] = {}

    async def put_all(self, jobs: list[tuple[Entry, Extent]], payloads: list[Payload], lower: Level) -> int:
        """Reserve, write and index a batch of copies in ``lower``; returns the number written."""
        counted: dict[tuple[str, str], int] = {}
        try:
            return await self._reserve_and_put(jobs, payloads, lower, counted)
        finally:
            for k, n in counted.items():
                self.in_flight[k] -= n

    async def _reserve_and_put(self, jobs: list[tuple[Entry, Extent]], payloads: list[Payload], lower: Level,
                               counted: dict[tuple[str, str], int]) -> int:
        p = self.pipeline
        items, placed = [], []
        try:
            for (e, x), (data, codec, checksum) in zip(jobs, payloads):
                loc = await p.reserve(lower, len(data), e.name(x.head_class))
                if loc is None:
                    p.metrics.tier_write_failures.labels(lower.name).inc()
                    continue
                k = (lower.name, p.index.partition_of(e.namespace))
                self.in_flight[k] = self.in_flight.get(k, 0) + loc.nbytes
                counted[k] = counted.get(k, 0) + loc.nbytes
                items.append((loc, data))
                placed.append((e, x, Copy(loc, codec, checksum)))
        except BaseException:
            # A reserve that raised (an eviction's write-down failing unexpectedly): the room this batch
            # took goes back. Kept, the tier counted it as used until a restart, and a record tier kept
            # those keys reserved, so every later write of those extents failed ('already reserved').
            p.discard(lower, [loc for loc, _ in items], written=False)
            raise
        if not items:
            return 0
        try:  # records of a model whose registration is not there are dropped by a restart's rebuild
            await p.registered(lower, {e.fingerprint for e, _, _ in placed})
        except Exception as err:  # whatever the tier raises (a full disk, the cluster down): not written now
            logger.warning("%d records not written to %s: their model registration could not be: %s",
                           len(items), lower.name, err)
            p.discard(lower, [loc for loc, _ in items], written=False)
            p.metrics.tier_write_failures.labels(lower.name).inc(len(items))
            return 0
        ok = len(items)
        try:
            await p.on_io(lower, lower.tier.write_many, items)
        except (SsdFull, TierUnavailable) as err:
            ok = getattr(err, "num_written", 0)
            logger.warning("%s", err)
            if isinstance(err, SsdFull):
                p.discard(lower, [loc for loc, _ in items[ok:]], written=False)
            p.metrics.tier_write_failures.labels(lower.name).inc(len(items) - ok)
        except BaseException:  # unexpected (an LMDB panic): the reservations go back, none is indexed
            p.discard(lower, [loc for loc, _ in items])
            raise
        for e, x, copy in sorted(placed[:ok], key=lambda p: -p[0].start_token):  # tail first (index.tail_first)
            if p.index.get(e.key) is e and lower.name not in x.copies:
                p.index.place(e, x, lower, copy)
                p.metrics.demotions.labels(lower.name, class_kind(x.head_class)).inc()
                p.metrics.moved_bytes.labels("demote", lower.name).inc(x.nbytes)
            else:  # deleted (or placed by another move) meanwhile: this copy belongs to nobody
                p.discard(lower, [copy.loc])
        p.metrics.tier_writes.labels(lower.name).inc(ok)
        return ok
