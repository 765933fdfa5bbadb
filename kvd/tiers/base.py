"""The tier interface: what every place that holds KV bytes offers the store.

A tier holds bytes and nothing else. It never decides what to keep (policies do), never knows about
requests or models beyond an extent's name (the store does), and never imports the daemon, the API,
policies or connectors.

Two kinds of tier, told apart by ``holds_records``:

- **memory tiers** (the host arena; a GPU pool later) hold an extent's raw bytes where engines map and
  copy them directly; ``write``/``read`` move raw bytes;
- **record tiers** (SSD; a remote store later) hold *records*: a checked header plus a codec payload
  (``kvd.tiers.record``); ``write`` takes a record, ``read`` returns it with its header checked (its
  payload is verified as it is decoded or passed on). They own their key format: they are handed an
  ``ExtentName`` and build keys from it.

Lifecycle of a location: ``reserve`` finds room and returns a ``Location`` (or ``None`` when there is
no room right now, changing nothing); bytes are then written (by ``write``, or, for the host arena, by
a client straight into shared memory); ``read`` returns them; ``drop`` gives the room back. A location
is owned by exactly one extent copy of the store's index at a time.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass
from typing import ClassVar

Buffer = bytes | bytearray | memoryview


@dataclass(slots=True, frozen=True)
class Location:
    """Where one extent's bytes live inside a tier.

    ``offset`` and ``nbytes`` are the byte range the tier reserved (host arena: a run of whole slots,
    so ``nbytes`` is a multiple of the slot size; record tiers: offset 0 and the record's size);
    ``key`` names the record in record tiers and is empty for memory tiers.
    """

    tier: str
    offset: int = 0
    nbytes: int = 0
    key: bytes = b""


@dataclass(slots=True, frozen=True)
class ExtentName:
    """Everything that names one extent of one entry: record tiers build their keys from it, and a
    persistent tier's ``scan`` gives it back, so the store can rebuild its index from keys alone."""

    namespace: str
    fingerprint: str
    hash: str
    head_class: str
    kind: str
    start_token: int
    end_token: int
    num_tokens: int
    computed_under: str


@dataclass(slots=True, frozen=True)
class StoredRecord:
    """One record a persistent tier found at start: where it is, what it names, its header."""

    location: Location
    name: ExtentName
    codec: str
    raw_nbytes: int
    raw_xxh: int
    layout: str = ""  # the extent plan's layout tag the record was written with ("": not known)


@dataclass(slots=True, frozen=True)
class TierStats:
    name: str
    capacity_bytes: int
    used_bytes: int
    num_records: int

    @property
    def usage(self) -> float:
        return self.used_bytes / self.capacity_bytes if self.capacity_bytes else 0.0


class Tier(ABC):
    """One place that holds bytes. Five abstract methods; ``fits``/``footprint``, ``write_many``,
    ``scan``, ``put_meta``/``get_meta`` and ``close`` are optional hooks (refusing what can never fit,
    batched writes for transactional stores, the index rebuild at start, OS resources)."""

    name: str
    capacity_bytes: int
    holds_records: ClassVar[bool] = False  # True: encoded records (kvd.tiers.record); False: raw extents
    blocking: ClassVar[bool] = False  # True: methods block on I/O; the store calls them off the event loop
    shared: ClassVar[bool] = False  # True: other hosts write to it too (find() looks up what they stored)

    @abstractmethod
    def reserve(self, nbytes: int, name: ExtentName | None = None) -> Location | None:
        """Find room for ``nbytes`` (record tiers: the record's size, keyed by ``name``). Returns
        ``None``, changing nothing, when there is none."""

    @abstractmethod
    def write(self, loc: Location, data: Buffer) -> None:
        """Store ``data`` at ``loc``: raw bytes (memory tiers) or a record (record tiers)."""

    @abstractmethod
    def read(self, loc: Location) -> Buffer:
        """The bytes at ``loc``: a raw view (memory tiers) or the record with its header checked (record
        tiers: ``CorruptData`` if absent or damaged; the payload is verified by whoever uses it, see
        ``kvd.tiers.record``)."""

    def recycle(self, data: Buffer) -> None:
        """``data``, which ``read`` returned, is no longer read by anyone: a tier that received it into a
        buffer of its own may receive the next read into that buffer. Default: nothing to do."""
        return

    @abstractmethod
    def drop(self, loc: Location) -> None:
        """Give the room back. Dropping a location twice is a bug (AssertionError)."""

    @abstractmethod
    def stats(self) -> TierStats:
        """Capacity and usage, for the policies, metrics and ``kvctl stats``."""

    def fits(self, nbytes: int, name: ExtentName | None = None) -> bool:
        """Whether ``nbytes`` (of the extent ``name``) could ever be held, with the tier (or the
        extent's partition of it) empty: a request that can never fit is refused at once instead of
        evicting everything first."""
        return nbytes <= self.capacity_bytes

    def footprint(self, nbytes: int, name: ExtentName | None = None) -> int:
        """Bytes a reservation of ``nbytes`` takes here (memory tiers: whole slots): what several
        extents need together is the sum of their footprints, not of their sizes."""
        return nbytes

    def write_many(self, items: Iterable[tuple[Location, Buffer]]) -> None:
        """Store several extents; tiers with transactions (LMDB) override this to batch them."""
        for loc, data in items:
            self.write(loc, data)

    def scan(self) -> list[StoredRecord]:
        """Every record a persistent tier holds (at start, to rebuild the index); volatile tiers: none."""
        return []

    def find(self, keys: list[tuple[str, str, str]]) -> list[StoredRecord]:
        """Shared tiers only: the records of the entries ``keys`` (namespace, fingerprint, hash) that
        other hosts stored, in one round trip. Why a hook beyond the five: a shared tier holds entries
        this host's index has never seen, so a lookup that misses locally must be able to ask it."""
        return []

    @property
    def is_available(self) -> bool:
        """Whether the tier can be used right now (a remote tier behind an open circuit breaker cannot)."""
        return True

    # Small daemon records kept beside the extents they describe (the registered models), so a
    # persistent tier's records can be matched to their model at start, before any engine registers.
    # Volatile tiers keep nothing; the hooks are here and not in a separate store because a record
    # is only useful together with the extents of the same tier.
    def put_meta(self, name: str, value: bytes) -> None:  # noqa: B027 - optional hook
        """Keep ``value`` durably under ``name`` (persistent tiers only)."""

    def get_meta(self, name: str) -> bytes | None:
        """The value ``put_meta`` kept under ``name``, if any."""
        return None

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release OS resources (mappings, files, locks, connections)."""
