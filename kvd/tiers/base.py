"""The tier interface: what every place that holds KV bytes offers the store.

A tier holds bytes and nothing else. It never decides what to keep (policies do), never knows about
models or requests (the store does), and never imports the daemon, API or connectors.

Lifecycle of a location: ``reserve`` finds room and returns a ``Location`` (or ``None`` when there is
no room right now, changing nothing); bytes are then written, by the tier's ``write`` or, for the
host arena, by a client straight into shared memory; ``read`` returns them; ``drop`` gives the room
back. A location is owned by exactly one entry of the store's index at a time.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass

Buffer = bytes | bytearray | memoryview


@dataclass(slots=True, frozen=True)
class Location:
    """Where one extent's bytes live inside a tier.

    ``offset`` and ``nbytes`` are the byte range the tier reserved (host arena: a run of whole slots,
    so ``nbytes`` is a multiple of the slot size); ``key`` names the record in keyed tiers (SSD,
    remote) and is empty for the arena.
    """

    tier: str
    offset: int = 0
    nbytes: int = 0
    key: bytes = b""


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
    """One place that holds bytes. Five methods; ``close`` and ``write_many`` are optional hooks."""

    name: str

    @abstractmethod
    def reserve(self, nbytes: int, key: bytes = b"") -> Location | None:
        """Find room for ``nbytes``. Returns ``None`` (and changes nothing) when there is none."""

    @abstractmethod
    def write(self, loc: Location, data: Buffer) -> None:
        """Store ``data`` (at most ``loc.nbytes``) at ``loc``. Blocking: call off the event loop for I/O tiers."""

    @abstractmethod
    def read(self, loc: Location) -> Buffer:
        """The bytes stored at ``loc``. Raises ``CorruptData`` if they fail verification."""

    @abstractmethod
    def drop(self, loc: Location) -> None:
        """Give the room back. Dropping a location twice is a bug (AssertionError)."""

    @abstractmethod
    def stats(self) -> TierStats:
        """Capacity and usage, for metrics and ``kvctl stats``."""

    def write_many(self, items: Iterable[tuple[Location, Buffer]]) -> None:
        """Store several extents; tiers with transactions (LMDB) override this to batch them."""
        for loc, data in items:
            self.write(loc, data)

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release OS resources (mappings, files, connections)."""
