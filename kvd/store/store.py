"""The store: the control API's operations on the index, one method per route.

It orchestrates; the parts do the work: the index and its tiers' policies (``index``), moving bytes
between tiers (``pipeline``, the one eviction path), background write-back, relief and prefetch
(``background``), holds (``holds``), models (``registry``), admin actions (``admin``), the index
rebuild at start (``recovery``). Everything here runs on the event loop and never blocks it.

Invariants:
- an entry is in the index only after its commit finished, and whole: lookups see whole entries or
  nothing; a commit is all-or-nothing (a failure half-way leaves nothing indexed, the reservation
  intact for its abort or expiry);
- bytes of an entry with ``holds > 0`` are never freed or overwritten;
- KV is served only to a reader of the same ``computed_under`` tag, and lossy copies only to readers
  that accept them;
- "cannot right now" (no room, nothing evictable) answers ``no_space`` and changes nothing.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Executor

from kvd.codecs import Codecs
from kvd.core import protocol as P
from kvd.core.config import Settings
from kvd.core.errors import InvalidRequest, RequestTooLarge
from kvd.core.keys import EXACT, prefix_hashes
from kvd.core.protocol_lookup import LookupReport
from kvd.daemon.metrics import Metrics
from kvd.policies.admission import SsdAdmission
from kvd.policies.eviction import EvictionPolicy
from kvd.store import answers as L
from kvd.store.admin import Admin
from kvd.store.background import Background
from kvd.store.entries import Entry, Lease
from kvd.store.holds import HoldTable, owner_is_alive
from kvd.store.index import Index, Level
from kvd.store.pipeline import Pipeline
from kvd.store.published import Publisher
from kvd.store.readers import EXACT_READER, Reader, head_aware_hits, readable_by, reader_of
from kvd.store.recovery import find_and_adopt, find_shared
from kvd.store.registry import ModelRegistry
from kvd.store.shared_find import SharedFinds
from kvd.store.writes import Writes, check_owner, count_moved
from kvd.tiers.base import Tier, TierStats
from kvd.tiers.host import HostTier

logger = logging.getLogger(__name__)


class Store:
    def __init__(self, settings: Settings, tiers: list[Tier], *, metrics: Metrics, cpu: Executor, io: Executor,
                 clock: Callable[[], float] = time.monotonic,
                 policies: dict[str, EvictionPolicy] | None = None,
                 partition_of: Callable[[str], str] = lambda namespace: "",
                 quotas: dict[str, Callable[[str], int | None]] | None = None) -> None:
        """``partition_of`` (namespace -> tenant) and ``quotas`` (tier -> tenant -> bytes) come from
        ``kvd.daemon.tenants``; by default one partition and no quotas (one trust domain)."""
        check_order(tiers)
        self.settings = settings
        self.metrics = metrics
        self.clock = clock
        self.started_at = clock()
        self.registry = ModelRegistry(clock, settings.daemon)
        policies = policies or {}
        levels = [Level.of(i, t, settings, policies.get(t.name)) for i, t in enumerate(tiers)]
        for lv in levels:
            lv.quota = (quotas or {}).get(lv.name)
        self.index = Index(levels, num_layers=lambda fp: self.registry.get(fp).spec.num_layers, clock=clock,
                           partition_of=partition_of)
        self.pipeline = Pipeline(self.index, codecs=Codecs(settings.codec), cpu=cpu, io=io, metrics=metrics,
                                 admitted=lambda e: self.background.admitted(e),
                                 dtype_of=lambda fp: self.registry.get(fp).spec.kv_dtype, clock=clock)
        self.holds = HoldTable(reservation_ttl_s=lambda: settings.host.reservation_ttl_s,
                               lease_ttl_s=lambda: settings.host.lease_ttl_s)
        self.background = Background(self.index, self.pipeline, SsdAdmission(settings.ssd.admit_after), settings,
                                     metrics, leases_held=lambda: len(self.holds.leases))
        self.pipeline.keep_for = self.background.pending_through
        self.admin = Admin(self.index, self.pipeline, self.background, settings)
        self.pipeline.registered = self.admin.registered
        self.writes = Writes(self.index, self.pipeline, self.background, self.registry, self.holds, settings,
                             metrics, clock)
        if settings.host.lookup_index and isinstance(self.index.landing.tier, HostTier):
            self.index.published = Publisher(self.index, chunk_tokens=settings.keys.chunk_tokens)
        self.finds = SharedFinds(lambda lv, keys: find_and_adopt(self, lv, keys))

    def close(self) -> None:
        """The shared lookup index goes (its readers are told the daemon is gone); finds in flight stop."""
        self.finds.close()
        if self.index.published is not None:
            self.index.published.close()
            self.index.published = None

    def add_tier(self, tier: Tier) -> None:
        """A tier joins at the bottom while serving (the remote cluster, reachable again)."""
        lv = Level.of(len(self.index.levels), tier, self.settings)
        self.index.add_level(lv)
        if tier.holds_records:
            self.admin.persist_models(self.registry.models, lv)

    @property
    def shared(self) -> bool:
        return any(lv.tier.shared for lv in self.index.levels)

    @property
    def host(self) -> HostTier:
        return self.index.landing.tier  # type: ignore[return-value]  # checked in __init__

    # ---- models ---------------------------------------------------------------------------------

    def register_model(self, req: P.RegisterModelRequest, *, persist: bool = True, partition: str = "",
                       tenant: str | None = None, may_remap: bool = True) -> P.RegisterModelResponse:
        """Register (idempotent); the answer names the arena of the caller's ``partition``. ``tenant``
        and ``may_remap``: see ``ModelRegistry.register``."""
        record, changed = self.registry.register(req, has_entries=self.index.in_use, tenant=tenant,
                                                 may_remap=may_remap)
        if changed:  # not persisted: read from a persistent tier at start (written again before records)
            self.admin.persist_model(req, record.fingerprint, None if persist else [])
        return P.RegisterModelResponse(
            fingerprint=record.fingerprint, chunk_tokens=self.settings.keys.chunk_tokens,
            arena=self.arena_info(partition), head_map_method=record.head_map.method,
            num_global_heads=record.num_global_heads)

    def arena_info(self, partition: str = "") -> P.ArenaInfo:
        a = self.host.arena(partition)
        pub = self.index.published
        return P.ArenaInfo(path=str(a.path), capacity_bytes=a.capacity_bytes, slot_bytes=a.slot_bytes,
                           arena_id=a.arena_id, index_path=pub.path(partition) if pub is not None else None,
                           file_id=a.file_id)

    # ---- lookup ---------------------------------------------------------------------------------

    async def lookup(self, req: P.LookupRequest) -> L.LookupResult:
        reader = reader_of(self.registry.get(req.fingerprint), req)
        chunk = self.settings.keys.chunk_tokens
        if req.token_ids is not None and req.prefix_hashes is not None:
            raise InvalidRequest("send token_ids or prefix_hashes, not both")
        if req.token_ids is not None:
            if len(req.token_ids) > self.settings.daemon.max_tokens_per_request:
                raise RequestTooLarge(f"{len(req.token_ids)} token ids; at most "
                                      f"{self.settings.daemon.max_tokens_per_request} per lookup")
            hashes = prefix_hashes(req.token_ids, chunk_tokens=chunk, namespace=req.namespace,
                                   fingerprint=req.fingerprint, computed_under=req.computed_under)
        else:
            hashes = req.prefix_hashes or []
        self._check_count(len(hashes) + len(req.chunk_hashes or []))
        if self.shared:  # entries other hosts stored: one round trip, bounded by remote.lookup_deadline_s
            await find_shared(self, req.namespace, req.fingerprint, [*hashes, *(req.chunk_hashes or [])],
                              exact=not reader.head_aware)
        if reader.head_aware:
            prefix, num_hits = self._head_aware_rows(req, reader, hashes)
        else:
            prefix = self._rows(req, reader, hashes)
            num_hits = L.leading_hits(prefix)
        chunks = self._rows(req, reader, req.chunk_hashes or [])
        if num_hits or chunks:
            self.background.on_hit()
        result = L.LookupResult(chunk_tokens=chunk, num_prefix_hits=num_hits, prefix=prefix, chunks=chunks)
        L.count_hits(self.metrics, req, result, num_hashes=len(hashes))
        return result

    def apply_report(self, report: LookupReport) -> int:
        """Count lookups answered from the shared index as the daemon counts its own (``count_hits``,
        ``_found``): tokens asked and found by tier, and a sighting of each found entry an exact reader
        can read. Returns the sightings applied."""
        self._check_count(sum(len(it.seen) for it in report.items))
        for it in report.items:
            self.registry.get(it.fingerprint)  # NotFound (404) for a model the daemon does not know
            bad = [t for t in it.hit_tokens if t not in self.index.by_name]
            if bad:
                raise InvalidRequest(f"hit_tokens names tiers this daemon does not have: {bad}")
        now, applied = self.clock(), 0
        for it in report.items:
            self.metrics.local_lookups.inc(it.lookups)
            self.metrics.lookup_tokens.labels("prefix").inc(it.asked_tokens)
            for tier, n in it.hit_tokens.items():
                self.metrics.hit_tokens.labels("prefix", tier).inc(n)
            for h, times in it.seen:
                found = self.index.resolve((it.namespace, it.fingerprint, h))
                if found is None or not readable_by(EXACT_READER, found[0], EXACT):
                    continue
                e = found[0]
                e.seen += times
                e.last_access = max(e.last_access, now)
                self.background.on_seen(e)
                applied += 1
        return applied

    def _found(self, req: P.LookupRequest, reader: Reader, hashes: list[str]) -> list[tuple[int, Entry, int]]:
        """``(request index, entry, tokens used)`` of each stored entry of the reader's attention.
        (A list, with what the loop asks per entry looked up once: this is the lookup's hot loop.)"""
        now = self.clock()
        resolve, on_seen = self.index.resolve, self.background.on_seen
        ns, fp, cu = req.namespace, req.fingerprint, req.computed_under
        out = []
        for i, h in enumerate(hashes):
            found = resolve((ns, fp, h))
            if found is None:
                continue
            e, n = found
            if not readable_by(reader, e, cu):
                continue
            e.seen += 1
            e.last_access = now
            on_seen(e)
            out.append((i, e, n))
        return out

    def _rows(self, req: P.LookupRequest, reader: Reader, hashes: list[str]) -> list[L.EntryRow]:
        """Rows of an exact reader (every class): each entry's row from its cache (``L.cached_parts``)."""
        out = []
        levels, by_name, lossy, prefetch = self.index.levels, self.index.by_name, req.accept_lossy, req.prefetch
        records = [lv.name for lv in self.index.records]  # tiers a prefetch brings entries back from
        for i, e, num_tokens in self._found(req, reader, hashes):
            parts = L.cached_parts(levels, by_name, e, lossy)
            if parts is None:
                continue
            if prefetch and parts[0] in records:
                self.background.prefetch(e, None, lossy)
            out.append(L.EntryRow(i, hashes[i], *parts, num_tokens))
        return out

    def _head_aware_rows(self, req: P.LookupRequest, reader: Reader, hashes: list[str]
                         ) -> tuple[list[L.EntryRow], int]:
        """Rows for a head-aware reader: each entry's classes it reads (at the position of the longest
        loadable run for the run's entries, at its own end for the rest), and that run's length.
        Prefetch brings only those classes: cold extents the reader skips stay cold."""
        found = self._found(req, reader, hashes)
        hits, pos = head_aware_hits(reader, found, req.max_tokens)
        out = []
        for k, (i, e, num_tokens) in enumerate(found):
            at = pos if k < hits else e.start_token + e.num_tokens
            want = reader.wanted(e, at)
            row = L.row(self.index.levels, self.index.by_name, e, i, hashes[i], num_tokens, req.accept_lossy, want)
            if row is None:
                continue
            if req.prefetch and self.index.by_name[row.tier].tier.holds_records and row.complete:
                self.background.prefetch(e, want, req.accept_lossy)
            out.append(row)
        return out, hits

    # ---- store: reserve / commit / abort (kvd.store.writes) --------------------------------------

    async def reserve(self, req: P.ReserveRequest, owner_pid: int | None = None) -> P.ReserveResponse:
        self._check_count(len(req.entries))
        return await self.writes.reserve(req, owner_pid)

    async def commit(self, req: P.CommitRequest, owner_pid: int | None = None) -> P.CommitResponse:
        return await self.writes.commit(req, owner_pid)

    def abort(self, req: P.AbortRequest, owner_pid: int | None = None) -> P.CountResponse:
        return self.writes.abort(req, owner_pid)

    # ---- load: lease / release ------------------------------------------------------------------

    async def lease(self, req: P.LeaseRequest, owner_pid: int | None = None) -> P.LeaseResponse:
        reader = reader_of(self.registry.get(req.fingerprint), req)
        self._check_count(len(req.hashes))
        if self.shared:  # a lease without a lookup first (another process looked up) still finds them
            await find_shared(self, req.namespace, req.fingerprint, req.hashes, exact=not reader.head_aware)
        found = [self.index.resolve((req.namespace, req.fingerprint, h)) for h in req.hashes]
        found = [f if f is not None and readable_by(reader, f[0], req.computed_under)
                 and reader.serves(f[0], req.position) else None for f in found]
        held = list({id(f[0]): f[0] for f in found if f is not None}.values())
        wanted = {id(e): reader.wanted(e, req.position) for e in held}
        readable = self.background.promotion.readable(req.gpu)
        # Hold the entries while their promotions run: otherwise promoting one can evict another
        # promoted a moment earlier for this same lease.
        for e in held:  # (waiting: these holds read nothing, so a promotion may replace a lossy copy)
            self.pipeline.hold(e)
            e.waiting += 1
        try:
            wait = self.settings.ssd.prefetch_deadline_s if req.wait_s is None else req.wait_s
            await self.background.wait_for_top(held, lambda e: wanted[id(e)], req.accept_lossy, wait, readable)
        finally:
            for e in held:
                e.waiting -= 1
                self.pipeline.unhold(e)
        now = self.clock()
        ttl = self.settings.host.lease_ttl_s
        lease = Lease(uuid.uuid4().hex, owner_pid, now + ttl, [], ttl_s=ttl)
        order = [lv.name for lv in self.index.memory if lv.name in readable]  # fastest first
        out = [self._lease_one(lease, h, f, wanted[id(f[0])] if f is not None else [], req.accept_lossy, now, order)
               for h, f in zip(req.hashes, found)]
        self.index.touch_all(lease.entries, now)
        if lease.entries:
            self.holds.add_lease(lease)
            self.metrics.leases_held.set(len(self.holds.leases))
        partition = self.host.partition_of(req.namespace)
        return P.LeaseResponse(lease_id=lease.lease_id if lease.entries else None, expires_in_s=ttl,
                               arena_id=self.host.arena(partition).arena_id, entries=out,
                               gpu_pool=L.gpu_pool(self.index.levels, partition, [x for r in out for x in r.extents]))

    def _lease_one(self, lease: Lease, h: str, found: tuple[Entry, int] | None, want: list[str],
                   accept_lossy: bool, now: float, order: list[str]) -> P.LeasedEntry:
        if found is None:
            return P.LeasedEntry(hash=h, status="missing")
        e = found[0]
        if self.background.promotion.missing(e, want, accept_lossy, frozenset(order)):
            lost = any(not e.extents[c].usable(accept_lossy) for c in want)
            return P.LeasedEntry(hash=h, status="missing" if lost else "timeout", num_tokens=e.num_tokens,
                                 start_token=e.start_token)
        self.pipeline.hold(e)
        e.reuse_count += 1
        lease.entries.append(e)  # touched with the others, tail first (Index.touch_all)
        infos = L.extent_infos(e, order, want, accept_lossy)
        for x in infos:
            lease.nbytes[x.tier] = lease.nbytes.get(x.tier, 0) + x.nbytes
        return P.LeasedEntry(hash=h, status="ok", num_tokens=e.num_tokens, start_token=e.start_token, extents=infos)

    def release(self, req: P.ReleaseRequest, owner_pid: int | None = None) -> P.CountResponse:
        check_owner(self.holds.leases.get(req.lease_id), owner_pid)
        lease = self.holds.pop_lease(req.lease_id)
        self._end_lease(lease)
        count_moved(self.metrics, "load", lease.nbytes, req.transfer_s)
        return P.CountResponse(count=len(lease.entries))

    def renew(self, req: P.RenewRequest, owner_pid: int | None = None) -> P.CountResponse:
        check_owner(self.holds.get(req.hold_id), owner_pid)
        self.holds.renew(req.hold_id, self.clock())
        return P.CountResponse(count=1)

    def _end_lease(self, lease: Lease) -> None:
        for e in lease.entries:
            self.pipeline.unhold(e)
        self.metrics.leases_held.set(len(self.holds.leases))

    # ---- admin: delete, pin, evict, flush, compact ----------------------------------------------

    def delete(self, req: P.EntriesRequest) -> P.CountResponse:
        found = self._select(req)
        for e in found:
            self.background.on_remove(e)
            self.pipeline.remove(e, shared=True)  # an operator's delete: from the shared cluster too
        return P.CountResponse(count=len(found))

    def set_pinned(self, req: P.EntriesRequest, pinned: bool) -> P.CountResponse:
        found = self._select(req)
        for e in found:
            e.pinned = pinned
            self.index.refresh(e)
            if pinned:
                self.background.on_pin(e)
        return P.CountResponse(count=len(found))

    def _select(self, req: P.EntriesRequest) -> list[Entry]:
        self._check_count(len(req.hashes))
        fps = [req.fingerprint] if req.fingerprint else list(self.registry.models)
        return self.index.named(req.namespace, fps, req.hashes)

    async def evict(self, req: P.EvictRequest) -> P.EvictResponse:
        return await self.admin.evict(req)

    async def flush(self, req: P.FlushRequest) -> P.CountResponse:
        return P.CountResponse(count=await self.admin.flush(req))

    async def compact(self) -> P.CountResponse:
        return P.CountResponse(count=await self.admin.compact())

    # ---- background: expiry ---------------------------------------------------------------------

    def expire(self, now: float | None = None, *, is_alive: Callable[[int], bool] = owner_is_alive) -> int:
        """Take back reservations and leases past their TTL or whose owner process died; forget idle models."""
        now = self.clock() if now is None else now
        reservations, leases = self.holds.take_expired(now, is_alive)
        for res in reservations:
            self.writes.drop_reservation(res)
            self.metrics.reservations_expired.inc()
        for lease, reason in leases:
            self._end_lease(lease)
            self.metrics.leases_expired.labels(reason).inc()
            logger.warning("lease %s of pid %s taken back (%s), %d entries", lease.lease_id, lease.owner_pid,
                           reason, len(lease.entries))
        for fp in self.registry.prune(self.settings.daemon.model_idle_s, self.index.in_use):
            self.admin.forget_model(fp)
        return len(reservations) + len(leases)

    # ---- stats ----------------------------------------------------------------------------------

    def tier_stats(self) -> list[TierStats]:
        return [lv.tier.stats() for lv in self.index.levels]

    def _check_count(self, n: int) -> None:
        limit = self.settings.daemon.max_entries_per_request
        if n > limit:
            raise RequestTooLarge(f"{n} entries in one request; at most {limit} (daemon.max_entries_per_request)")


def check_order(tiers: list[Tier]) -> None:
    """The memory tiers first (clients map them), the host arena the last of them (every client maps
    it, and promotions land there), then the record tiers."""
    memory = [t for t in tiers if not t.holds_records]
    if not memory or not isinstance(memory[-1], HostTier) or tiers[: len(memory)] != memory:
        raise ValueError(f"store tiers {[t.name for t in tiers]}: the memory tiers (a GPU pool, then the host "
                         "arena, which clients map) must come first, the record tiers (ssd, remote) after")
