"""The SSD tier: encoded extents (records) in one LMDB environment, verified on every read.

Layout: one LMDB environment (``ssd.path``) with two named databases: ``meta`` (the format marker,
plus small daemon records, see ``put_meta``) and ``extents`` (LMDB key = ``Location.key``, built by
``kvd.tiers.record.name_key`` from the extent's name; value = one record, see ``kvd.tiers.record``),
and a lock file ``kvd.lock``.

One daemon per directory: opening takes an exclusive ``flock`` on ``kvd.lock`` (holding the pid) for
the tier's lifetime; a second daemon on the same path fails at start with an error naming the path
and the holder. Two daemons on one LMDB file lost acknowledged writes (compaction renames the file
under the other); the lock lives beside ``data.mdb`` so compaction's rename never releases it.

Lifecycle of a record: ``kvd.tiers.record.encode_record`` builds it (CPU, any thread) →
``reserve(len(record), name)`` accounts its encoded size against ``capacity_bytes`` (``None`` when
full, nothing changes) → ``write``/``write_many`` commit it (batched: one LMDB transaction per
``write_batch`` records) → ``read`` returns it verified → ``drop`` deletes it (or releases a
reservation never written). Reserving a reserved key is a store bug; a stored key reserved again is
a record the store no longer indexes (its drop failed): the new record replaces it.

Durability: commits ``sync`` and ``metasync`` (LMDB's defaults): a write that returned survives ``kill -9``
and power loss; no half-written transaction is ever visible. "On SSD" = committed.

Restart: opening walks every header once (headers only; payloads are verified when read), drops
records whose header is corrupt or whose key is not an extent name of this format, and rebuilds the
capacity accounting.

Beyond ``Tier``'s five methods: ``scan`` (every record's name, to rebuild the index at start),
``put_meta``/``get_meta`` (registered models, durable beside their extents), ``compact`` (kvctl).

Threads: every method blocks and may be called from any thread (the store's I/O executor, never the
event loop). LMDB serialises writers and gives each reader a snapshot; the accounting is under a
lock; ``compact`` waits for operations in flight and holds new ones off while it swaps the file.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import threading
from collections.abc import Iterable
from pathlib import Path

import lmdb
import numpy as np

from kvd.core.config import SsdSettings
from kvd.core.errors import ConfigError, CorruptData, InvalidRequest, SsdFull, StorageFormatError
from kvd.tiers.base import Buffer, ExtentName, Location, StoredRecord, Tier, TierStats
from kvd.tiers.buffers import BufferPool
from kvd.tiers.gate import Gate
from kvd.tiers.record import RECORD_FORMAT, name_key, parse_key, unpack_header

logger = logging.getLogger(__name__)

FORMAT_MARKER = b"kvd-ssd"
# KV is tenant data: the directory and files are the daemon's alone (a default umask left data.mdb world-readable)
DIR_MODE, FILE_MODE = 0o700, 0o600
LOCK_FILE = "kvd.lock"
# The compacted copy is made inside ssd.path, so that its rename over data.mdb stays on one filesystem
# (ssd.path may be a mount point) and within the directories the daemon may write (ReadWritePaths).
COMPACT_DIR = "compact.tmp"
_WILL_NEED_MIN_BYTES = 256 << 10  # smaller records: the kernel's own read-ahead is enough
_USER_META = b"user/"


def _private(path: Path) -> None:
    """Tighten an existing directory and its files to the daemon's user (earlier kvd left them 0755/0644)."""
    os.chmod(path, DIR_MODE)
    for f in path.iterdir():
        if f.is_file() and not f.is_symlink():
            os.chmod(f, FILE_MODE)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class SsdTier(Tier):
    """Encoded extents in LMDB. ``Location.key`` is the record's LMDB key; ``nbytes`` its encoded size."""

    name = "ssd"
    holds_records = True
    blocking = True

    def __init__(self, path: Path, settings: SsdSettings, *, sync: bool = True) -> None:
        self.path = Path(path)
        self.capacity_bytes = int(settings.capacity_bytes)
        self.map_size_bytes = int(settings.map_size_bytes) or int(self.capacity_bytes * 1.25)
        self.settings = settings  # write_batch is read where used: SIGHUP changes it in place
        self._sync = sync
        self._buffers = BufferPool()  # what read returns, given back by the promotion (recycle)
        self._lock = threading.Lock()  # guards the accounting below
        self._gate = Gate()
        self._sizes: dict[bytes, int] = {}  # key -> encoded bytes of a committed record
        self._pending: dict[bytes, int] = {}  # key -> bytes reserved, not yet written
        self._used = 0
        self._reserved = 0
        self.num_dropped_at_open = 0  # records with corrupt headers or foreign keys removed when opening
        self._lock_fd = self._take_lock()
        try:
            self._open()
        except BaseException:
            os.close(self._lock_fd)
            raise

    def _take_lock(self) -> int:
        try:
            self.path.mkdir(parents=True, exist_ok=True, mode=DIR_MODE)
            _private(self.path)
            fd = os.open(self.path / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, FILE_MODE)
        except OSError as e:
            raise ConfigError(f"ssd.path {self.path} cannot be used: {e.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise ConfigError(f"ssd.path {self.path} is in use by another kvd (pid {holder}); give each daemon "
                              "its own ssd.path (the default already depends on daemon.socket)") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        return fd

    # ---- open / format ------------------------------------------------------------------------

    def _open(self) -> None:
        for stale in (self.path / COMPACT_DIR, self.path.with_name(self.path.name + ".compact")):
            shutil.rmtree(stale, ignore_errors=True)  # a compaction interrupted before its swap (beside: older kvd)
        data_file = self.path / "data.mdb"
        is_new = not data_file.exists() or data_file.stat().st_size == 0
        try:
            self._env = lmdb.open(str(self.path), map_size=self.map_size_bytes, max_dbs=2, sync=self._sync,
                                  metasync=self._sync, readahead=True, writemap=False, lock=True,
                                  max_readers=256, mode=FILE_MODE)
        except lmdb.Error as e:
            raise StorageFormatError(
                f"{data_file} is not a readable LMDB file ({e.__class__.__name__}: {e}); it is corrupt or "
                "not a kvd SSD store: move it away, or set ssd.path to an empty directory") from None
        try:
            self._check_format(is_new)
            self._load_accounting()
        except BaseException:
            self._env.close()
            raise
        # For read-ahead hints (_will_need): the file, and where LMDB mapped it.
        self._fd = os.open(data_file, os.O_RDONLY)
        self._map_addr = int(self._env.info()["map_addr"])

    def _close_env(self) -> None:
        self._env.close()
        os.close(self._fd)

    def _will_need(self, value: memoryview) -> None:
        """Have the kernel read the whole record now, in large requests, instead of page fault by page
        fault while it is verified and decoded. Records are contiguous in the file (LMDB overflow
        pages). Cold restores ran ~1.5x faster with it on the benchmark disk. A hint: errors ignored."""
        if value.nbytes < _WILL_NEED_MIN_BYTES or not hasattr(os, "posix_fadvise"):
            return
        offset = int(np.frombuffer(value, dtype=np.uint8).ctypes.data) - self._map_addr
        if offset >= 0:
            try:
                os.posix_fadvise(self._fd, offset, value.nbytes, os.POSIX_FADV_WILLNEED)
            except OSError:
                pass

    def _check_format(self, is_new: bool) -> None:
        marker = b"%s/%d" % (FORMAT_MARKER, RECORD_FORMAT)
        where = self.path / "data.mdb"
        try:
            if is_new:
                with self._env.begin(write=True) as txn:
                    self._meta = self._env.open_db(b"meta", txn=txn)
                    self._data = self._env.open_db(b"extents", txn=txn)
                    txn.put(b"format", marker, db=self._meta)
                return
            # Without txn=, py-lmdb opens the handles in a transaction it commits, so they stay
            # valid for every later transaction (a handle opened in a read txn would not).
            self._meta = self._env.open_db(b"meta", create=False)
            self._data = self._env.open_db(b"extents", create=False)
            with self._env.begin() as txn:
                found = txn.get(b"format", db=self._meta)
        except lmdb.Error as e:
            raise StorageFormatError(
                f"{where} is an LMDB file but not a kvd SSD store ({e.__class__.__name__}: {e}); move it away "
                "or set ssd.path to an empty directory") from None
        if found is None or not found.startswith(FORMAT_MARKER + b"/"):
            raise StorageFormatError(f"{where} has no kvd format marker (found {found!r}); it is not a kvd SSD "
                                     "store: move it away or set ssd.path to an empty directory")
        if found != marker:
            raise StorageFormatError(f"{where} was written in format {found.decode(errors='replace')}; this kvd "
                                     f"reads {marker.decode()}: use the matching kvd or clear the directory")

    def _load_accounting(self) -> None:
        """The accounting, rebuilt from the headers and swapped in whole (reserve/drop never wait for compact)."""
        bad: list[bytes] = []
        sizes: dict[bytes, int] = {}
        with self._env.begin(buffers=True) as txn:
            for key, value in txn.cursor(db=self._data):
                k = bytes(key)
                try:
                    unpack_header(value, k)
                except (CorruptData, StorageFormatError):
                    bad.append(k)
                    continue
                if parse_key(k) is None:  # not an extent name of this format (e.g. written before computed_under)
                    bad.append(k)
                    continue
                sizes[k] = value.nbytes
        if bad:
            with self._env.begin(write=True) as txn:
                for k in bad:
                    txn.delete(k, db=self._data)
            self.num_dropped_at_open = len(bad)
            logger.warning("ssd tier %s: removed %d records with corrupt headers or keys of another format at open",
                           self.path, len(bad))
        with self._lock:
            self._sizes, self._used = sizes, sum(sizes.values())
        logger.info("ssd tier %s: %d records, %d bytes of %d", self.path, len(sizes), self._used,
                    self.capacity_bytes)

    # ---- Tier ---------------------------------------------------------------------------------

    def reserve(self, nbytes: int, name: ExtentName | None = None) -> Location | None:
        """Account ``nbytes`` (a record's encoded size) for the extent ``name``; ``None`` if over capacity."""
        if name is None:
            raise InvalidRequest("the SSD tier keys records by extent name; reserve(nbytes, name)")
        key = name_key(name)
        with self._lock:
            assert key not in self._pending, f"SSD key {key.hex()} is already reserved; write or drop it first"
            # Stored but no longer indexed (its delete failed, e.g. on a full disk): the new record replaces
            # it on write. Refused, as before, it failed every later write-down of the extent and its batch.
            orphan = self._sizes.get(key, 0)
            if self._used - orphan + self._reserved + nbytes > self.capacity_bytes:
                return None
            self._pending[key] = nbytes
            self._reserved += nbytes
        return Location(self.name, 0, nbytes, key)

    def write(self, loc: Location, data: Buffer) -> None:
        """Commit one record (``kvd.tiers.record.encode_record``) durably. ``SsdFull`` if LMDB has no room."""
        self.write_many([(loc, data)])

    def write_many(self, items: Iterable[tuple[Location, Buffer]]) -> None:
        """Commit records in transactions of ``write_batch``; each commit is durable on return.

        ``SsdFull`` when a transaction does not fit or fails (a full disk: LMDB reports a short write as EIO):
        its records are not written (reservations stay, for the caller to ``drop``); ``num_written`` were.
        """
        items = list(items)
        for loc, data in items:
            self._check_record(loc, data)
        done = 0
        with self._gate:
            n = self.settings.write_batch
            for start in range(0, len(items), n):
                batch = items[start : start + n]
                try:
                    with self._env.begin(write=True, db=self._data) as txn:
                        for loc, data in batch:
                            txn.put(loc.key, data, db=self._data)
                except lmdb.Error as e:  # MapFullError, DiskError, or a failed write (disk full: EIO, EFBIG)
                    raise SsdFull(f"SSD tier {self.path}: LMDB could not take {len(batch)} records "
                                  f"({e.__class__.__name__}: {e}); raise ssd.map_size_bytes or free disk space",
                                  num_written=done) from None
                with self._lock:
                    for loc, data in batch:
                        self._reserved -= self._pending.pop(loc.key)
                        self._used += memoryview(data).nbytes - self._sizes.get(loc.key, 0)  # 0 unless replaced
                        self._sizes[loc.key] = memoryview(data).nbytes
                done += len(batch)

    def _check_record(self, loc: Location, data: Buffer) -> None:
        view = memoryview(data).cast("B")
        with self._lock:
            reserved = self._pending.get(loc.key)
        if reserved is None or view.nbytes > reserved:
            raise InvalidRequest(f"SSD write of {view.nbytes} bytes for key {loc.key.hex()}, which has "
                                 f"{'no reservation' if reserved is None else f'{reserved} bytes reserved'}")
        try:
            unpack_header(view, loc.key)
        except (CorruptData, StorageFormatError) as e:
            raise InvalidRequest(f"SSD write for key {loc.key.hex()} is not a record of that key: {e}") from None

    def read(self, loc: Location) -> memoryview:
        """The record at ``loc``, header checked, in a pooled buffer (``recycle`` it). Its payload is verified
        by whoever uses it, before any byte of it is used (``decode_record_into``, or ``check_record``
        to pass a record on as it is): verifying here too would hash every payload twice.
        ``CorruptData`` if the record is absent or its header damaged."""
        with self._gate, self._env.begin(buffers=True, db=self._data) as txn:
            value = txn.get(loc.key, db=self._data)
            if value is None:
                raise CorruptData(f"SSD record {loc.key.hex()} is not in {self.path}")
            self._will_need(value)
            unpack_header(value, loc.key)
            out = self._buffers.take(len(value))  # out of the transaction, into a reused buffer (recycle)
            out[:] = value
            return out

    def recycle(self, data) -> None:
        self._buffers.give(data)

    def drop(self, loc: Location) -> None:
        """Delete the record (or release a reservation never written). Dropping twice is a bug."""
        with self._lock:
            reserved = self._pending.pop(loc.key, None)
            if reserved is not None:
                self._reserved -= reserved
                return
            assert loc.key in self._sizes, f"SSD key {loc.key.hex()} dropped twice or never written"
        with self._gate, self._env.begin(write=True, db=self._data) as txn:
            txn.delete(loc.key, db=self._data)
        with self._lock:
            self._used -= self._sizes.pop(loc.key)

    def stats(self) -> TierStats:
        with self._lock:
            return TierStats(self.name, self.capacity_bytes, self._used + self._reserved, len(self._sizes))

    # ---- extras for the daemon ----------------------------------------------------------------

    def scan(self) -> list[StoredRecord]:
        """Every committed record's location, name and header facts, to rebuild the store's index at
        start. Records whose header turned corrupt since open are skipped (their reads would fail)."""
        out = []
        with self._gate, self._env.begin(buffers=True, db=self._data) as txn:
            for key, value in txn.cursor(db=self._data):
                k = bytes(key)
                name = parse_key(k)
                try:
                    header, _ = unpack_header(value, k)
                except (CorruptData, StorageFormatError):
                    continue
                if name is not None:
                    out.append(StoredRecord(Location(self.name, 0, value.nbytes, k), name, header.codec,
                                            header.raw_nbytes, header.raw_xxh, header.layout))
        return out

    def put_meta(self, name: str, value: bytes) -> None:
        """Store a small daemon record durably (e.g. registered models and head maps, so that SSD
        records can be matched to their model after a restart, before any engine re-registers)."""
        with self._gate, self._env.begin(write=True, db=self._meta) as txn:
            txn.put(_USER_META + name.encode(), value, db=self._meta)

    def get_meta(self, name: str) -> bytes | None:
        with self._gate, self._env.begin(db=self._meta) as txn:
            return txn.get(_USER_META + name.encode(), db=self._meta)

    def compact(self) -> tuple[int, int]:
        """Rewrite the LMDB file without free pages (``kvctl compact``); ``(bytes before, after)``.

        Blocks other operations of this tier meanwhile (it copies the whole live data set). The copy
        is made inside the environment's directory and swapped in with one rename, so a crash leaves
        either file; a swap that fails reopens the file it left in place, so the tier stays open.
        """
        data_file = self.path / "data.mdb"
        tmp = self.path / COMPACT_DIR
        with self._gate.exclusive():
            before = data_file.stat().st_size
            try:
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir(mode=DIR_MODE)
                self._env.copy(str(tmp), compact=True)
                os.chmod(tmp / "data.mdb", FILE_MODE)  # LMDB's copy is created by the umask (0644)
                _fsync(tmp / "data.mdb")  # LMDB's copy writes O_DIRECT and never syncs: durable before the swap
                self._close_env()
                try:
                    os.replace(tmp / "data.mdb", data_file)
                    _fsync(self.path)  # and the swap itself (the directory entry)
                finally:
                    self._open()  # the accounting stays whole meanwhile: reserve and drop do not wait for this
            finally:
                shutil.rmtree(tmp, ignore_errors=True)  # a failed copy's part (a full disk) does not stay
            after = data_file.stat().st_size
        logger.info("ssd tier %s compacted: %d -> %d bytes", self.path, before, after)
        return before, after

    def close(self) -> None:
        with self._gate.exclusive():
            self._close_env()
        os.close(self._lock_fd)  # releases the directory lock
