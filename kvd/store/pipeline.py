"""The mover: everything that carries extents between the host arena and the SSD tier.

Owned by the store (``store.mover``), driven by its hooks and by one background task:

- **write-back**: an entry *admitted* to SSD (seen ``ssd.admit_after`` times, or pinned) gets an SSD
  copy of each extent, encoded with the codec head-aware placement picks. Hot extents keep their
  host copy (evicting them later costs nothing); cold ones (local heads outside sink + window) leave
  the arena once written, or are dropped when ``local_cold_codec = "drop"``.
- **demotion**: above the arena's high watermark, victims chosen by the host eviction policy lose
  their host copies until usage is under the low watermark; admitted ones are written first.
- **prefetch**: a lookup that finds extents only on SSD starts reading them into the arena; a lease
  waits for that (with a deadline). A read that fails verification is a miss, never served.
- **SSD capacity**: when the SSD tier is full, its own eviction policy drops records.
- **recovery**: at start the index is rebuilt from the SSD tier's headers and the models persisted
  beside them, so SSD contents survive restarts.

SSD I/O and codecs run in the executor, a bounded batch at a time (``ssd.write_batch`` extents), so
memory in flight stays bounded and the event loop never blocks. While the mover reads or writes an
entry it holds a lease on it (``Entry.leases``): nothing frees those bytes under it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from typing import TYPE_CHECKING

from kvd.core import protocol as P
from kvd.core.errors import CorruptData, KvdError
from kvd.policies.admission import SsdAdmission
from kvd.policies.eviction import make_eviction
from kvd.policies.placement import HeadClassPlacement
from kvd.store.entries import Entry, EntryKey, Extent
from kvd.store.recovery import MODEL_META, fingerprints, model_records, rebuild_entries, ssd_key
from kvd.tiers.base import Location
from kvd.tiers.ssd import SsdFull, SsdTier
from kvd.tiers.ssd_record import record_header

if TYPE_CHECKING:
    from kvd.store.store import Store

logger = logging.getLogger(__name__)

MAX_QUEUE = 65536  # entries waiting for write-back; beyond it the oldest waits for demotion instead
BATCH_BYTES = 64 << 20  # raw bytes encoded per batch: bounds memory in flight
IDLE_S = 0.2


class Mover:
    def __init__(self, store: Store, ssd: SsdTier) -> None:
        s = store.settings
        self.store = store
        self.ssd = ssd
        self.metrics = store.metrics
        self.placement = HeadClassPlacement(s.codec)
        self.admission = SsdAdmission(s.ssd.admit_after)
        self.ssd_policy = make_eviction(s.policy, capacity_bytes=ssd.capacity_bytes)
        self._queue: OrderedDict[EntryKey, None] = OrderedDict()  # admitted, waiting for write-back
        self._busy: set[EntryKey] = set()
        self._prefetching: dict[EntryKey, asyncio.Task] = {}
        self._tasks: set[asyncio.Task] = set()
        self._wake = asyncio.Event()
        self.counts = {"ssd_writes": 0, "ssd_write_failures": 0, "ssd_drops": 0, "prefetches": 0,
                       "prefetch_failures": 0, "demoted_entries": 0, "dropped_cold_extents": 0,
                       "ssd_evictions": 0, "recovered_entries": 0}

    # ---- hooks from the store -------------------------------------------------------------------

    def on_commit(self, e: Entry) -> None:
        model = self.store.models[e.fingerprint]
        sink = max((s.sink for row in model.head_map.heads for s in row if not s.is_global), default=0)
        window = model.head_map.max_window() - sink if sink or model.head_map.max_window() else 0
        for cls, x in e.extents.items():
            p = self.placement.place(cls, start_token=e.start_token, num_tokens=e.num_tokens,
                                     end_token=e.end_token, sink=sink, window=max(0, window))
            x.is_hot, x.ssd_target = p.is_hot, p.ssd_codec
        self.on_seen(e)

    def on_seen(self, e: Entry) -> None:
        """A store or lookup hit: count it, and queue the entry for SSD once admitted."""
        self.admission.record(e.key)
        if e.key not in self._queue and self._needs_write(e):
            if self._admit(e):
                self._enqueue(e)
            else:
                self.metrics.admission_refusals.inc()

    def _admit(self, e: Entry) -> bool:
        self.admission.admit_after = self.store.settings.ssd.admit_after  # reloadable (SIGHUP)
        return self.admission.admit(e.key, pinned=e.pinned, seen=e.seen)

    def on_pin(self, e: Entry) -> None:
        if self._needs_write(e):
            self._enqueue(e)

    def on_remove(self, e: Entry, *, deleted: bool) -> None:
        """The entry left the index: evicted everywhere (its sightings are kept, so it is admitted
        sooner when it comes back) or deleted (forgotten)."""
        self._queue.pop(e.key, None)
        if deleted:
            self.admission.forget(e.key)

    def is_busy(self, key: EntryKey) -> bool:
        return key in self._busy

    def drop_ssd(self, e: Entry) -> None:
        """Delete the entry's SSD records (in the executor; the index forgets them now)."""
        locs = [x.ssd for x in e.extents.values() if x.ssd is not None]
        for x in e.extents.values():
            x.ssd = None
        if locs:
            self.ssd_policy.on_remove(e.key)
            self._spawn(self._drop_records(locs))

    def prefetch(self, e: Entry, classes: list[str] | None = None) -> asyncio.Task | None:
        if e.key in self._prefetching:
            return self._prefetching[e.key]
        want = [c for c, x in e.extents.items()
                if x.host is None and x.ssd is not None and (classes is None or c in classes)]
        if not want:
            return None
        task = asyncio.get_running_loop().create_task(self._promote(e, want))
        self._prefetching[e.key] = task
        task.add_done_callback(lambda _t, k=e.key: self._prefetching.pop(k, None))
        return task

    async def wait_for_host(self, keys: list[EntryKey], classes: list[str] | None, wait_s: float) -> None:
        """Start prefetches the keys need and wait for them, at most ``wait_s`` seconds."""
        tasks = [t for k in keys if (e := self.store.get(k)) is not None and (t := self.prefetch(e, classes))]
        if tasks and wait_s > 0:
            await asyncio.wait(tasks, timeout=wait_s)

    # ---- background -----------------------------------------------------------------------------

    async def run(self) -> None:
        """The background task: write-back of admitted entries, then demotion under pressure."""
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), IDLE_S)
            self._wake.clear()
            try:
                await self.step()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - the loop survives; the failure is logged and counted
                logger.exception("mover iteration failed")
                self.metrics.errors.labels("mover").inc()

    async def step(self) -> None:
        """One round of background work (the loop's body; tests call it directly)."""
        await self._write_back()
        await self._relieve_pressure()

    async def close(self) -> None:
        for t in list(self._tasks) + list(self._prefetching.values()):
            t.cancel()
        for t in list(self._tasks) + list(self._prefetching.values()):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t

    def _enqueue(self, e: Entry) -> None:
        self._queue[e.key] = None
        while len(self._queue) > MAX_QUEUE:
            self._queue.popitem(last=False)
        self._wake.set()

    def _spawn(self, coro) -> None:
        t = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)

    async def _write_back(self) -> None:
        while self._queue:
            batch: list[Entry] = []
            nbytes = 0
            while self._queue and nbytes < BATCH_BYTES and len(batch) < self.ssd.write_batch:
                key, _ = self._queue.popitem(last=False)
                e = self.store.get(key)
                if e is not None and self._needs_write(e) and key not in self._busy:
                    batch.append(e)
                    nbytes += e.nbytes
            if batch:
                await self.write_entries(batch)

    async def _relieve_pressure(self) -> None:
        host = self.store.host
        cfg = self.store.settings.host
        if host.stats().usage <= cfg.high_watermark:
            return
        target = int(cfg.low_watermark * host.capacity_bytes)
        for _ in range(64):  # bounded rounds; each frees at least one victim or stops
            excess = host.stats().used_bytes - target
            if excess <= 0:
                return
            now = self.store.clock()
            victims = self.store.host_policy.victims(excess, now=now, can_evict=self.store.host_evictable)
            if not victims:
                return
            entries = [self.store.get(k) for k in victims]
            admitted = [e for e in entries if e is not None and self._needs_write(e) and self._admit(e)]
            if admitted:
                await self.write_entries(admitted)
            for e in entries:
                if e is not None and self.store.host_evictable(e.key):
                    self.store.evict_host(e)
                    self.counts["demoted_entries"] += 1

    # ---- SSD writes -----------------------------------------------------------------------------

    def _needs_write(self, e: Entry) -> bool:
        return any(x.host is not None and x.ssd is None and not x.dropped for x in e.extents.values())

    async def write_entries(self, entries: list[Entry]) -> int:
        """Give each extent of ``entries`` an SSD copy (durable on return); cold ones leave the arena.
        Returns the number of extents written."""
        jobs: list[tuple[Entry, str, Extent]] = []
        for e in entries:
            if e.key in self._busy:
                continue
            for cls, x in e.extents.items():
                if x.host is None or x.ssd is not None or x.dropped:
                    continue
                if x.ssd_target is None:  # placement "drop": cold local heads are not kept
                    if e.leases == 0:
                        self.store.free_extent_host(e, x)
                        x.dropped = True
                        self.counts["dropped_cold_extents"] += 1
                    continue
                jobs.append((e, cls, x))
        if not jobs:
            return 0
        held = {e.key: e for e, _, _ in jobs}
        for e in held.values():
            self._busy.add(e.key)
            self.store.hold(e)
        try:
            records = await self.store.run_io(self._encode_all, [(e, cls, x) for e, cls, x in jobs])
            written = await self._reserve_and_write(jobs, records)
        finally:
            for e in held.values():
                self._busy.discard(e.key)
                self.store.unhold(e)
        for e in held.values():
            for x in e.extents.values():
                if x.ssd is not None and not x.is_hot and x.host is not None and e.leases == 0:
                    self.store.free_extent_host(e, x)
            if any(x.ssd is not None for x in e.extents.values()):
                self.ssd_policy.on_insert(e.key, self.store.meta(e, tier="ssd"), self.store.clock())
        return written

    def _encode_all(self, jobs: list[tuple[Entry, str, Extent]]) -> list[bytes]:
        out = []
        for e, cls, x in jobs:
            raw = self.store.host.read(x.host)[: x.nbytes]
            codec = x.ssd_target or "lossless"
            t0 = time.perf_counter()
            rec = self.ssd.encode(ssd_key(e, cls), raw, fingerprint=e.fingerprint,
                                  dtype=self.store.models[e.fingerprint].spec.kv_dtype,
                                  shape=(x.plan.num_segments, x.plan.num_tokens, x.plan.head_dim), codec=codec,
                                  raw_xxh=x.checksum)
            self.metrics.codec_seconds.labels(codec, "encode").inc(time.perf_counter() - t0)
            self.metrics.codec_raw_bytes.labels(codec, "encode").inc(x.nbytes)
            self.metrics.codec_encoded_bytes.labels(codec, "encode").inc(len(rec))
            out.append(rec)
        return out

    async def _reserve_and_write(self, jobs, records: list[bytes]) -> int:
        items: list[tuple[Location, bytes]] = []
        placed: list[tuple[Extent, Location, str]] = []
        for (e, cls, x), rec in zip(jobs, records):
            key = ssd_key(e, cls)
            loc = self.ssd.reserve(len(rec), key) or (await self._make_ssd_room(len(rec)) and
                                                      self.ssd.reserve(len(rec), key))
            if not loc:
                self.counts["ssd_write_failures"] += 1
                continue
            items.append((loc, rec))
            placed.append((x, loc, rec))
        if not items:
            return 0
        try:
            await self.store.run_io(self.ssd.write_many, items)
            ok = len(items)
        except SsdFull as err:
            ok = err.num_written
            logger.warning("%s", err)
            for loc, _ in items[ok:]:
                self.ssd.drop(loc)
            self.counts["ssd_write_failures"] += len(items) - ok
        for x, loc, rec in placed[:ok]:
            x.ssd = loc
            x.ssd_codec = record_header(rec, loc.key).codec  # lossy falls back to lossless on NaN/Inf
            self.metrics.demotions.labels(x.head_class).inc()
            self.metrics.moved_bytes.labels("demote").inc(x.nbytes)
        self.counts["ssd_writes"] += ok
        return ok

    async def _make_ssd_room(self, nbytes: int) -> bool:
        now = self.store.clock()
        victims = self.ssd_policy.victims(nbytes, now=now, can_evict=self._ssd_evictable)
        for key in victims:
            e = self.store.get(key)
            if e is not None:
                self._evict_ssd(e)
        if victims:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)  # deletes done: room is real
        return bool(victims)

    def _ssd_evictable(self, key: EntryKey) -> bool:
        e = self.store.get(key)
        return e is not None and not e.pinned and e.leases == 0 and key not in self._busy

    def _evict_ssd(self, e: Entry) -> None:
        self.drop_ssd(e)
        self.counts["ssd_evictions"] += 1
        self.metrics.evicted_entries.labels("ssd").inc()
        if e.fastest_tier() is None:
            self.store.forget(e)

    async def _drop_records(self, locs: list[Location]) -> None:
        def drop_all() -> None:
            for loc in locs:
                try:
                    self.ssd.drop(loc)
                except (KvdError, AssertionError):
                    logger.warning("could not drop SSD record %s", loc.key, exc_info=True)

        await self.store.run_io(drop_all)
        self.counts["ssd_drops"] += len(locs)

    # ---- SSD reads ------------------------------------------------------------------------------

    async def _promote(self, e: Entry, classes: list[str]) -> bool:
        t0 = time.perf_counter()
        self.store.hold(e)
        self._busy.add(e.key)
        slots: list[tuple[Extent, Location]] = []
        try:
            for cls in classes:
                x = e.extents[cls]
                loc = self.store.reserve_host(x.nbytes)
                if loc is None:  # no room now: give back what this promotion took; the reader recomputes
                    for _, taken in slots:
                        self.store.host.drop(taken)
                    self.counts["prefetch_failures"] += 1
                    return False
                slots.append((x, loc))
            results = await self.store.run_io(self._read_all, slots)
        except Exception:
            for _, loc in slots:
                self.store.host.drop(loc)
            raise
        finally:
            self._busy.discard(e.key)
            self.store.unhold(e)
        ok = True
        had_host = any(x.host is not None for x in e.extents.values())
        for (x, loc), digest in zip(slots, results):
            if digest is None or self.store.get(e.key) is not e:  # corrupt, or deleted meanwhile
                self.store.host.drop(loc)
                if digest is None:
                    ok = False
                    self.metrics.checksum_failures.labels("ssd").inc()
                    self._forget_extent_ssd(e, x)
                continue
            x.host, x.checksum = loc, digest
            self.metrics.promotions.labels(x.head_class).inc()
            self.metrics.moved_bytes.labels("promote").inc(x.nbytes)
        if any(x.host is not None for x in e.extents.values()) and not had_host:
            self.store.host_policy.on_insert(e.key, self.store.meta(e, tier="host"), self.store.clock())
        self.counts["prefetches"] += 1
        self.metrics.prefetch_latency.observe(time.perf_counter() - t0)
        self.metrics.moved_seconds.labels("promote").inc(time.perf_counter() - t0)
        return ok

    def _read_all(self, slots: list[tuple[Extent, Location]]) -> list[int | None]:
        out: list[int | None] = []
        for x, loc in slots:
            try:
                header = self.ssd.read_into(x.ssd, self.store.host.read(loc)[: x.nbytes])
                out.append(header.raw_xxh)
            except CorruptData as err:
                logger.error("not served: %s", err)
                out.append(None)
        return out

    def _forget_extent_ssd(self, e: Entry, x: Extent) -> None:
        loc, x.ssd = x.ssd, None
        if loc is not None:
            self._spawn(self._drop_records([loc]))
        if e.fastest_tier() is None:
            self.store.forget(e)

    # ---- admin ----------------------------------------------------------------------------------

    async def flush(self, req: P.FlushRequest) -> int:
        """Write matching entries to SSD now, whatever admission says (operator's call). Returns how
        many of them are durably on SSD afterwards: an entry the mover was busy with is waited for
        (up to the prefetch deadline); one evicted before the flush arrived is not counted."""
        chosen = self._matching(req.namespace, req.fingerprint, req.hashes)
        deadline = time.monotonic() + self.store.settings.ssd.prefetch_deadline_s
        while True:
            todo = [e for e in chosen if self._needs_write(e) and e.key not in self._busy]
            for i in range(0, len(todo), self.ssd.write_batch):
                await self.write_entries(todo[i : i + self.ssd.write_batch])
            waiting = [e for e in chosen if self._needs_write(e) and e.key in self._busy]
            if not waiting or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.01)
        return sum(1 for e in chosen if self.store.get(e.key) is e and self._on_ssd(e))

    @staticmethod
    def _on_ssd(e: Entry) -> bool:
        """Every extent kept anywhere has its SSD copy (dropped cold extents excepted)."""
        return any(x.ssd for x in e.extents.values()) and all(
            x.ssd is not None or x.dropped for x in e.extents.values())

    async def evict(self, req: P.EvictRequest) -> int:
        n = 0
        for e in self._matching(req.namespace, req.fingerprint, None):
            if not any(x.ssd for x in e.extents.values()) or not self._ssd_evictable(e.key):
                continue
            self._evict_ssd(e)
            n += 1
        await asyncio.gather(*list(self._tasks), return_exceptions=True)
        return n

    async def compact(self) -> int:
        before, after = await self.store.run_io(self.ssd.compact)
        return max(0, before - after)

    def _matching(self, ns: str | None, fp: str | None, hashes: list[str] | None) -> list[Entry]:
        if hashes is not None:
            if ns is None or fp is None:
                raise KvdError("flush by hashes needs namespace and fingerprint")
            return [e for h in hashes if (e := self.store.get((ns, fp, h))) is not None]
        return [e for e in self.store.iter_entries()
                if (ns is None or e.namespace == ns) and (fp is None or e.fingerprint == fp)]

    def counters(self) -> dict[str, float]:
        out: dict[str, float] = {f"ssd_{k}" if not k.startswith("ssd") else k: v for k, v in self.counts.items()}
        out["ssd_checksum_failures"] = self.ssd.num_corrupt
        out["ssd_admission_refusals"] = self.admission.num_refused
        for codec in ("raw", "lossless", "fp8", "int8"):
            raw = self.metrics.codec_raw_bytes.labels(codec, "encode")._value.get()
            enc = self.metrics.codec_encoded_bytes.labels(codec, "encode")._value.get()
            if raw:
                out[f"compression_ratio_{codec}"] = raw / enc
        return out

    # ---- recovery -------------------------------------------------------------------------------

    def persist_model(self, req: P.RegisterModelRequest, fp: str) -> None:
        doc = req.model_copy(update={"fingerprint": fp}).model_dump_json().encode()
        self._spawn(self.store.run_io(self.ssd.put_meta, MODEL_META + fp, doc))

    async def recover(self) -> int:
        """Rebuild the index from the SSD tier (at start, before serving). Returns the entries recovered."""
        records = await self.store.run_io(self.ssd.scan)
        raw = {fp: await self.store.run_io(self.ssd.get_meta, MODEL_META + fp) for fp in fingerprints(records)}
        for req in model_records(raw):
            with contextlib.suppress(KvdError):
                self.store.register_model(req, persist=False)
        now = self.store.clock()
        entries, orphans = rebuild_entries(records, self.store.models, now)
        for e in entries:
            self.store.insert_recovered(e)
            self.ssd_policy.on_insert(e.key, self.store.meta(e, tier="ssd"), now)
        if orphans:
            logger.warning("ssd tier: %d records of unknown models or shapes dropped at start", len(orphans))
            self._spawn(self._drop_records(orphans))
        self.counts["recovered_entries"] = len(entries)
        return len(entries)
