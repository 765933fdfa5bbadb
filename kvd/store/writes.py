"""The write transaction of the store: reserve slots, the client copies, commit (all or nothing) or abort.

Lifecycle of a reservation: ``reserve`` marks each new key pending (before any await: no second
writer of it) and gives each extent a slot run in the first memory tier the writer maps that has room
for the whole entry — the GPU pool of the namespace's partition for a writer that maps it (``gpu``),
else (or when the pool has no room even after evicting) its arena — evicting there if needed
(``Pipeline.reserve``) → the client copies KV into the slots → ``commit`` decides placement, trims
the extents placement keeps only in part (capacity mode: copied into a smaller slot run of the arena,
``_trim``), takes each extent's checksum (the writer's, when it hashed the bytes right after its copy
and the extent was not trimmed; else its own of the bytes kept, GPU bytes through pinned staging), and indexes
every entry at once, or none if anything fails half-way (the reservation then stays, for its abort or
expiry) → or ``abort`` frees the slots.
A reservation belongs to the process that made it: another one cannot commit or abort it.
"""

from __future__ import annotations

import time
import uuid
from collections import Counter
from collections.abc import Callable

import numpy as np

from kvd.core import protocol as P
from kvd.core.config import Settings
from kvd.core.errors import Forbidden, InvalidRequest
from kvd.daemon.metrics import Metrics
from kvd.policies.placement import HeadClassPlacement
from kvd.store import answers as L
from kvd.store.background import Background
from kvd.store.entries import Copy, Entry, EntryKey, Extent, ModelRecord, Reservation, new_entry
from kvd.store.holds import HoldTable
from kvd.store.index import Index, Level, tail_first
from kvd.store.pipeline import Pipeline
from kvd.store.registry import ModelRegistry


class Writes:
    def __init__(self, index: Index, pipeline: Pipeline, background: Background, registry: ModelRegistry,
                 holds: HoldTable, settings: Settings, metrics: Metrics,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.index = index
        self.pipeline = pipeline
        self.background = background
        self.registry = registry
        self.holds = holds
        self.settings = settings
        self.metrics = metrics
        self.clock = clock
        self.placement = HeadClassPlacement(settings.codec)

    @property
    def host(self):
        return self.index.landing.tier

    async def reserve(self, req: P.ReserveRequest, owner_pid: int | None = None) -> P.ReserveResponse:
        model = self.registry.get(req.fingerprint)
        if len({r.hash for r in req.entries}) != len(req.entries):
            raise InvalidRequest("an entry appears twice in one reserve request")
        rid = uuid.uuid4().hex
        ttl = self.settings.host.reservation_ttl_s
        res = Reservation(rid, owner_pid, self.clock() + ttl, {}, ttl_s=ttl)
        out: list[P.ReservedEntry] = []
        levels = self.index.memory if req.gpu else [self.index.landing]
        tiers = [lv.name for lv in levels]
        try:
            for r in req.entries:
                key = (req.namespace, req.fingerprint, r.hash)
                if self._exists(key, r, req.computed_under):
                    out.append(P.ReservedEntry(hash=r.hash, status="exists"))
                    continue
                self.index.pending[key] = rid  # before any await: no second writer of this key
                entry = await self._reserve_entry(model, key, r, req.computed_under, levels)
                if entry is None:
                    del self.index.pending[key]
                    self.metrics.no_space.inc()
                    out.append(P.ReservedEntry(hash=r.hash, status="no_space"))
                    continue
                res.entries[r.hash] = entry
                res.aliases[r.hash] = [(a.hash, a.num_tokens) for a in r.aliases]
                out.append(P.ReservedEntry(hash=r.hash, status="reserved", extents=L.extent_infos(entry, tiers)))
        except BaseException:  # an unexpected failure (eviction's write-down): nothing stays pending or held
            for e in res.entries.values():
                self._free_pending(e)
            for k in [k for k, v in self.index.pending.items() if v == rid]:
                del self.index.pending[k]
            raise
        if res.entries:
            self.holds.add_reservation(res)
            self.metrics.reservations_open.set(len(self.holds.reservations))
        partition = self.host.partition_of(req.namespace)
        return P.ReserveResponse(reservation_id=rid if res.entries else None, expires_in_s=ttl,
                                 arena_id=self.host.arena(partition).arena_id, entries=out,
                                 gpu_pool=L.gpu_pool(self.index.levels, partition,
                                                     [x for r in out for x in r.extents]))

    def _exists(self, key: EntryKey, r: P.ReserveEntry, computed_under: str) -> bool:
        """Stored already (or being stored, or covered by an alias): count the sighting, take its aliases."""
        existing = self.index.get(key)
        if existing is not None:
            existing.seen += 1
            existing.last_access = self.clock()
            self.background.on_seen(existing)  # a sighting: admission counts it, and may queue its write-back
            if existing.computed_under == computed_under:
                for a in r.aliases:
                    self.index.add_alias(existing, a.hash, a.num_tokens)
            return True
        return key in self.index.pending or key in self.index.aliases

    async def _reserve_entry(self, model: ModelRecord, key: EntryKey, r: P.ReserveEntry, computed_under: str,
                             levels: list[Level]) -> Entry | None:
        """A pending entry with every extent in one of ``levels`` (the first with room), or None."""
        now = self.clock()
        end = r.end_token if r.end_token is not None else r.start_token + r.num_tokens
        entry = new_entry(model, key, kind=r.kind, num_tokens=r.num_tokens, start_token=r.start_token, end_token=end,
                          computed_under=computed_under, now=now)
        name = entry.name(next(iter(entry.extents)))
        for lv in levels:  # each extent takes whole slots: the entry needs the sum of their footprints
            if not lv.tier.fits(sum(lv.tier.footprint(x.nbytes, name) for x in entry.extents.values()), name):
                continue  # can never fit there: refused before anything is evicted
            if await self._reserve_in(entry, lv):
                return entry
        return None

    async def _reserve_in(self, entry: Entry, lv: Level) -> bool:
        try:
            for x in entry.extents.values():
                loc = await self.pipeline.reserve(lv, x.nbytes, entry.name(x.head_class))
                if loc is None:
                    break
                x.copies[lv.name] = Copy(loc, "raw", None)
            else:
                return True
        finally:  # no room, or a failure: the slots taken for this entry go back
            if not all(lv.name in y.copies for y in entry.extents.values()):
                self.pipeline.discard(lv, [c.loc for y in entry.extents.values()
                                           if (c := y.copies.pop(lv.name, None))])
        return False

    async def commit(self, req: P.CommitRequest, owner_pid: int | None = None) -> P.CommitResponse:
        rid = req.reservation_id
        check_owner(self.holds.reservations.get(rid), owner_pid)
        res = self.holds.begin_commit(rid)
        done = False
        try:
            chosen = list(res.entries) if req.hashes is None else req.hashes
            unknown = [h for h in chosen if h not in res.entries]
            if unknown:
                raise InvalidRequest(f"entries {unknown[:3]} are not part of reservation {rid}")
            twice = [h for h, n in Counter(chosen).items() if n > 1]
            if twice:  # as reserve refuses them: an entry indexed twice would fail half-way through the commit
                raise InvalidRequest(f"entries {twice[:3]} appear twice in one commit request")
            entries = [res.entries[h] for h in chosen]
            by_tier: dict[str, int] = {}  # what the writer copied: taken before trimming lets tokens go
            for e in entries:
                for x in e.extents.values():
                    for t in x.copies:
                        by_tier[t] = by_tier.get(t, 0) + x.nbytes
            given = _given_checksums(req, res)
            trims = [t for e in entries for t in self._place(e)]
            if trims:  # before the checksums: they are taken of the bytes kept
                await self._trim(trims)
            await self._checksum(entries, given)
            self._insert_all(res, entries)
            done = True
        finally:
            self.holds.end_commit(rid, done=done)
        for e in res.entries.values():
            if e.hash not in set(chosen):
                self._free_pending(e)
        count_moved(self.metrics, "store", by_tier, req.transfer_s)
        self.metrics.reservations_open.set(len(self.holds.reservations))
        return P.CommitResponse(committed=chosen)

    async def _checksum(self, entries: list[Entry], given: dict[str, list[int]]) -> None:
        """Each extent's commit checksum: the writer's (``given``, taken of the bytes it wrote) for an entry
        this commit did not trim; the daemon's own hash of the bytes kept for the others
        (``host.verify_on_commit``; off: no checksum)."""
        sums = {e.hash: given[e.hash] for e in entries if e.hash in given and not e.is_trimmed}
        mine = [e for e in entries if e.hash not in sums]
        if mine and self.settings.host.verify_on_commit:
            tiers = {lv.name: lv.tier for lv in self.index.memory}
            sums.update(zip([e.hash for e in mine], await self.pipeline.on_cpu(self.pipeline.forms.checksums,
                                                                               tiers, mine)))
        for e in entries:
            for x, c in zip(e.extents.values(), sums.get(e.hash, ())):
                x.checksum = next(iter(x.copies.values())).checksum = c

    def _insert_all(self, res: Reservation, entries: list[Entry]) -> None:
        """Index every entry of the commit, or none: a failure half-way takes the inserted ones back
        out and leaves the reservation as it was (its abort or expiry frees the slots)."""
        touched: list[Entry] = []
        now = self.clock()
        try:
            for e in tail_first(entries):  # the policies meet a sequence's head last: it outlives its tail
                touched.append(e)
                e.created = e.last_access = now
                self.index.insert(e)
                for alias_hash, n in res.aliases.get(e.hash, []):
                    self.index.add_alias(e, alias_hash, n)
                self.background.on_seen(e)
                self.background.on_commit(e)
        except BaseException:
            for e in touched:
                self.index.forget(e)  # the keys stay pending under the reservation
            raise
        for e in entries:
            del self.index.pending[e.key]
            self.metrics.committed_entries.labels(e.kind).inc()

    def _place(self, e: Entry) -> list[tuple[Entry, Extent, tuple[int, int]]]:
        """Head-aware placement of each extent (kvd.policies.placement), decided at commit; returns the
        extents to trim and the span each keeps."""
        placed = self.placement.place_entry({c: x.plan for c, x in e.extents.items()}, start_token=e.start_token,
                                            num_tokens=e.num_tokens, end_token=e.end_token, kind=e.kind,
                                            computed_under=e.computed_under)
        trims = []
        for cls, p in placed.items():
            x = e.extents[cls]
            x.is_hot, x.lower_codec = p.is_hot, p.ssd_codec
            if p.keep is not None and not x.plan.is_trimmed:
                trims.append((e, x, p.keep))
        return trims

    async def _trim(self, trims: list[tuple[Entry, Extent, tuple[int, int]]]) -> None:
        """Copy each extent's kept tokens into a smaller slot run of the arena and free the old run.
        Only arena copies are trimmed (a reservation in the GPU pool stays whole: its readers are exact
        engines); one that finds no room stays whole. The entries are pending: nothing else sees them.
        Slots are taken and freed on the loop (the allocator is not thread-safe), bytes copied off it."""
        arena = self.index.landing
        jobs = []
        for e, x, (lo, hi) in trims:
            old = x.copies.get(arena.name)
            plan = x.plan.trim(lo, hi)
            new = arena.tier.reserve(plan.nbytes, e.name(x.head_class)) if old is not None else None
            if new is not None:
                jobs.append((x, plan, old, new))

        def copy() -> None:
            for x, plan, old, new in jobs:
                p = x.plan
                src = np.frombuffer(arena.tier.read(old.loc), np.uint8, count=p.nbytes)
                kept = src.reshape(p.num_segments, 2, p.num_tokens, -1)[:, :, plan.first_token:plan.span[1]]
                arena.tier.write(new, np.ascontiguousarray(kept).reshape(-1))

        await self.pipeline.on_cpu(copy)
        for x, plan, old, new in jobs:
            self.metrics.trimmed_bytes.inc(x.nbytes - plan.nbytes)
            self.pipeline.discard(arena, [old.loc])
            x.set_plan(plan)
            x.copies[arena.name] = Copy(new, "raw", None)  # its checksum: commit's, of these bytes

    def abort(self, req: P.AbortRequest, owner_pid: int | None = None) -> P.CountResponse:
        check_owner(self.holds.reservations.get(req.reservation_id), owner_pid)
        res = self.holds.pop_reservation(req.reservation_id)
        self.drop_reservation(res)
        return P.CountResponse(count=len(res.entries))

    def drop_reservation(self, res: Reservation) -> None:
        for e in res.entries.values():
            self._free_pending(e)
        self.metrics.reservations_open.set(len(self.holds.reservations))

    def _free_pending(self, e: Entry) -> None:
        if self.index.pending.get(e.key) is not None and self.index.get(e.key) is not e:
            del self.index.pending[e.key]
        for lv in self.index.memory:
            self.pipeline.discard(lv, [c.loc for x in e.extents.values() if (c := x.copies.pop(lv.name, None))])



def check_owner(hold, owner_pid: int | None) -> None:
    """A reservation or lease is its maker's: another process may not end it (``Forbidden``)."""
    if hold is not None and hold.owner_pid is not None and owner_pid is not None and hold.owner_pid != owner_pid:
        raise Forbidden(f"this hold belongs to process {hold.owner_pid}; only it may end it")


def count_moved(metrics: Metrics, direction: str, by_tier: dict[str, int], transfer_s: float) -> None:
    """Bytes a client moved to or from each memory tier, and its reported seconds split among them by
    bytes (one copy time is reported per reservation or lease, whatever tiers it spans)."""
    total = sum(by_tier.values())
    for tier, n in by_tier.items():
        metrics.moved_bytes.labels(direction, tier).inc(n)
        metrics.moved_seconds.labels(direction, tier).inc(transfer_s * n / total if total else 0.0)


def _given_checksums(req: P.CommitRequest, res: Reservation) -> dict[str, list[int]]:
    """The writer's checksums of whole entries (every extent given), by hash; a 400 naming the entry
    for one not in the reservation or a list whose length is not its extents'. Lists with a null
    (a GPU extent) are left to the daemon."""
    out: dict[str, list[int]] = {}
    for h, sums in (req.checksums or {}).items():
        e = res.entries.get(h)
        if e is None:
            raise InvalidRequest(f"checksums for entry {h}, which is not part of reservation {res.reservation_id}")
        if len(sums) != len(e.extents):
            raise InvalidRequest(f"checksums of entry {h}: {len(sums)} given for its {len(e.extents)} extents")
        if None not in sums:
            out[h] = [int(c, 16) for c in sums]
    return out
