"""Pages between SGLang's host pool and kvd's arena, on kvd's one transfer transaction.

Each SGLang page is one kvd prefix entry of ``page_size`` tokens (key: ``kvd.connectors.sglang.keys``),
its segments packed per head class into extents as every kvd entry is. The three operations SGLang's
HiCache controller needs, each one batch and at most three control calls:

    exists(keys)        one lookup            leading pages stored completely (what SGLang can load)
    load(keys, pages)   lease, copy, release  arena -> pool pages; True for the leading pages loaded
    store(keys, pages)  reserve, copy, commit pool pages -> arena; True per page stored (or already);
                        each page hashed right after its copy (``Reservation.written``)

A page is reported loaded only when its extents passed their checksums (``open_lease`` verifies) and
the daemon confirmed, by answering the release, that the lease held for the whole copy: a daemon that
dies, hangs or restarts mid-call may have let the slots go, so such a batch is all misses, never a
page of partly stale bytes marked present. The first page that is missing, corrupt or short ends the
loaded run (SGLang takes the leading ``True`` pages only). Daemon faults never raise: the session's
circuit breaker turns them into misses and retries later (``kvd.client.session``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from kvd.client.handle import ModelHandle
from kvd.client.session import DaemonSession
from kvd.client.transfer import open_lease, reserve
from kvd.connectors.sglang.keys import page_entry_hashes
from kvd.core import protocol as P

logger = logging.getLogger(__name__)


@dataclass
class TransferLog:
    """Per-call sizes and speeds since the last ``take``: SGLang's storage metrics (``get_stats``)."""

    prefetch_pgs: list[int] = field(default_factory=list)
    backup_pgs: list[int] = field(default_factory=list)
    prefetch_bandwidth: list[float] = field(default_factory=list)  # GB/s
    backup_bandwidth: list[float] = field(default_factory=list)

    def take(self) -> TransferLog:
        out = TransferLog(self.prefetch_pgs, self.backup_pgs, self.prefetch_bandwidth, self.backup_bandwidth)
        self.prefetch_pgs, self.backup_pgs, self.prefetch_bandwidth, self.backup_bandwidth = [], [], [], []
        return out


class PageIO:
    """Batches of pages of ``page_size`` tokens through one ``DaemonSession``. Thread-safe as SGLang
    uses it (prefetch, I/O and backup threads call concurrently): every call builds its own lease or
    reservation, and the client serialises control calls on its connection."""

    def __init__(self, session: DaemonSession, *, page_size: int, load_wait_s: float, verify: bool,
                 copy_threads: int = 2, log_transfers: bool = True) -> None:
        self.session = session
        self.page_size = page_size
        self.load_wait_s = load_wait_s
        self.verify = verify
        self.log = TransferLog()
        # Only when someone takes it (SGLang calls get_stats with --enable-storage-metrics only): else
        # it would grow by every call for the life of the server.
        self.log_transfers = log_transfers
        # A batch's page copies run on a few threads (numpy releases the GIL while copying): 64 pages of
        # SmolLM2 (92 MB) took 14 ms on one thread, 10.5 ms on two, on the 2-core test machine.
        self._pool = ThreadPoolExecutor(copy_threads, thread_name_prefix="kvd-sglang-copy") if copy_threads > 1 else None

    def _each(self, fn: Callable[[int], None], n: int) -> None:
        """``fn(i)`` for ``i < n``, on the copy threads; the first exception is raised after all ran."""
        if self._pool is None or n < 2:
            for i in range(n):
                fn(i)
        else:
            futures = [self._pool.submit(fn, i) for i in range(n)]
            errors = [e for f in futures if (e := f.exception()) is not None]  # waits for every copy
            if errors:
                raise errors[0]

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        self.session.close()

    @property
    def counters(self):
        return self.session.counters

    def hashes(self, h: ModelHandle, keys: Sequence[str]) -> list[str]:
        return page_entry_hashes(keys, namespace=h.namespace, fingerprint=h.fingerprint)

    def _page_bytes(self, h: ModelHandle) -> int:
        return sum(p.nbytes for p in h.plans(self.page_size).values())

    # ---- exists ------------------------------------------------------------------------------------

    def exists(self, keys: Sequence[str]) -> int:
        """Leading ``keys`` whose pages the daemon holds completely (0 when it cannot be asked)."""
        if not keys:
            return 0
        n = len(keys)

        def ask(h: ModelHandle) -> int:  # the compact body on the framed connection: every batch asks
            resp = h.client.lookup_compact(P.LookupRequest(
                fingerprint=h.fingerprint, namespace=h.namespace, prefix_hashes=self.hashes(h, keys),
                prefetch=True, max_tokens=n * self.page_size, computed_under=h.computed_under))
            return min(resp.num_prefix_hits, n)

        hits = self.session.call("lookup", ask) or 0
        self.counters["lookup_pages"] += n
        self.counters["lookup_hit_pages"] += hits
        return hits

    # ---- load --------------------------------------------------------------------------------------

    def load(self, keys: Sequence[str], pages: Sequence[torch.Tensor]) -> list[bool]:
        """Copy the stored pages of ``keys`` into ``pages`` (views ``[L, 2, H, P, D]`` of the pool).
        Returns one flag per key: True for the leading pages loaded, False from the first miss on."""
        n = len(keys)
        out = [False] * n
        if n == 0:
            return out
        p = self.page_size
        t0 = time.perf_counter()
        # Each page is hashed on the copy thread right before it is copied ("per_entry"): the hashing
        # (the GIL released) overlaps the other thread's copy, and the copy then reads cached bytes. 64
        # SmolLM2 pages: 3.3 ms of hashing at lease open, then 9.5 ms of copies, before.
        lease = self.session.call("lease", lambda h: open_lease(
            h, self.hashes(h, keys), min_tokens=[p] * n, wait_s=self.load_wait_s,
            verify="per_entry" if self.verify else False))
        if lease is None:
            self.counters["load_failed_pages"] += n
            return out
        k = lease.num_leading
        t_copy = time.perf_counter()

        def one(i: int) -> None:
            if lease.verified(i):
                lease.entry(i).read_into(pages[i], 0, p)

        try:
            self._each(one, k)
            k = next((i for i in range(k) if lease.entry(i) is None), k)  # a page that failed ends the run
            self.counters["checksum_failures"] += lease.num_corrupt
        except Exception:  # a boundary: a cache fault is a miss, never a failed request
            logger.exception("kvd: copying %d pages into SGLang's host pool failed", k)
            self.session.call("release", lambda h: lease.release())
            self.counters["load_failed_pages"] += n
            return out
        if self.session.call("release", lambda h: lease.release(time.perf_counter() - t_copy)) is None:
            # The daemon did not confirm the lease held to the end of the copy: nothing is trusted.
            self.counters["load_unconfirmed_pages"] += k
            self.counters["load_failed_pages"] += n
            return out
        out[:k] = [True] * k
        self.counters["loaded_pages"] += k
        self.counters["load_missed_pages"] += n - k
        if k and self.log_transfers:
            self.log.prefetch_pgs.append(k)
            self.log.prefetch_bandwidth.append(k * self._page_bytes(lease.handle) / 1e9
                                               / max(time.perf_counter() - t0, 1e-9))
        return out

    # ---- store -------------------------------------------------------------------------------------

    def store(self, keys: Sequence[str], pages: Sequence[torch.Tensor], *, first_page: int | None = None
              ) -> list[bool]:
        """Store ``pages`` (views ``[L, 2, H, P, D]``) under ``keys``. True per page stored now or already.

        ``first_page``: the position of the first page in its sequence (from SGLang's prefix keys),
        which head-aware placement uses; None (unknown) places every page as the sequence's start,
        i.e. hot and never lossy (``kvd.policies.placement``)."""
        n = len(keys)
        out = [False] * n
        if n == 0:
            return out
        p = self.page_size
        t0 = time.perf_counter()

        def entries(h: ModelHandle) -> list[P.ReserveEntry]:
            if first_page is None:
                return [P.ReserveEntry(hash=x, num_tokens=p) for x in self.hashes(h, keys)]
            end = (first_page + n) * p
            return [P.ReserveEntry(hash=x, num_tokens=p, start_token=(first_page + i) * p, end_token=end)
                    for i, x in enumerate(self.hashes(h, keys))]

        res = self.session.call("reserve", lambda h: reserve(h, entries(h)))
        if res is None:
            self.counters["store_failed_pages"] += n
            return out
        self.counters["store_exists_pages"] += res.num_exists
        self.counters["store_no_space_pages"] += res.num_no_space
        views = [res.entry(i) for i in range(n)]

        def one(i: int) -> None:  # on a copy thread: the page, then its checksums while it is cached
            if views[i] is not None:
                views[i].write_from(pages[i], 0)
                res.written(i)

        try:
            self._each(one, n)
        except Exception:  # a boundary: a failed store is a future miss
            logger.exception("kvd: copying %d pages out of SGLang's host pool failed", n)
            self.session.call("abort", lambda h: res.abort())
            self.counters["store_failed_pages"] += res.num_reserved
            return [s == "exists" for s in res.states]
        committed = set(self.session.call("commit", lambda h: res.commit(time.perf_counter() - t0)) or [])
        out = [s == "exists" or x in committed for s, x in zip(res.states, res.hashes)]
        self.counters["stored_pages"] += len(committed)
        self.counters["store_failed_pages"] += res.num_reserved - len(committed)
        if committed and self.log_transfers:
            self.log.backup_pgs.append(len(committed))
            self.log.backup_bandwidth.append(len(committed) * self._page_bytes(res.handle) / 1e9
                                             / max(time.perf_counter() - t0, 1e-9))
        return out
