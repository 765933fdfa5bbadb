"""One shared-memory arena: a file cut into fixed-size slots that the daemon and its clients map.

The daemon creates the file (under /dev/shm unless configured), maps it, and hands clients its path;
clients map the same file and copy KV straight into and out of it, so bytes never cross the control
socket. Clients register the mapping with CUDA as pinned memory when a GPU is present
(``kvd.client.arena``), which is why extents start on slot boundaries (page aligned).

Allocation: the arena is ``capacity // slot_bytes`` slots. An extent occupies a *run* of consecutive
slots, so a client moves it with one copy. Free runs are kept coalesced (a freed run merges with free
neighbours), indexed by start, by end and by length; ``allocate`` takes the smallest free run that fits
(best fit), splitting it. Worked example with 8 slots: allocate 3 -> [0,3), allocate 2 -> [3,5), free
[0,3) -> free {0:3, 5:3}; allocate 3 -> best fit picks [0,3) (either fits; the lower start wins ties).

The file is allocated in full at start (a shortage of room fails the start, never a later write),
created under a private temporary name with ``O_EXCL|O_NOFOLLOW`` and renamed into place, with an
owner record beside it (``<arena>.owner``: the daemon's pid and socket): an existing file at the
path is replaced only if it is a stale kvd arena (its owner is dead), never another program's file,
and a later daemon of any instance removes arenas and sockets whose owner died (``remove_stale``).
The arena holds no metadata: the store's index says which runs hold which extents. On restart the
file is recreated empty, with a new ``arena_id`` so clients know to remap.
"""

from __future__ import annotations

import errno
import json
import logging
import mmap
import os
import socket
import stat
import uuid
from collections.abc import Callable
from pathlib import Path

from kvd.core.errors import ConfigError

logger = logging.getLogger(__name__)
OWNER_SUFFIX = ".owner"
# Files the store keeps beside an arena (kvd.store.published: the lookup index), removed with a stale one.
COMPANION_SUFFIXES = (".index",)


class SlotAllocator:
    """Best-fit allocator of runs of consecutive slots, with coalescing on free."""

    def __init__(self, num_slots: int) -> None:
        assert num_slots > 0, "an allocator needs at least one slot"
        self.num_slots = num_slots
        self._by_start: dict[int, int] = {0: num_slots}  # start -> length of a free run
        self._by_end: dict[int, int] = {num_slots: 0}  # end (exclusive) -> start
        self._by_len: dict[int, set[int]] = {num_slots: {0}}  # length -> starts
        self._allocated: dict[int, int] = {}  # start -> length of an allocated run (frees are checked against it)
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
        self._allocated[start] = count
        self.used_slots += count
        return start

    def free(self, start: int, count: int) -> None:
        assert 0 <= start and start + count <= self.num_slots, f"run [{start}, {start + count}) out of range"
        # Exactly a run ``allocate`` gave out: a double free, or a free of part of a run or of slots
        # already free, would add a free run over slots in use (handed out twice later).
        assert self._allocated.get(start) == count, (
            f"free of slots [{start}, {start + count}), not a run in use (double free?)")
        del self._allocated[start]
        self.used_slots -= count
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


class Arena:
    """One arena file, mapped. ``offset`` arguments are byte offsets into it."""

    def __init__(self, path: Path, capacity_bytes: int, slot_bytes: int, *, file_mode: int = 0o660,
                 gid: int | None = None, socket_path: str = "") -> None:
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
        self._check_path()
        self._mmap = self._create(file_mode, gid)
        _write_owner(self.path, socket_path)
        self.view = memoryview(self._mmap)

    def _check_path(self) -> None:
        p = self.path
        if p.is_symlink() or (p.exists() and not p.is_file()):
            raise ConfigError(f"host.path {p} exists and is not a regular file; kvd will not replace it")
        if p.exists() and not _is_stale_arena(p):
            raise ConfigError(f"host.path {p} exists and is not the arena of a kvd that has died (no "
                              f"{p.name}{OWNER_SUFFIX} naming a dead process); kvd will not replace it: "
                              "remove it or choose another host.path")
        if p.exists():  # a dead kvd's: removed now, so its room counts as free for the new file
            _remove_arena_files(p)

    def _create(self, file_mode: int, gid: int | None) -> mmap.mmap:
        """A new arena file, all of its pages allocated now. On a tmpfs a sparse file is accepted at any
        size and the first engine that writes past the real free space dies of SIGBUS (Docker's
        /dev/shm is 64 MiB; the default arena 1 GiB), so the space is checked and then taken up front
        (``posix_fallocate``), and a shortage stops the daemon at start, naming the size, the free
        space and the setting. A new file every start: old mappings of a previous daemon keep the old
        inode, and the new ``arena_id`` tells their clients to remap."""
        parent = self.path.parent
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"host.path {self.path}: cannot create its directory {parent} ({e.strerror}); "
                              "create it, or choose another host.path (KVD_HOST__PATH)") from None
        free = _free_bytes(parent)
        if free is not None and free < self.capacity_bytes:
            raise ConfigError(self._too_big(free))
        # O_EXCL | O_NOFOLLOW: never open a file someone planted under our temporary name. Mode 0600
        # until it has its group: a tenant's arena must not be open to the daemon's group meanwhile.
        tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            if gid is not None:  # a tenant's arena: its group maps it, no one else
                _give_to_group(fd, gid, self.path)
            os.fchmod(fd, file_mode)
            _allocate(fd, self.capacity_bytes, lambda: self._too_big(_free_bytes(parent)))
            mapping = mmap.mmap(fd, self.capacity_bytes, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            st = os.fstat(fd)
            self.file_id = f"{st.st_dev}:{st.st_ino}"  # clients check they opened this file (ArenaInfo)
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

    def slots_for(self, nbytes: int) -> int:
        return max(1, -(-nbytes // self.slot_bytes))

    def close(self) -> None:
        try:
            self.view.release()
            self._mmap.close()
        except BufferError:
            # A zero-copy view handed out by read() is still alive; the mapping goes with the process.
            pass
        release_pages(self.path)  # engines still mapping it must not hold its memory from the next daemon
        self.path.unlink(missing_ok=True)
        Path(str(self.path) + OWNER_SUFFIX).unlink(missing_ok=True)


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


def _give_to_group(fd: int, gid: int, path: Path) -> None:
    try:
        os.fchown(fd, -1, gid)
    except PermissionError:  # not root: only to a group the daemon's user is in, and chown not filtered out
        raise ConfigError(f"cannot give the tenant arena {path} to group {gid}: the daemon's user must be a member "
                          f"of it (systemd: SupplementaryGroups={gid} and SystemCallFilter=@chown in kvd.service; docs/security.md)"
                          ) from None


# ---- owners: stale arenas and sockets of dead daemons -------------------------------------------


def _pid_namespace() -> str:
    """This process's PID namespace (a container has its own): pids of another one mean nothing here."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


def _write_owner(path: Path, socket_path: str) -> None:
    owner = Path(str(path) + OWNER_SUFFIX)
    tmp = owner.with_name(owner.name + f".{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({"pid": os.getpid(), "socket": socket_path, "pid_ns": _pid_namespace()}, f)
    os.replace(tmp, owner)


def _owner(path: Path) -> dict | None:
    """The owner record of the arena at ``path``, if both files are this user's (in a shared directory
    such as /dev/shm, anyone may plant a file under our name pattern: it is never ours to judge)."""
    owner = Path(str(path) + OWNER_SUFFIX)
    try:
        if path.lstat().st_uid != os.getuid() or owner.lstat().st_uid != os.getuid():
            return None
        doc = json.loads(owner.read_text())
        return doc if isinstance(doc.get("pid"), int) else None
    except (OSError, ValueError, AttributeError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _owner_died(owner: dict) -> bool:
    """Whether the daemon of an owner record is gone. Its pid is judged only in the PID namespace it
    was written in: a daemon in another container sharing /dev/shm (``--ipc=host``) has a pid this one
    cannot see, and is gone only if its socket is here and nobody answers on it."""
    if not _same_pid_namespace(owner):
        sock = owner.get("socket") or ""
        return bool(sock) and _is_dead_socket(Path(sock))
    return owner["pid"] == os.getpid() or not _alive(owner["pid"])


def _same_pid_namespace(owner: dict) -> bool:
    return owner.get("pid_ns", _pid_namespace()) == _pid_namespace()  # records before pid_ns: this one


def _is_stale_arena(path: Path) -> bool:
    owner = _owner(path)
    return owner is not None and _owner_died(owner)


def remove_stale(directory: Path, pattern: str) -> int:
    """Remove arenas (matching ``pattern``) in ``directory`` whose owner daemon is gone (``_owner_died``),
    with their owner records, lookup indexes and sockets (only a path that is a socket nobody answers
    on); files of other users are left alone. Returns how many. Run at every daemon start, so a kill -9
    leaves nothing behind for long, whatever socket the next daemon uses."""
    removed = 0
    for arena in directory.glob(pattern):
        owner = _owner(arena)
        if owner is None or not arena.is_file() or not _owner_died(owner) or (
                _same_pid_namespace(owner) and owner["pid"] == os.getpid()):  # this process's own
            continue
        sock = Path(owner.get("socket") or "")
        try:
            if str(sock) and _is_dead_socket(sock):
                sock.unlink(missing_ok=True)
            _remove_arena_files(arena)
        except OSError as e:
            logger.warning("cannot remove the stale arena %s of dead kvd pid %d: %s", arena, owner["pid"], e)
            continue
        removed += 1
        logger.info("removed the stale arena %s of dead kvd pid %d", arena, owner["pid"])
    return removed


def _remove_arena_files(arena: Path) -> None:
    """Unlink an arena with its lookup index and its owner record (the owner last), its pages freed first."""
    release_pages(arena)
    for f in (arena, *(Path(str(arena) + s) for s in (*COMPANION_SUFFIXES, OWNER_SUFFIX))):
        f.unlink(missing_ok=True)


def _is_dead_socket(path: Path) -> bool:
    try:
        if not stat.S_ISSOCK(path.lstat().st_mode):
            return False
    except OSError:
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        try:
            s.connect(str(path))
        except OSError:
            return True
    return False


def release_pages(arena: Path) -> None:
    """Free an arena file's pages now (a hole punched over it), whoever still maps it. Engines keep a
    mapping of a daemon that died or stopped, and a tmpfs file's pages live until its last mapping
    goes: the next daemon's arena did not fit beside the old one in a /dev/shm sized for one, and kvd
    could not start until every engine exited. A copy still reading it reads zeros, never used: its
    lease's release fails (the daemon that granted it is gone), which already means "discard". A
    filesystem without hole punching keeps the pages, as before."""
    try:
        fd = os.open(arena, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return
    try:
        size = os.fstat(fd).st_size
        if size and stat.S_ISREG(os.fstat(fd).st_mode):
            with mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE) as m:
                m.madvise(mmap.MADV_REMOVE)
    except (OSError, ValueError, AttributeError):  # no MADV_REMOVE here, or not supported by the filesystem
        pass
    finally:
        os.close(fd)
