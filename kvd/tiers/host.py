"""The host tier: a shared-memory arena cut into fixed-size slots.

The daemon creates the arena file (under /dev/shm unless configured), maps it, and hands clients its
path; clients map the same file and copy KV straight into and out of it, so bytes never cross the
control socket. The arena is registered with CUDA as pinned memory on the client side when a GPU is
present (``kvd.client.arena``), which is why extents start on slot boundaries (page aligned).

Allocation: the arena is ``capacity // slot_bytes`` slots. An extent occupies a *run* of consecutive
slots, so a client moves it with one copy. Free runs are kept coalesced (a freed run merges with free
neighbours), indexed by start, by end and by length; ``reserve`` takes the smallest free run that fits
(best fit), splitting it. Worked example with 8 slots: reserve 3 -> [0,3), reserve 2 -> [3,5), drop
[0,3) -> free {0:3, 5:3}; reserve 3 -> best fit picks [0,3) (either fits; the lower start wins ties).

The arena file is allocated in full at start (a shortage of room fails the start, never a later
write). The arena holds no metadata: the store's index says which runs hold which extents. On restart the
file is recreated empty, with a new ``arena_id`` so clients know to remap.
"""

from __future__ import annotations

import errno
import mmap
import os
import uuid
from collections.abc import Callable
from pathlib import Path

from kvd.core.errors import ConfigError
from kvd.tiers.base import Buffer, ExtentName, Location, Tier, TierStats


class SlotAllocator:
    """Best-fit allocator of runs of consecutive slots, with coalescing on free."""

    def __init__(self, num_slots: int) -> None:
        assert num_slots > 0, "an allocator needs at least one slot"
        self.num_slots = num_slots
        self._by_start: dict[int, int] = {0: num_slots}  # start -> length of a free run
        self._by_end: dict[int, int] = {num_slots: 0}  # end (exclusive) -> start
        self._by_len: dict[int, set[int]] = {num_slots: {0}}  # length -> starts
        self.used_slots = 0

    def _add(self, start: int, length: int) -> None:
        self._by_start[start] = length
        self._by_end[start + length] = start
        self._by_len.setdefault(length, set()).add(start)

    def _remove(self, start: int) -> int:
        length = self._by_start.pop(start)
        del self._by_end[start + length]
        starts = self._by_len[length]
        starts.discard(start)
        if not starts:
            del self._by_len[length]
        return length

    def allocate(self, count: int) -> int | None:
        """Start of a run of ``count`` free slots, or ``None`` if no free run is that long."""
        if count <= 0 or count > self.num_slots:
            return None
        if count in self._by_len:
            best = count
        else:
            fits = [length for length in self._by_len if length > count]
            if not fits:
                return None
            best = min(fits)
        start = min(self._by_len[best])
        self._remove(start)
        if best > count:
            self._add(start + count, best - count)
        self.used_slots += count
        return start

    def free(self, start: int, count: int) -> None:
        assert 0 <= start and start + count <= self.num_slots, f"run [{start}, {start + count}) out of range"
        assert start not in self._by_start, f"double free of slot run at {start}"
        self.used_slots -= count
        assert self.used_slots >= 0, "more slots freed than allocated"
        # Coalesce with the free run ending where this one starts and the one starting where it ends.
        if start in self._by_end:
            prev = self._by_end[start]
            count += self._remove(prev)
            start = prev
        if start + count in self._by_start:
            count += self._remove(start + count)
        self._add(start, count)

    def free_runs(self) -> list[tuple[int, int]]:
        """``(start, length)`` of every free run."""
        return list(self._by_start.items())

    def largest_free_run(self) -> int:
        return max(self._by_len, default=0)


class HostTier(Tier):
    """The shared-memory arena. ``Location.offset`` is a byte offset into the arena file."""

    name = "host"

    def __init__(self, path: Path, capacity_bytes: int, slot_bytes: int, *, file_mode: int = 0o660) -> None:
        if capacity_bytes < slot_bytes or slot_bytes <= 0 or slot_bytes % mmap.PAGESIZE:
            raise ConfigError(
                f"host arena: capacity_bytes={capacity_bytes}, slot_bytes={slot_bytes}; slot_bytes must be a "
                f"multiple of {mmap.PAGESIZE} and capacity at least one slot"
            )
        self.path = Path(path)
        self.requested_bytes = capacity_bytes  # as configured (the arena rounds it down to whole slots)
        self.slot_bytes = slot_bytes
        self.num_slots = capacity_bytes // slot_bytes
        self.capacity_bytes = self.num_slots * slot_bytes
        self.arena_id = uuid.uuid4().hex
        self.allocator = SlotAllocator(self.num_slots)
        self._mmap = self._create(file_mode)
        self.view = memoryview(self._mmap)

    def _create(self, file_mode: int) -> mmap.mmap:
        """A new arena file, all of its pages allocated now. On a tmpfs a sparse file is accepted at any
        size and the first engine that writes past the real free space dies of SIGBUS (Docker's
        /dev/shm is 64 MiB; the default arena 1 GiB), so the space is checked and then taken up front
        (``posix_fallocate``), and a shortage stops the daemon at start, naming the size, the free
        space and the setting. A new file every start: old mappings of a previous daemon keep the old
        inode, and the new ``arena_id`` tells their clients to remap."""
        parent = self.path.parent
        parent.mkdir(parents=True, exist_ok=True)
        if self.path.is_symlink() or (self.path.exists() and not self.path.is_file()):
            raise ConfigError(f"host.path {self.path} exists and is not a regular file; kvd will not replace it")
        free = _free_bytes(parent)
        if free is not None and free < self.capacity_bytes:
            raise ConfigError(self._too_big(free))
        # O_EXCL | O_NOFOLLOW: never open a file someone planted under our temporary name.
        tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, file_mode)
        try:
            os.fchmod(fd, file_mode)
            _allocate(fd, self.capacity_bytes, lambda: self._too_big(_free_bytes(parent)))
            mapping = mmap.mmap(fd, self.capacity_bytes, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            os.replace(tmp, self.path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        finally:
            os.close(fd)
        return mapping

    def _too_big(self, free: int | None) -> str:
        return (f"host arena {self.path}: host.capacity_bytes = {self.requested_bytes} bytes does not fit: "
                f"{'unknown' if free is None else free} bytes free on {self.path.parent}; lower "
                f"host.capacity_bytes (KVD_HOST__CAPACITY_BYTES) or give the filesystem more room "
                f"(Docker: --shm-size)")

    # ---- Tier ---------------------------------------------------------------------------------

    def slots_for(self, nbytes: int) -> int:
        return max(1, -(-nbytes // self.slot_bytes))

    def fits(self, nbytes: int) -> bool:
        return self.slots_for(nbytes) <= self.num_slots

    def reserve(self, nbytes: int, name: ExtentName | None = None) -> Location | None:
        count = self.slots_for(nbytes)
        start = self.allocator.allocate(count)
        if start is None:
            return None
        return Location(self.name, start * self.slot_bytes, count * self.slot_bytes)

    def write(self, loc: Location, data: Buffer) -> None:
        n = memoryview(data).nbytes
        assert n <= loc.nbytes, f"write of {n} bytes into a {loc.nbytes}-byte location"
        self.view[loc.offset : loc.offset + n] = memoryview(data).cast("B")

    def read(self, loc: Location) -> memoryview:
        return self.view[loc.offset : loc.offset + loc.nbytes]

    def drop(self, loc: Location) -> None:
        self.allocator.free(loc.offset // self.slot_bytes, loc.nbytes // self.slot_bytes)

    def stats(self) -> TierStats:
        used = self.allocator.used_slots * self.slot_bytes
        return TierStats(self.name, self.capacity_bytes, used, self.allocator.used_slots)

    def close(self) -> None:
        try:
            self.view.release()
            self._mmap.close()
        except BufferError:
            # A zero-copy view handed out by read() is still alive; the mapping goes with the process.
            pass
        self.path.unlink(missing_ok=True)


def _free_bytes(path: Path) -> int | None:
    try:
        st = os.statvfs(path)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def _allocate(fd: int, nbytes: int, why: Callable[[], str]) -> None:
    """Give the file ``nbytes`` of real pages; ``ConfigError`` (with ``why()``) when there is no room."""
    try:
        os.posix_fallocate(fd, 0, nbytes)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
            raise ConfigError(why()) from None
        if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
            raise ConfigError(f"cannot allocate the host arena ({e.strerror}): {why()}") from None
        os.ftruncate(fd, nbytes)  # a filesystem without fallocate: the statvfs check above stands
