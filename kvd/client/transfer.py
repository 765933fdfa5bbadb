"""The one lease / reserve transaction between an engine process and the daemon's arena.

Every engine-side path that moves KV through the arena goes through the two objects here: prefix
entries (``kvd.client.prefix``), chunk entries (``kvd.reuse.chunks``) and the vLLM worker.

- **Read**: ``open_lease`` takes a read lease on entries (one RPC), checks every leased entry (status,
  head classes, token count, lossy flag, xxh3-64 checksum of each extent) and maps the usable ones as
  typed views; the caller copies out of ``Lease.entry(i)``; ``Lease.release()`` ends the lease and
  reports the copy time to the daemon (``transfer_s``).
- **Write**: ``reserve`` asks for arena space for new entries (one RPC) and maps the reserved ones; the
  caller copies into ``Reservation.entry(i)`` (then may call ``written(i)``: checksums taken while cached);
  ``commit()`` makes them visible to every client, ``abort()`` gives the space back.

Both are explicit objects with verb pairs because an engine may open one in one hook, copy layer by
layer in others and close it in a later hook (vLLM's worker), calling ``keep_alive()`` before each copy:
a hold lives ``expires_in_s`` (the daemon's TTL) unless renewed, and a forward on a slow CPU can take
longer. ``with`` is sugar (a lease is released on exit; a reservation commits on a clean exit, aborts
on an exception). Lifecycle: open → views valid → closed (by the caller, or by ``keep_alive`` finding
the hold lapsed); closing twice is a no-op; views must not be used after a close (the daemon may hand
the slots to another entry).

GPU tier (``kvd.tiers.gpu``): a handle with ``gpu`` pools asks for GPU extents; an extent answered with
``tier = "gpu"`` is a view of the daemon's GPU pool (``kvd.client.gpu_pool``), so copies are device to
device. Before a commit, an abort or a release that spans GPU extents the process's device work is waited
for: the daemon reads what was written, and may reuse the slots, as soon as it is told.

Verification (the only place it is done): an entry is usable only if the daemon answered ``ok``, its
extents cover the head classes asked for, it holds at least the tokens the reader needs, no extent is
``lossy`` unless the reader accepted lossy bytes, and every extent's xxh3-64 matches its checksum
(GPU extents only with ``verify_gpu``: hashing them means copying them to the host; by default their
checksum, taken at commit, is checked by the daemon whenever they leave the pool). The hashing is
done when the lease is opened, or with ``verify="per_entry"`` by ``Lease.verified(i)`` right before
entry i is copied (``entry(i)`` is None until then).
An unusable entry is never mapped, so it cannot be copied; checksum failures are counted
(``num_corrupt``). For prefix readers (``leading=True``) the first unusable entry ends the usable run:
the entries after it are neither checked nor used, as after a miss.

Failures: the daemon's errors (``kvd.core.errors``) propagate from the opening call, ``keep_alive``,
``release``, ``commit`` and ``abort``; a hold whose arena cannot be mapped is given back first.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Literal

import xxhash

from kvd.client.handle import ModelHandle
from kvd.client.renewal import Renewal
from kvd.client.views import EntryView, answer_plan, entry_views
from kvd.core import protocol as P
from kvd.core.errors import DaemonUnavailable, HeadMapError, ProtocolMismatch
from kvd.core.extents import covers, matches, needed

logger = logging.getLogger(__name__)

MAX_TRANSFER_S = 3600.0  # the protocol's bound on a reported copy time

# ok: usable. missing / timeout / corrupt: as the daemon answered. The client's checks: bad_checksum (an
# extent's xxh3 differs), incomplete (a head class or its bytes are missing), lossy (lossy bytes for a
# reader that did not accept them), short (fewer tokens than needed), skipped (after the end of a prefix
# reader's usable run: not checked).
EntryState = Literal["ok", "missing", "timeout", "corrupt", "bad_checksum", "incomplete", "lossy", "short",
                     "skipped"]


def _wait_for_gpu(h: ModelHandle, gpu_pool: P.GpuPoolInfo | None) -> None:
    """Copies into or out of the GPU pool are done (before the daemon is told it may use the slots)."""
    if h.gpu is not None and gpu_pool is not None:
        h.gpu.synchronize(gpu_pool)


def _elapsed(t0: float, transfer_s: float | None) -> float:
    return min(max(time.perf_counter() - t0 if transfer_s is None else transfer_s, 0.0), MAX_TRANSFER_S)


# ---- read: leases ----------------------------------------------------------------------------------


class Lease:
    """A read lease on entries, checked and mapped; built by ``open_lease``."""

    def __init__(self, handle: ModelHandle, resp: P.LeaseResponse, *, min_tokens: Sequence[int] | None,
                 classes: Sequence[str] | None, accept_lossy: bool, verify: bool | Literal["per_entry"],
                 leading: bool, position: int | None = None, verify_gpu: bool = False) -> None:
        self.handle = handle
        self._lock = threading.Lock()
        self._unverified: set[int] = set()  # verify="per_entry": entries ``verified(i)`` has not hashed yet
        self.lease_id = resp.lease_id
        self.arena_id = resp.arena_id
        self.gpu_pool = resp.gpu_pool
        self._verify_gpu = verify_gpu
        self.hashes = [e.hash for e in resp.entries]
        self.states: list[EntryState] = []
        self.num_corrupt = 0  # entries refused for an extent whose checksum does not match
        self._entries: list[EntryView | None] = []
        self._answers = resp.entries
        self._min_tokens = min_tokens
        self._classes = classes
        self._position = position
        self._t0 = time.perf_counter()
        self._renewal = Renewal(resp.expires_in_s)
        try:
            for i, e in enumerate(resp.entries):
                if leading and self._entries and self._entries[-1] is None:
                    state: EntryState = "skipped"
                else:
                    want = self._wanted(e, position)
                    state = self._check(e, min_tokens[i] if min_tokens else 0, want, accept_lossy, verify is True)
                    if state == "ok" and verify == "per_entry":
                        self._unverified.add(i)
                self.states.append(state)
                self._entries.append(entry_views(handle, self.arena_id, e.hash, e.extents, e.num_tokens, self.gpu_pool)
                                     if state == "ok" else None)
        except BaseException:
            self.release()
            raise

    def _wanted(self, e: P.LeasedEntry, position: int | None) -> set[str]:
        """The classes this reader must get of ``e``: the filter, and for a head-aware reader of a
        prefix at ``position`` the ones its head map reads (the daemon's rule, checked here)."""
        plans = self.handle.plans(max(e.num_tokens, 1))
        want = {c for c in plans if not self._classes or any(matches(c, w) for w in self._classes)}
        if self.handle.reader == "head_aware" and position is not None:
            want = {c for c in want if needed(plans[c], e.start_token, e.num_tokens, position)}
        return want

    def _check(self, e: P.LeasedEntry, min_tokens: int, want: set[str], accept_lossy: bool,
               verify: bool) -> EntryState:
        if e.status != "ok":
            return e.status
        if e.num_tokens <= 0 or {x.head_class for x in e.extents} != want or len(e.extents) != len(want):
            return "incomplete"
        if not self._holds(e, self._position, exact_size=True):
            return "incomplete"
        if e.num_tokens < min_tokens:
            return "short"
        if not accept_lossy and any(x.lossy for x in e.extents):
            return "lossy"
        if verify and not self._hashes_match(e):
            return "bad_checksum"
        return "ok"

    def _holds(self, e: P.LeasedEntry, position: int | None, exact_size: bool = False) -> bool:
        """Each extent answered has its layout's size (``exact_size``), and a trimmed one (capacity
        mode) holds all this reader reads: only a head-aware reader of a prefix at ``position`` reads
        one (``kvd.core.extents.covers``)."""
        plans = self.handle.plans(e.num_tokens)
        for x in e.extents:
            try:
                plan = answer_plan(plans, x)
            except (ValueError, HeadMapError):
                return False
            if exact_size and x.nbytes != plan.nbytes:
                return False
            if plan.is_trimmed and (self.handle.reader != "head_aware" or position is None
                                    or not covers(plan, e.start_token, e.num_tokens, position)):
                return False
        return True

    def _hashes_match(self, e: P.LeasedEntry) -> bool:
        for x in e.extents:
            if x.checksum is None or (x.tier == "gpu" and not self._verify_gpu):
                continue
            if xxhash.xxh3_64_hexdigest(self._bytes(x)) != x.checksum:
                with self._lock:
                    self.num_corrupt += 1
                logger.warning("kvd entry %s: extent %s fails its checksum; not used", e.hash, x.head_class)
                return False
        return True

    def verified(self, i: int) -> bool:
        """Entry i is usable and its bytes match their checksums. A lease opened with
        ``verify="per_entry"`` hashes entry i here, the first time (thread-safe), so a reader that copies
        entries on several threads verifies each right before copying it: the hashing (python-xxhash
        releases the GIL) overlaps the other threads' copies, and the copy reads bytes the hash just brought into
        the CPU's cache. An entry that fails is not usable afterwards (``entry(i)`` is None)."""
        if self._entries[i] is None:
            return False
        if i not in self._unverified:
            return True
        # Taken off the unverified set only once hashed: a second caller for the same entry meanwhile
        # hashes it too, never gets it early.
        ok = self._hashes_match(self._answers[i])
        with self._lock:
            if not ok:
                self.states[i] = "bad_checksum"
                self._entries[i] = None
            self._unverified.discard(i)
        return ok

    def _bytes(self, x: P.ExtentInfo) -> memoryview:
        if x.tier == "gpu":
            if self.handle.gpu is None or self.gpu_pool is None:
                raise DaemonUnavailable("the daemon answered an extent in its GPU pool without the pool")
            return self.handle.gpu.bytes_at(self.gpu_pool, x)
        return self.handle.client.arena(self.arena_id).bytes_at(x.offset, x.nbytes)

    @property
    def num_leading(self) -> int:
        """Usable entries before the first unusable one: what a prefix reader can load. A head-aware
        reader that stops before the position it leased for sits earlier, where the local heads see
        further back: the run shortens until every entry in it holds what is read from there."""
        n = 0
        while n < len(self._entries) and self._entries[n] is not None:
            n += 1
        if self.handle.reader != "head_aware" or self._position is None or n == len(self._entries):
            return n
        while n > 0:
            last = self._answers[n - 1]
            pos = last.start_token + (self._min_tokens[n - 1] if self._min_tokens else last.num_tokens)
            if all(self._wanted(self._answers[j], pos) <= {x.head_class for x in self._answers[j].extents}
                   and self._holds(self._answers[j], pos) for j in range(n)):
                return n
            n -= 1
        return 0

    def entry(self, i: int) -> EntryView | None:
        """The i-th entry's views, or None if it is not usable (``states[i]`` says why) or, in a lease
        opened with ``verify="per_entry"``, not yet ``verified(i)``."""
        return None if i in self._unverified else self._entries[i]

    def usable(self) -> Iterator[EntryView]:
        """Every usable entry, in request order (chunk readers take them in any combination); with
        ``verify="per_entry"``, those ``verified`` so far."""
        return (v for i, v in enumerate(self._entries) if v is not None and i not in self._unverified)

    @property
    def closed(self) -> bool:
        return self.lease_id is None

    def keep_alive(self) -> None:
        """Before each copy of a long one (a forward, layer by layer): renew when due. ``NotFound`` (and
        closed) if the lease lapsed: its bytes may have been reused, so what was copied must not be used."""
        if (e := self._renewal.lapsed(self.handle, self.lease_id)) is not None:
            self.lease_id, self._entries = None, [None] * len(self._entries)
            raise e

    def release(self, transfer_s: float | None = None) -> float:
        """End the lease; its views must not be used after. ``transfer_s``: seconds spent copying
        (default: since the lease was opened), reported to the daemon. Returns what was reported.
        A no-op once released."""
        reported = _elapsed(self._t0, transfer_s)
        self._entries = [None] * len(self._entries)
        if self.lease_id is None:
            return 0.0
        _wait_for_gpu(self.handle, self.gpu_pool)
        lease_id, self.lease_id = self.lease_id, None
        self.handle.client.release(P.ReleaseRequest(lease_id=lease_id, transfer_s=reported))
        return reported

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def open_lease(handle: ModelHandle, hashes: Sequence[str], *, namespace: str | None = None,
               min_tokens: Sequence[int] | None = None, classes: Sequence[str] | None = None,
               wait_s: float | None = None, accept_lossy: bool = False, verify: bool | Literal["per_entry"] = True,
               leading: bool = True, computed_under: str | None = None, position: int | None = None,
               exact: bool = False, verify_gpu: bool = False) -> Lease:
    """Lease ``hashes`` (in ``namespace``, default the handle's) and check them.

    ``min_tokens[i]``: the tokens the reader needs from entry i (an entry may hold more, e.g. when its
    key is an alias of a longer entry; never fewer). ``classes``: only these head classes or kinds
    (None: all). ``leading``: a prefix reader, which can use only the leading run of usable entries.
    ``position``: a head-aware handle's next query position after the load (prefix entries get only
    the extents its head map reads from there; None: every token of the classes). ``exact``: read every
    extent whatever the handle's reader (the Lil guard's restore of full KV). ``verify``: hash every
    extent now (True), never (False: the caller trusts the bytes), or ``"per_entry"`` in
    ``Lease.verified(i)``, which the caller must pass before ``entry(i)`` is given. ``verify_gpu``: hash GPU
    extents too (a copy to the host each). Raises the daemon's errors; nothing is held when it does."""
    if exact and handle.reader != "exact":
        handle = dataclasses.replace(handle, reader="exact")
    if min_tokens is not None and len(min_tokens) != len(hashes):
        raise ValueError(f"min_tokens has {len(min_tokens)} values for {len(hashes)} hashes")
    resp = handle.client.lease(P.LeaseRequest(
        fingerprint=handle.fingerprint, namespace=namespace or handle.namespace, hashes=list(hashes),
        classes=list(classes) if classes else None, wait_s=wait_s, accept_lossy=accept_lossy,
        computed_under=computed_under or handle.computed_under, gpu=handle.gpu is not None,
        **handle.reader_fields(position)))
    if [e.hash for e in resp.entries] != list(hashes):
        if resp.lease_id is not None:
            handle.client.release(P.ReleaseRequest(lease_id=resp.lease_id))
        raise ProtocolMismatch("/v1/lease: the daemon answered a lease for other entries than asked")
    return Lease(handle, resp, min_tokens=min_tokens, classes=classes, accept_lossy=accept_lossy, verify=verify,
                 leading=leading, position=position, verify_gpu=verify_gpu)


# ---- write: reservations ---------------------------------------------------------------------------


class Reservation:
    """Arena space for new entries, mapped; built by ``reserve``."""

    def __init__(self, handle: ModelHandle, resp: P.ReserveResponse, entries: Sequence[P.ReserveEntry]) -> None:
        self.handle = handle
        self.reservation_id = resp.reservation_id
        self.arena_id = resp.arena_id
        self.gpu_pool = resp.gpu_pool
        self.hashes = [e.hash for e in entries]
        self.states = [e.status for e in resp.entries]
        self._entries: list[EntryView | None] = []
        self._answers = resp.entries
        self._sums: dict[str, list[str | None]] = {}  # written(i): entry hash -> its extents' xxh3
        self._t0 = time.perf_counter()
        self._renewal = Renewal(resp.expires_in_s)
        try:
            if [e.hash for e in resp.entries] != self.hashes:
                raise ProtocolMismatch("/v1/reserve: the daemon answered a reservation for other entries than asked")
            for want, got in zip(entries, resp.entries):
                self._entries.append(entry_views(handle, self.arena_id, want.hash, got.extents, want.num_tokens,
                                            self.gpu_pool) if got.status == "reserved" else None)
        except BaseException:
            self.abort()
            raise

    @property
    def num_reserved(self) -> int:
        return self.states.count("reserved")

    @property
    def num_exists(self) -> int:
        return self.states.count("exists")

    @property
    def num_no_space(self) -> int:
        return self.states.count("no_space")

    def entry(self, i: int) -> EntryView | None:
        """Views to write the i-th entry into, or None if it was not reserved (``states[i]``)."""
        return self._entries[i]

    def written(self, i: int) -> None:
        """Entry i is copied in whole: hash its arena extents while the bytes are in this CPU's cache; the
        commit carries the digests (GPU extents: null, the daemon's), so the daemon need not read every
        byte again. Optional; thread-safe per entry. A wrong digest makes readers refuse the entry."""
        if self._entries[i] is None:
            raise ValueError(f"entry {i} of the reservation is not reserved ({self.states[i]})")
        at = self.handle.client.arena(self.arena_id).bytes_at
        self._sums[self.hashes[i]] = [None if x.tier == "gpu" else xxhash.xxh3_64_hexdigest(at(x.offset, x.nbytes))
                                      for x in self._answers[i].extents]

    @property
    def closed(self) -> bool:
        return self.reservation_id is None

    def keep_alive(self) -> None:
        """``Lease.keep_alive`` for a writer: ``NotFound`` (and closed) if it lapsed (a commit would fail)."""
        if (e := self._renewal.lapsed(self.handle, self.reservation_id)) is not None:
            self.reservation_id, self._entries = None, [None] * len(self._entries)
            raise e

    def commit(self, transfer_s: float | None = None) -> list[str]:
        """Make every reserved entry visible (whole; checksummed by ``written`` or the daemon). ``transfer_s``:
        seconds spent copying (default: since the reservation was made). Returns the committed hashes; []
        when nothing was reserved or it was closed already."""
        reported = _elapsed(self._t0, transfer_s)
        self._entries = [None] * len(self._entries)
        if self.reservation_id is None:
            return []
        _wait_for_gpu(self.handle, self.gpu_pool)
        rid, self.reservation_id = self.reservation_id, None
        return self.handle.client.commit(P.CommitRequest(reservation_id=rid, transfer_s=reported,
                                                         checksums=self._sums or None)).committed

    def abort(self) -> None:
        """Give the space back (once copies into GPU slots are done); nothing becomes visible. No-op once closed."""
        self._entries = [None] * len(self._entries)
        if self.reservation_id is not None:
            _wait_for_gpu(self.handle, self.gpu_pool)
            rid, self.reservation_id = self.reservation_id, None
            self.handle.client.abort(P.AbortRequest(reservation_id=rid))

    def __enter__(self) -> Reservation:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()


def reserve(handle: ModelHandle, entries: Sequence[P.ReserveEntry], *, namespace: str | None = None,
            computed_under: str | None = None) -> Reservation:
    """Reserve arena space for ``entries`` (in ``namespace``, default the handle's). Per entry the daemon
    answers ``reserved`` (views in ``entry(i)``), ``exists`` or ``no_space``; raises its errors, holding nothing."""
    resp = handle.client.reserve(P.ReserveRequest(
        fingerprint=handle.fingerprint, namespace=namespace or handle.namespace,
        computed_under=computed_under or handle.computed_under, entries=list(entries), gpu=handle.gpu is not None))
    return Reservation(handle, resp, entries)

