"""The tiered store: the index of entries, reservations and leases, and the calls into tiers and policies.

The store orchestrates; tiers hold bytes (``kvd.tiers``), policies decide (``kvd.policies``), the
registry knows models (``kvd.store.registry``) and the mover carries extents between arena and SSD
(``kvd.store.pipeline``). It is driven by the control API's handlers, one method per route, and by the
daemon's background tasks. Everything here runs on the event loop and never blocks it: checksums,
SSD I/O and codecs go to the executor.

Invariants:
- an entry is in ``_index`` only after its commit finished: lookups see whole entries or nothing;
- a key is in at most one of ``_index``, a reservation's pending entries, or ``_doomed``;
- bytes of an entry with ``leases > 0`` (readers, or the mover) are never freed or overwritten;
- "cannot right now" (no room, nothing evictable) answers ``no_space`` and changes nothing.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable, Iterable
from concurrent.futures import Executor

import xxhash

from kvd.core import protocol as P
from kvd.core.config import Settings
from kvd.core.errors import InvalidRequest, RequestTooLarge
from kvd.core.keys import prefix_hashes
from kvd.daemon.metrics import Metrics
from kvd.store.entries import Entry, EntryKey, Extent, Lease, ModelRecord, Reservation
from kvd.store.holds import HoldTable, owner_is_alive
from kvd.store.registry import ModelRegistry
from kvd.store.space import evictable_window
from kvd.tiers.base import Location, TierStats
from kvd.tiers.host import HostTier

logger = logging.getLogger(__name__)


class Store:
    def __init__(self, settings: Settings, host: HostTier, *, metrics: Metrics, executor: Executor | None = None,
                 clock: Callable[[], float] = time.monotonic, host_policy=None) -> None:
        from kvd.policies.eviction import make_eviction

        self.settings = settings
        self.host = host
        self.metrics = metrics
        self.executor = executor
        self.clock = clock
        self.started_at = clock()
        self.host_policy = host_policy or make_eviction(settings.policy, capacity_bytes=host.capacity_bytes)
        self.registry = ModelRegistry(clock)
        self.models = self.registry.models  # fingerprint -> ModelRecord
        self._index: dict[EntryKey, Entry] = {}
        self._pending: dict[EntryKey, str] = {}  # key -> reservation id holding it
        self._doomed: dict[EntryKey, Entry] = {}  # deleted while leased; freed on last release
        self.holds = HoldTable(reservation_ttl_s=lambda: settings.host.reservation_ttl_s,
                               lease_ttl_s=lambda: settings.host.lease_ttl_s)
        self.mover = None  # kvd.store.pipeline.Mover when an SSD tier is configured (set by the daemon)

    # ---- models ---------------------------------------------------------------------------------

    def register_model(self, req: P.RegisterModelRequest, *, persist: bool = True) -> P.RegisterModelResponse:
        record, changed = self.registry.register(req, has_entries=self._has_entries)
        if changed and persist and self.mover is not None:
            self.mover.persist_model(req, record.fingerprint)
        return P.RegisterModelResponse(
            fingerprint=record.fingerprint, chunk_tokens=self.settings.keys.chunk_tokens, arena=self.arena_info(),
            head_map_method=record.head_map.method, num_global_heads=record.num_global_heads)

    def model(self, fingerprint: str) -> ModelRecord:
        return self.registry.get(fingerprint)

    def arena_info(self) -> P.ArenaInfo:
        return P.ArenaInfo(path=str(self.host.path), capacity_bytes=self.host.capacity_bytes,
                           slot_bytes=self.host.slot_bytes, arena_id=self.host.arena_id)

    # ---- lookup ---------------------------------------------------------------------------------

    def lookup(self, req: P.LookupRequest) -> P.LookupResult:
        self.model(req.fingerprint)
        chunk = self.settings.keys.chunk_tokens
        if req.token_ids is not None and req.prefix_hashes is not None:
            raise InvalidRequest("send token_ids or prefix_hashes, not both")
        if req.token_ids is not None:
            if len(req.token_ids) > self.settings.daemon.max_tokens_per_request:
                raise RequestTooLarge(f"{len(req.token_ids)} token ids; at most "
                                      f"{self.settings.daemon.max_tokens_per_request} per lookup")
            hashes = prefix_hashes(req.token_ids, chunk_tokens=chunk, namespace=req.namespace,
                                   fingerprint=req.fingerprint)
        else:
            hashes = req.prefix_hashes or []
        self._check_count(len(hashes) + len(req.chunk_hashes or []))
        hit_tokens: dict[tuple[str, str, str], int] = {}  # (kind, tier, head class) -> tokens
        prefix = self._found(req, hashes, "prefix", hit_tokens)
        chunks = self._found(req, req.chunk_hashes or [], "chunk", hit_tokens)
        hits = 0
        for r in prefix:
            if r.index != hits or not r.complete:
                break
            hits += 1
        # Counters once per label set, not per entry: a 128-chunk lookup stays cheap.
        self.metrics.lookup_tokens.labels("prefix").inc(len(hashes) * chunk)
        if req.chunk_hashes:
            # The denominator needs every asked chunk's length; the client sends it (chunk_num_tokens),
            # else only found chunks count and the chunk hit rate reads high.
            asked = sum(req.chunk_num_tokens) if req.chunk_num_tokens else sum(r.num_tokens for r in chunks)
            self.metrics.lookup_tokens.labels("chunk").inc(asked)
        for labels, n in hit_tokens.items():
            self.metrics.hit_tokens.labels(*labels).inc(n)
        return P.LookupResult(chunk_tokens=chunk, num_prefix_hits=hits, prefix=prefix, chunks=chunks)

    def _found(self, req: P.LookupRequest, hashes: list[str], kind: str,
               hit_tokens: dict[tuple[str, str, str], int]) -> list[P.EntryRow]:
        out = []
        now = self.clock()
        ns, fp, index, mover = req.namespace, req.fingerprint, self._index, self.mover
        for i, h in enumerate(hashes):
            e = index.get((ns, fp, h))
            if e is None:
                continue
            e.seen += 1
            e.last_access = now
            # One pass over the (at most two) extents: what is servable exactly, and from where.
            classes, tier = [], None
            for c, x in e.extents.items():
                where = "host" if x.host is not None else ("ssd" if x.ssd is not None else None)
                if where is None:
                    continue
                if tier != "host":
                    tier = where
                if where == "host" or x.is_lossless:
                    classes.append(c)
                    key = (kind, where, c)
                    hit_tokens[key] = hit_tokens.get(key, 0) + e.num_tokens
            if tier is None:
                continue
            if mover is not None:
                mover.on_seen(e)
                if req.prefetch and tier != "host":
                    mover.prefetch(e)
            out.append(P.EntryRow(i, h, tier, classes, len(classes) == len(e.extents), e.num_tokens))
        return out

    # ---- store: reserve / commit / abort --------------------------------------------------------

    def reserve(self, req: P.ReserveRequest, owner_pid: int | None = None) -> P.ReserveResponse:
        model = self.model(req.fingerprint)
        self._check_count(len(req.entries))
        if len({r.hash for r in req.entries}) != len(req.entries):
            raise InvalidRequest("an entry appears twice in one reserve request")
        now = self.clock()
        rid = uuid.uuid4().hex
        pending: dict[str, Entry] = {}
        out: list[P.ReservedEntry] = []
        for r in req.entries:
            key = (req.namespace, req.fingerprint, r.hash)
            existing = self._index.get(key)
            if existing is not None or key in self._pending:
                if existing is not None:
                    existing.seen += 1
                    existing.last_access = now
                out.append(P.ReservedEntry(hash=r.hash, status="exists"))
                continue
            entry = self._reserve_entry(model, key, r, now)
            if entry is None:
                self.metrics.no_space.inc()
                out.append(P.ReservedEntry(hash=r.hash, status="no_space"))
                continue
            pending[r.hash] = entry
            self._pending[key] = rid
            out.append(P.ReservedEntry(hash=r.hash, status="reserved", extents=self._extent_infos(entry)))
        ttl = self.settings.host.reservation_ttl_s
        if pending:
            self.holds.add_reservation(Reservation(rid, owner_pid, now + ttl, pending))
            self.metrics.reservations_open.set(len(self.holds.reservations))
        return P.ReserveResponse(reservation_id=rid if pending else None, expires_in_s=ttl,
                                 arena_id=self.host.arena_id, entries=out)

    def _reserve_entry(self, model: ModelRecord, key: EntryKey, r: P.ReserveEntry, now: float) -> Entry | None:
        plans = model.plans(r.num_tokens)
        end = r.end_token if r.end_token is not None else r.start_token + r.num_tokens
        entry = Entry(key=key, kind=r.kind, num_tokens=r.num_tokens, start_token=r.start_token, end_token=end,
                      extents={c: Extent(plan=p) for c, p in plans.items()}, created=now, last_access=now)
        for x in entry.extents.values():
            x.host = self.reserve_host(x.nbytes)
            if x.host is None:
                self._free_host(entry)
                return None
        return entry

    def reserve_host(self, nbytes: int) -> Location | None:
        """A slot run for ``nbytes``, evicting host copies if needed. Drops only: never blocks on I/O."""
        loc = self.host.reserve(nbytes)
        if loc is not None:
            return loc
        now = self.clock()
        for _ in range(2):  # the policy's choice first: usually frees a run
            victims = self.host_policy.victims(nbytes, now=now, can_evict=self.host_evictable)
            if not victims:
                return None
            for key in victims:
                self.evict_host(self._index[key])
            loc = self.host.reserve(nbytes)
            if loc is not None:
                return loc
        # Fragmented: the bytes freed are not adjacent. Evict by place instead of by priority: the
        # window of consecutive slots whose occupants are all evictable and fewest.
        evictable = (e for e in self._index.values() if self.host_evictable(e.key))
        window = evictable_window(self.host, evictable, self.host.slots_for(nbytes))
        if window is None:
            return None
        for e in window:
            self.evict_host(e)
        return self.host.reserve(nbytes)

    async def commit(self, req: P.CommitRequest) -> P.CommitResponse:
        rid = req.reservation_id
        res = self.holds.begin_commit(rid)
        done = False
        try:
            chosen = list(res.entries) if req.hashes is None else req.hashes
            unknown = [h for h in chosen if h not in res.entries]
            if unknown:
                raise InvalidRequest(f"entries {unknown[:3]} are not part of reservation {rid}")
            entries = [res.entries[h] for h in chosen]
            if self.settings.host.verify_on_commit:
                for e, sums in zip(entries, await self.run_io(self._checksums, entries)):
                    for x, c in zip(e.extents.values(), sums):
                        x.checksum = c
            done = True
        finally:
            # Synchronous from here on: each entry becomes visible whole, and the reservation ends.
            self.holds.end_commit(rid, done=done)
        now, nbytes, keep = self.clock(), 0, set(chosen)
        for e in res.entries.values():
            self._pending.pop(e.key, None)
            if e.hash not in keep:
                self._free_host(e)
                continue
            e.created = e.last_access = now
            self._index[e.key] = e
            self.host_policy.on_insert(e.key, self.meta(e, tier="host"), now)
            self.metrics.committed_entries.labels(e.kind).inc()
            nbytes += e.nbytes
            if self.mover is not None:
                self.mover.on_commit(e)
        self.metrics.moved_bytes.labels("store").inc(nbytes)
        self.metrics.moved_seconds.labels("store").inc(req.transfer_s)
        self.metrics.reservations_open.set(len(self.holds.reservations))
        return P.CommitResponse(committed=chosen)

    def _checksums(self, entries: list[Entry]) -> list[list[int]]:
        return [[xxhash.xxh3_64_intdigest(self.host.read(x.host)[: x.nbytes]) for x in e.extents.values()]
                for e in entries]

    def abort(self, req: P.AbortRequest) -> P.CountResponse:
        res = self.holds.pop_reservation(req.reservation_id)
        self._drop_reservation(res)
        return P.CountResponse(count=len(res.entries))

    def _drop_reservation(self, res: Reservation) -> None:
        for e in res.entries.values():
            self._pending.pop(e.key, None)
            self._free_host(e)
        self.metrics.reservations_open.set(len(self.holds.reservations))

    # ---- load: lease / release ------------------------------------------------------------------

    async def lease(self, req: P.LeaseRequest, owner_pid: int | None = None) -> P.LeaseResponse:
        self.model(req.fingerprint)
        self._check_count(len(req.hashes))
        if req.classes is not None and (bad := [c for c in req.classes if c not in ("global", "local")]):
            raise InvalidRequest(f"classes {bad} unknown; head classes are 'global' and 'local'")
        keys = [(req.namespace, req.fingerprint, h) for h in req.hashes]
        if self.mover is not None:
            # Hold the entries while their prefetches run: otherwise promoting one can evict another
            # promoted a moment earlier for this same lease (found by the kill -9 test).
            held = [e for k in keys if (e := self._index.get(k)) is not None]
            for e in held:
                self.hold(e)
            try:
                wait = self.settings.ssd.prefetch_deadline_s if req.wait_s is None else req.wait_s
                await self.mover.wait_for_host(keys, req.classes, wait)
            finally:
                for e in held:
                    self.unhold(e)
        now = self.clock()
        ttl = self.settings.host.lease_ttl_s
        lease = Lease(uuid.uuid4().hex, owner_pid, now + ttl, [])
        out = [self._lease_one(lease, key, req.classes, now) for key in keys]
        if lease.keys:
            self.holds.add_lease(lease)
            self.metrics.leases_held.set(len(self.holds.leases))
        return P.LeaseResponse(lease_id=lease.lease_id if lease.keys else None, expires_in_s=ttl,
                               arena_id=self.host.arena_id, entries=out)

    def _lease_one(self, lease: Lease, key: EntryKey, classes: list[str] | None, now: float) -> P.LeasedEntry:
        e = self._index.get(key)
        if e is None:
            return P.LeasedEntry(hash=key[2], status="missing")
        want = [c for c in e.extents if classes is None or c in classes]
        if not all(e.extents[c].host is not None for c in want):
            lost = any(e.extents[c].host is None and e.extents[c].ssd is None for c in want)
            return P.LeasedEntry(hash=key[2], status="missing" if lost else "timeout", num_tokens=e.num_tokens)
        self.hold(e)
        e.reuse_count += 1
        e.last_access = now
        self.host_policy.on_access(key, now)
        lease.keys.append(key)
        lease.nbytes += sum(e.extents[c].nbytes for c in want)
        return P.LeasedEntry(hash=key[2], status="ok", num_tokens=e.num_tokens, extents=self._extent_infos(e, want))

    def release(self, req: P.ReleaseRequest) -> P.CountResponse:
        lease = self.holds.pop_lease(req.lease_id)
        self._end_lease(lease)
        self.metrics.moved_bytes.labels("load").inc(lease.nbytes)
        self.metrics.moved_seconds.labels("load").inc(req.transfer_s)
        return P.CountResponse(count=len(lease.keys))

    def _end_lease(self, lease: Lease) -> None:
        for key in lease.keys:
            e = self._index.get(key) or self._doomed.get(key)
            if e is not None:
                self.unhold(e)
        self.metrics.leases_held.set(len(self.holds.leases))

    def hold(self, e: Entry) -> None:
        """One more reader (a lease, or the mover) of ``e``: it is not evicted or freed until ``unhold``."""
        e.leases += 1

    def unhold(self, e: Entry) -> None:
        """One reader (a lease, or the mover) is done with ``e``; a deleted entry is freed at the last."""
        e.leases -= 1
        assert e.leases >= 0, f"lease count of {e.key} went negative"
        if e.leases == 0 and self._doomed.get(e.key) is e:
            del self._doomed[e.key]
            self._free_all(e)

    # ---- admin: delete, pin, evict, flush ---------------------------------------------------------

    def _select(self, req: P.EntriesRequest) -> list[Entry]:
        self._check_count(len(req.hashes))
        fps = [req.fingerprint] if req.fingerprint else list(self.models)
        return [e for h in req.hashes for fp in fps if (e := self._index.get((req.namespace, fp, h))) is not None]

    def delete(self, req: P.EntriesRequest) -> P.CountResponse:
        found = self._select(req)
        for e in found:
            self._remove(e)
        return P.CountResponse(count=len(found))

    def set_pinned(self, req: P.EntriesRequest, pinned: bool) -> P.CountResponse:
        found = self._select(req)
        for e in found:
            e.pinned = pinned
            if e.fastest_tier() == "host":
                self.host_policy.on_insert(e.key, self.meta(e, tier="host"), self.clock())
            if pinned and self.mover is not None:
                self.mover.on_pin(e)
        return P.CountResponse(count=len(found))

    async def evict(self, req: P.EvictRequest) -> P.CountResponse:
        """Drop host copies of matching, unleased, unpinned entries (tier=host); SSD records (tier=ssd)."""
        if req.tier != "host":
            return P.CountResponse(count=await self._need_mover(req.tier).evict(req))
        budget, count = req.max_bytes, 0
        for e in list(self._index.values()):
            if (req.namespace and e.namespace != req.namespace) or (req.fingerprint and e.fingerprint != req.fingerprint):
                continue
            if not self.host_evictable(e.key) or (budget is not None and budget <= 0):
                continue
            budget = None if budget is None else budget - e.nbytes
            self.evict_host(e)
            count += 1
        return P.CountResponse(count=count)

    async def flush(self, req: P.FlushRequest) -> P.CountResponse:
        """Write every matching host-only entry to SSD now (``kvctl flush``)."""
        return P.CountResponse(count=await self._need_mover("ssd").flush(req))

    async def compact(self) -> P.CountResponse:
        return P.CountResponse(count=await self._need_mover("ssd").compact())

    def _need_mover(self, tier: str):
        if self.mover is None:
            raise InvalidRequest(f"tier {tier!r} is not enabled on this daemon (ssd.enabled = false)")
        return self.mover

    # ---- background: expiry ---------------------------------------------------------------------

    def expire(self, now: float | None = None, *, is_alive: Callable[[int], bool] = owner_is_alive) -> int:
        """Take back reservations and leases past their TTL or whose owner process died."""
        now = self.clock() if now is None else now
        reservations, leases = self.holds.take_expired(now, is_alive)
        for res in reservations:
            self._drop_reservation(res)
            self.metrics.reservations_expired.inc()
        for lease, reason in leases:
            self._end_lease(lease)
            self.metrics.leases_expired.labels(reason).inc()
            logger.warning("lease %s of pid %s taken back (%s), %d entries", lease.lease_id, lease.owner_pid,
                           reason, len(lease.keys))
        return len(reservations) + len(leases)

    # ---- used by the mover and reporting ---------------------------------------------------------

    def get(self, key: EntryKey) -> Entry | None:
        return self._index.get(key)

    def iter_entries(self) -> Iterable[Entry]:
        return list(self._index.values())

    def insert_recovered(self, e: Entry) -> None:
        """Put an entry rebuilt from a persistent tier into the index (daemon start)."""
        self._index[e.key] = e

    def meta(self, e: Entry, *, tier: str):
        """What eviction policies see of an entry in ``tier`` (``Entry.policy_meta``)."""
        return e.policy_meta(tier, self.models[e.fingerprint].spec.num_layers)

    def host_evictable(self, key: EntryKey) -> bool:
        e = self._index.get(key)
        return (e is not None and not e.pinned and e.leases == 0 and e.fastest_tier() == "host"
                and not (self.mover is not None and self.mover.is_busy(key)))

    def evict_host(self, e: Entry) -> None:
        """Drop the entry's host copies; it leaves the index if no other tier holds it."""
        self._free_host(e)
        self.host_policy.on_remove(e.key)
        self.metrics.evicted_entries.labels("host").inc()
        if e.fastest_tier() is None:
            self.forget(e)

    def free_extent_host(self, e: Entry, x: Extent) -> None:
        """One extent leaves the arena (cold placement); the entry's host accounting follows."""
        if x.host is not None:
            self.host.drop(x.host)
            x.host = None
        if e.key in self._index:
            if any(y.host is not None for y in e.extents.values()):
                self.host_policy.on_insert(e.key, self.meta(e, tier="host"), self.clock())
            else:
                self.host_policy.on_remove(e.key)

    def forget(self, e: Entry) -> None:
        """The entry has no copy left anywhere: it leaves the index."""
        if self._index.get(e.key) is e:
            del self._index[e.key]
            self.host_policy.on_remove(e.key)
            if self.mover is not None:
                self.mover.on_remove(e, deleted=False)

    async def run_io(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    # ---- stats ----------------------------------------------------------------------------------

    def tier_stats(self) -> list[TierStats]:
        return [self.host.stats()] + ([self.mover.ssd.stats()] if self.mover is not None else [])

    def num_entries(self) -> int:
        return len(self._index)

    def num_leases(self) -> int:
        return len(self.holds.leases)

    def num_reservations(self) -> int:
        return len(self.holds.reservations)

    def num_committing(self) -> int:
        return len(self.holds.committing)

    # ---- helpers --------------------------------------------------------------------------------

    def _check_count(self, n: int) -> None:
        limit = self.settings.daemon.max_entries_per_request
        if n > limit:
            raise RequestTooLarge(f"{n} entries in one request; at most {limit} (daemon.max_entries_per_request)")

    def _extent_infos(self, e: Entry, classes: list[str] | None = None) -> list[P.ExtentInfo]:
        return [P.ExtentInfo(head_class=c, offset=x.host.offset, nbytes=x.nbytes,
                             checksum=None if x.checksum is None else f"{x.checksum:016x}")
                for c, x in e.extents.items() if x.host is not None and (classes is None or c in classes)]

    def _free_host(self, e: Entry) -> None:
        for x in e.extents.values():
            if x.host is not None:
                self.host.drop(x.host)
                x.host = None

    def _free_all(self, e: Entry) -> None:
        self._free_host(e)
        if self.mover is not None:
            self.mover.drop_ssd(e)

    def _remove(self, e: Entry) -> None:
        """Take the entry out of the index; free its bytes now, or on its last release if held."""
        if self._index.get(e.key) is not e:
            return
        self.forget(e)
        if self.mover is not None:
            self.mover.on_remove(e, deleted=True)
        if e.leases:
            self._doomed[e.key] = e
        else:
            self._free_all(e)

    def _has_entries(self, fp: str) -> bool:
        return any(e.fingerprint == fp for e in self._index.values())
