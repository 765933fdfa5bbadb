"""The host tier: shared-memory arenas (``kvd.tiers.arena``), one per partition.

A partition is a tenant (``[tenants.<name>]``; ``kvd.daemon.tenants``): each gets its own arena
file, owned by its group, so a client maps only its own tenant's memory, and its own capacity (its
quota). Without tenants there is one partition, ``""``, and one arena. Which partition an extent
belongs to follows from its namespace (``partition_of``). ``Location.key`` names the partition and
``Location.offset`` is a byte offset into that partition's arena.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from kvd.tiers.arena import Arena
from kvd.tiers.base import Buffer, ExtentName, Location, Tier, TierStats


@dataclass(slots=True, frozen=True)
class ArenaSpec:
    path: Path
    capacity_bytes: int
    gid: int | None = None  # group that owns the file (a tenant's); None: the daemon's


class HostTier(Tier):
    name = "host"

    def __init__(self, path: Path, capacity_bytes: int, slot_bytes: int, *, file_mode: int = 0o660,
                 partitions: dict[str, ArenaSpec] | None = None,
                 partition_of: Callable[[str], str] = lambda namespace: "", socket_path: str = "") -> None:
        """One arena at ``path`` of ``capacity_bytes``, or, with ``partitions``, one arena per partition."""
        specs = partitions if partitions is not None else {"": ArenaSpec(Path(path), capacity_bytes)}
        self.arenas: dict[str, Arena] = {}
        try:
            for p, spec in specs.items():
                # A tenant's arena is its group's alone (0660), whatever the socket's mode.
                mode = file_mode if spec.gid is None else 0o660
                self.arenas[p] = Arena(spec.path, spec.capacity_bytes, slot_bytes, file_mode=mode,
                                       gid=spec.gid, socket_path=socket_path)
        except BaseException:
            self.close()
            raise
        self.partition_of = partition_of
        self.slot_bytes = slot_bytes
        self.capacity_bytes = sum(a.capacity_bytes for a in self.arenas.values())

    # ---- partitions ----------------------------------------------------------------------------

    def arena(self, partition: str = "") -> Arena:
        a = self.arenas.get(partition)
        if a is None:
            raise KeyError(f"no arena for partition {partition!r}")
        return a

    def arena_of(self, name: ExtentName | None) -> Arena:
        return self.arena(self.partition_of(name.namespace) if name is not None else "")

    # The single arena's attributes, for callers without partitions (one trust domain).
    @property
    def path(self) -> Path:
        return self.arena().path

    @property
    def arena_id(self) -> str:
        return self.arena().arena_id

    @property
    def view(self) -> memoryview:
        return self.arena().view

    # ---- Tier ----------------------------------------------------------------------------------

    def fits(self, nbytes: int, name: ExtentName | None = None) -> bool:
        a = self.arena_of(name)
        return a.slots_for(nbytes) <= a.num_slots

    def footprint(self, nbytes: int, name: ExtentName | None = None) -> int:
        a = self.arena_of(name)
        return a.slots_for(nbytes) * a.slot_bytes

    def reserve(self, nbytes: int, name: ExtentName | None = None) -> Location | None:
        p = self.partition_of(name.namespace) if name is not None else ""
        a = self.arena(p)
        count = a.slots_for(nbytes)
        start = a.allocator.allocate(count)
        if start is None:
            return None
        return Location(self.name, start * a.slot_bytes, count * a.slot_bytes, p.encode())

    def write(self, loc: Location, data: Buffer) -> None:
        n = memoryview(data).nbytes
        assert n <= loc.nbytes, f"write of {n} bytes into a {loc.nbytes}-byte location"
        self.arena(loc.key.decode()).view[loc.offset : loc.offset + n] = memoryview(data).cast("B")

    def read(self, loc: Location) -> memoryview:
        return self.arena(loc.key.decode()).view[loc.offset : loc.offset + loc.nbytes]

    def drop(self, loc: Location) -> None:
        a = self.arena(loc.key.decode())
        a.allocator.free(loc.offset // a.slot_bytes, loc.nbytes // a.slot_bytes)

    def stats(self) -> TierStats:
        used = sum(a.allocator.used_slots * a.slot_bytes for a in self.arenas.values())
        slots = sum(a.allocator.used_slots for a in self.arenas.values())
        return TierStats(self.name, self.capacity_bytes, used, slots)

    def partition_stats(self, partition: str) -> TierStats:
        a = self.arena(partition)
        return TierStats(self.name, a.capacity_bytes, a.allocator.used_slots * a.slot_bytes, a.allocator.used_slots)

    def close(self) -> None:
        for a in self.arenas.values():
            a.close()
