"""Who holds what, and until when: reservations (pending writes) and leases (reads) of store entries.

Both are two-phase holds taken by a client process and ended by it (``commit``/``abort``,
``release``) or taken back when they expire: past their TTL, or as soon as the owning process (the
Unix-socket peer) no longer exists. This table only keeps the books and says which holds are over;
the store frees the bytes.

A reservation id is remembered for a while after its commit, so that a second commit of the same id
is told "already committed" (409) rather than "does not exist" (404).
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Callable

from kvd.core.errors import Conflict, NotFound
from kvd.store.entries import Lease, Reservation

COMMITTED_MEMORY = 4096  # reservation ids remembered after commit


def owner_is_alive(pid: int) -> bool:
    """Whether the process holding a lease still exists (a zombie counts as dead)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (OSError, IndexError):
        return True


class HoldTable:
    def __init__(self, *, reservation_ttl_s: Callable[[], float], lease_ttl_s: Callable[[], float]) -> None:
        self._reservation_ttl_s = reservation_ttl_s  # callables: the TTLs are reloadable settings
        self._lease_ttl_s = lease_ttl_s
        self.reservations: dict[str, Reservation] = {}
        self.leases: dict[str, Lease] = {}
        self.committing: set[str] = set()
        self._committed: OrderedDict[str, None] = OrderedDict()

    # ---- reservations ---------------------------------------------------------------------------

    def add_reservation(self, res: Reservation) -> None:
        self.reservations[res.reservation_id] = res

    def begin_commit(self, rid: str) -> Reservation:
        """The reservation, now protected from expiry. ``Conflict`` if committed (or committing) already."""
        res = self.reservations.get(rid)
        if res is None or rid in self.committing:
            if rid in self._committed or rid in self.committing:
                raise Conflict(f"reservation {rid} was already committed")
            raise NotFound(f"reservation {rid} does not exist or expired "
                           f"(reservations live {self._reservation_ttl_s()} s); reserve again")
        self.committing.add(rid)
        return res

    def end_commit(self, rid: str, *, done: bool) -> None:
        self.committing.discard(rid)
        if done:
            del self.reservations[rid]
            self._committed[rid] = None
            while len(self._committed) > COMMITTED_MEMORY:
                self._committed.popitem(last=False)

    def pop_reservation(self, rid: str) -> Reservation:
        """End a reservation without committing it (abort). ``NotFound`` if absent or committing."""
        res = self.reservations.get(rid)
        if res is None or rid in self.committing:
            raise NotFound(f"reservation {rid} does not exist, expired or is being committed")
        return self.reservations.pop(rid)

    # ---- leases ---------------------------------------------------------------------------------

    def add_lease(self, lease: Lease) -> None:
        self.leases[lease.lease_id] = lease

    def pop_lease(self, lease_id: str) -> Lease:
        lease = self.leases.pop(lease_id, None)
        if lease is None:
            raise NotFound(f"lease {lease_id} is not held: never taken, already released, or expired "
                           f"(leases live {self._lease_ttl_s()} s)")
        return lease

    def get(self, hold_id: str) -> Lease | Reservation | None:
        return self.leases.get(hold_id) or self.reservations.get(hold_id)

    def renew(self, hold_id: str, now: float) -> None:
        """Another TTL from ``now`` for a live lease or reservation (a client's step outlasting the TTL);
        ``NotFound`` if the hold is over: ended, expired, or its owner gone."""
        hold = self.get(hold_id)
        if hold is None:
            raise NotFound(f"hold {hold_id} is not held: never taken, ended, or expired (leases live "
                           f"{self._lease_ttl_s()} s, reservations {self._reservation_ttl_s()} s)")
        # Never less than the TTL the client was told at open: it renews a third of that after the last
        # renewal, unaware of a reload that lowered the setting since (renew answers no TTL).
        ttl = self._lease_ttl_s() if isinstance(hold, Lease) else self._reservation_ttl_s()
        hold.expires_at = now + max(ttl, hold.ttl_s)

    # ---- expiry ---------------------------------------------------------------------------------

    def take_expired(self, now: float, is_alive: Callable[[int], bool]
                     ) -> tuple[list[Reservation], list[tuple[Lease, str]]]:
        """Remove and return the holds that are over: (reservations, [(lease, reason)])."""
        dead: dict[int, bool] = {}

        def gone(pid: int | None) -> bool:
            if pid is None:
                return False
            if pid not in dead:
                dead[pid] = not is_alive(pid)
            return dead[pid]

        reservations = [r for r in self.reservations.values()
                        if r.reservation_id not in self.committing and (r.expires_at <= now or gone(r.owner_pid))]
        for r in reservations:
            del self.reservations[r.reservation_id]
        leases = []
        for lease in list(self.leases.values()):
            reason = "ttl" if lease.expires_at <= now else ("owner_died" if gone(lease.owner_pid) else None)
            if reason:
                del self.leases[lease.lease_id]
                leases.append((lease, reason))
        return reservations, leases
