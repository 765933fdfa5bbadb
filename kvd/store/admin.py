"""Operator actions on the store: flush, evict, compact (``kvctl``), and persisting registrations.

Each action goes through the same paths as the daemon's own work (``Pipeline.write_down`` and
``Pipeline.evict``), so an operator can never leave the index in a state the daemon would not: no
partial entries, no eviction of leased or pinned entries, admitted entries written down before they
leave the arena. Every action that changes state is logged at INFO with its arguments and result.

``compact`` runs on a thread of its own: it holds the SSD tier exclusively for its whole run, and
sharing threads with commit checksums or other I/O stalled stores for seconds.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor

from kvd.core import protocol as P
from kvd.core.config import Settings
from kvd.core.errors import InvalidRequest
from kvd.store.background import Background
from kvd.store.entries import Entry, ModelRecord
from kvd.store.index import Index, Level
from kvd.store.pipeline import Pipeline

logger = logging.getLogger(__name__)

MODEL_META = "model/"  # persistent tiers keep each registration under model/<fingerprint>
LISTED_HASHES = 1000  # an evict answer names at most this many entries


class Admin:
    def __init__(self, index: Index, pipeline: Pipeline, background: Background, settings: Settings) -> None:
        self.index = index
        self.pipeline = pipeline
        self.background = background
        self.settings = settings
        self._compactor = ThreadPoolExecutor(1, thread_name_prefix="kvd-compact")
        self._tasks: set[asyncio.Task] = set()
        # Each model's registration document, and the record tiers it is durable in (tier -> fingerprints):
        # a record is written below only once its model's registration is durable there (``registered``).
        self._docs: dict[str, bytes] = {}
        self._durable: dict[str, set[str]] = {}
        self._meta_lock = asyncio.Lock()  # one registration write at a time: the latest document lands last

    def _level(self, tier: str) -> Level:
        lv = self.index.by_name.get(tier)
        if lv is None:
            raise InvalidRequest(f"tier {tier!r} is not enabled on this daemon (tiers: "
                                 f"{', '.join(self.index.by_name)}; e.g. ssd.enabled = false)")
        return lv

    @staticmethod
    def _matches(ns: str | None, fp: str | None):
        return lambda e: (ns is None or e.namespace == ns) and (fp is None or e.fingerprint == fp)

    # ---- flush ---------------------------------------------------------------------------------

    async def flush(self, req: P.FlushRequest) -> int:
        """Write matching entries below the arena now, whatever admission says. Returns how many of
        them are durably below afterwards: an entry the pipeline is busy with is waited for (up to
        the prefetch deadline); one evicted before the flush arrived is not counted."""
        if not self.index.records:
            raise InvalidRequest("flush writes to the SSD tier, which is not enabled (ssd.enabled = false)")
        if req.hashes is not None:
            chosen = self.index.named(req.namespace, [req.fingerprint], req.hashes)
        else:
            chosen = [e for e in self.index if self._matches(req.namespace, req.fingerprint)(e)]
        deadline = time.monotonic() + self.settings.ssd.prefetch_deadline_s
        batch = self.settings.ssd.write_batch
        while True:
            todo = [e for e in chosen if self.pipeline.needs_write(e) and e.key not in self.pipeline.busy]
            for i in range(0, len(todo), batch):
                for lv in self.index.memory:  # GPU pool -> arena, then arena -> SSD
                    await self.pipeline.write_down(todo[i : i + batch], lv)
            waiting = [e for e in chosen if self.pipeline.needs_write(e) and e.key in self.pipeline.busy]
            if not waiting or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.01)
        n = sum(1 for e in chosen if self.index.get(e.key) is e and self._below(e))
        logger.info("admin flush namespace=%s fingerprint=%s: %d of %d entries durably below the arena",
                    req.namespace, req.fingerprint, n, len(chosen))
        return n

    def _below(self, e: Entry) -> bool:
        """Every extent kept anywhere has a copy below the arena (extents let go excepted)."""
        lower = {lv.name for lv in self.index.records}
        return all(x.dropped or lower & x.copies.keys() for x in e.extents.values()) and any(
            lower & x.copies.keys() for x in e.extents.values())

    # ---- evict ---------------------------------------------------------------------------------

    async def evict(self, req: P.EvictRequest) -> P.EvictResponse:
        """Evict matching entries from one tier, in its policy's order, until ``max_bytes`` are freed
        (all evictable ones without it). Leased, pinned and busy entries stay. ``dry_run``: say what
        would go, change nothing."""
        lv = self._level(req.tier)
        match = self._matches(req.namespace, req.fingerprint)
        space = self.pipeline.space
        if req.max_bytes is None:
            victims = [e for e in self.index if match(e) and space.evictable(e, lv)]
        else:
            victims = space.victims(lv, req.max_bytes, match=match, partial=True)
        nbytes = sum(self.index.meta(e, lv).nbytes for e in victims)
        hashes = [e.hash for e in victims[:LISTED_HASHES]]
        if not req.dry_run:
            nbytes = await self.pipeline.evict(victims, lv)
            victims = [e for e in victims if not (self.index.get(e.key) is e and e.in_tier(lv.name))]
            hashes = [e.hash for e in victims[:LISTED_HASHES]]
        logger.info("admin evict tier=%s namespace=%s fingerprint=%s max_bytes=%s%s: %d entries, %d bytes",
                    req.tier, req.namespace, req.fingerprint, req.max_bytes, " (dry run)" if req.dry_run else "",
                    len(victims), nbytes)
        return P.EvictResponse(count=len(victims), nbytes=nbytes, dry_run=req.dry_run, hashes=hashes)

    # ---- compact -------------------------------------------------------------------------------

    async def compact(self) -> int:
        """Rewrite the SSD tier's file without free pages; returns the bytes saved."""
        lv = self._level("ssd")
        compact = getattr(lv.tier, "compact", None)
        if compact is None:
            raise InvalidRequest(f"tier {lv.name!r} cannot be compacted")
        before, after = await asyncio.get_running_loop().run_in_executor(self._compactor, compact)
        logger.info("admin compact: %d -> %d bytes", before, after)
        return max(0, before - after)

    # ---- registrations -------------------------------------------------------------------------

    def persist_model(self, req: P.RegisterModelRequest, fingerprint: str, levels: list[Level] | None = None) -> None:
        """Keep the registration beside the records of every persistent tier (or of ``levels``), for the
        start-up rebuild of this daemon and, in a shared tier, of every other host."""
        doc = req.model_copy(update={"fingerprint": fingerprint}).model_dump_json().encode()
        if self._docs.get(fingerprint) != doc:
            self._docs[fingerprint] = doc
            for fps in self._durable.values():
                fps.discard(fingerprint)
        for lv in self.index.records if levels is None else levels:
            task = asyncio.get_running_loop().create_task(self._persist_logged(lv, fingerprint))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def registered(self, lv: Level, fingerprints: set[str]) -> None:
        """Make the registrations of ``fingerprints`` durable in ``lv`` before records of them are written
        there (``kvd.store.puts``); raises what the tier raised. The write at registration is not awaited
        by anyone: one that failed (a full disk) was never tried again, and after a restart every record
        of the model, flushes acknowledged, was dropped as an unknown model's (audit 36)."""
        for fp in sorted(fingerprints - self._durable.get(lv.name, set())):
            if fp in self._docs:
                await self._persist(lv, fp)

    async def _persist(self, lv: Level, fp: str) -> None:
        async with self._meta_lock:
            doc = self._docs[fp]
            if fp in self._durable.get(lv.name, ()):
                return
            await self.pipeline.on_io(lv, lv.tier.put_meta, MODEL_META + fp, doc)
            if self._docs.get(fp) == doc:  # not replaced meanwhile by another head map's, still to be written
                self._durable.setdefault(lv.name, set()).add(fp)

    async def _persist_logged(self, lv: Level, fp: str) -> None:
        try:
            await self._persist(lv, fp)
        except Exception as e:  # the tier's own error (LMDB, the cluster): retried before the next record write
            logger.warning("registration of model %s not written to the %s tier yet: %s", fp, lv.name, e)

    def persist_models(self, models: dict[str, ModelRecord], lv: Level) -> None:
        """Every registration so far into ``lv``, a tier that joined while serving (the remote cluster
        reachable again): without them, other hosts' start-up rebuilds drop this host's records there."""
        self._durable.pop(lv.name, None)  # a tier that joined again: what it held before is not known
        for fp, m in models.items():
            s = m.spec
            req = P.RegisterModelRequest(model_id=s.model_id, revision=s.revision, num_layers=s.num_layers,
                                         num_kv_heads=s.num_kv_heads, head_dim=s.head_dim, kv_dtype=s.kv_dtype,
                                         rope=s.rope, layout=s.layout, head_map=m.head_map)
            self.persist_model(req, fp, [lv])

    def forget_model(self, fp: str) -> None:
        """The registry forgot the model (``ModelRegistry.prune``): its document goes too."""
        self._docs.pop(fp, None)
        for fps in self._durable.values():
            fps.discard(fp)

    async def close(self) -> None:
        if self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
        self._compactor.shutdown(wait=True)
