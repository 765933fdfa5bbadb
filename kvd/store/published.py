"""The daemon's side of the shared lookup index (``kvd.core.index_file``): one file per host-arena
partition, kept equal to what an exact, lossless prefix lookup would answer.

When it changes: the index (``kvd.store.index``) calls ``watch`` when an entry becomes visible,
``alias`` when it gains an alias and ``unwatch`` when it leaves; in between, every change of the
entry's copies or plans empties its row cache (``Entry.rows``, a ``RowCache``), which calls back
here, so the published row is recomputed from the same ``answers.cached_parts`` the socket's lookup
answers from. No other code path has to remember the index.

What it costs the daemon: one row computation and a few numpy stores per change of an entry (a
commit of 128 entries: 128 of them), nothing per lookup.
"""

from __future__ import annotations

import fcntl
import json
import logging
import mmap
import os
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

from kvd.core import index_file as F
from kvd.core.errors import ConfigError
from kvd.core.keys import EXACT
from kvd.store import answers as L
from kvd.store.entries import Entry, EntryKey
from kvd.store.readers import EXACT_READER, readable_by

if TYPE_CHECKING:
    from kvd.store.index import Index

logger = logging.getLogger(__name__)
INITIAL_SLOTS = 1 << 14  # 256 KiB; doubles when half full (tombstones counted)
_ASK = F.V_PRESENT | F.V_ASK


class IndexWriter:
    """One index file and the daemon's books of it: which keys share each tag, and the tag's slot."""

    def __init__(self, path: Path, *, arena_id: str, chunk_tokens: int, like: Path,
                 capacity: int = INITIAL_SLOTS, private: bool = False) -> None:
        self.path, self.arena_id, self.chunk_tokens, self.like = path, arena_id, chunk_tokens, like
        self.private = private  # the daemon's user's alone (0600), not the arena's mode
        self._owners: dict[int, dict[EntryKey, int]] = {}  # tag -> key -> value (one key, but for collisions)
        self._slot: dict[int, int] = {}  # tag -> its slot
        self._meta = b""
        self.m, self._fd, old = self._create(capacity)  # fd: held, flocked, while this daemon lives
        self.m.words[F.W_VERSION] += 1  # empty and ready: even
        if old is not None:  # a killed daemon's: its readers ask again
            old.words[F.W_STATE] = F.CLOSED

    def _create(self, capacity: int) -> tuple[F.Mapped, int, F.Mapped | None]:
        """A new file at ``path`` with the owner, group and mode of the arena beside it (0600 if
        ``private``), its version odd
        (being written) until the caller is done with it, and an exclusive flock held on it; the file
        it replaced, mapped, if it was a kvd lookup index (never another file)."""
        p = self.path
        if p.is_symlink() or (p.exists() and not p.is_file()):
            raise ConfigError(f"lookup index {p} exists and is not a regular file; kvd will not replace it")
        old = _map_existing(p) if p.exists() else None
        if p.exists() and old is None:
            raise ConfigError(f"lookup index {p} exists and is not a kvd lookup index; remove it or choose "
                              "another host.path")
        st = os.stat(self.like)
        # O_EXCL | O_NOFOLLOW under a fresh name: never a file someone planted there
        tmp = p.with_name(f"{p.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            if st.st_gid != os.getegid():
                os.fchown(fd, -1, st.st_gid)
            os.fchmod(fd, 0o600 if self.private else st.st_mode & 0o777)
            os.ftruncate(fd, F.file_bytes(capacity))
            mm = mmap.mmap(fd, F.file_bytes(capacity), mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            mm[: 13 * 8] = F.header(capacity, self.arena_id, self.chunk_tokens, version=1)
            # Liveness: the kernel drops this lock when the daemon dies, however it dies, so a reader
            # that can take a shared lock knows the table is nobody's (kvd.client.local_lookup).
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.replace(tmp, p)
        except BaseException:
            tmp.unlink(missing_ok=True)
            os.close(fd)
            raise
        m = F.Mapped(mm, writable=True)
        if self._meta:
            self._write_meta(m, self._meta)  # keeps the version odd (two increments)
        return m, fd, old

    # ---- writes ----------------------------------------------------------------------------------

    def set(self, key: EntryKey, tag: int, val: int) -> None:
        own = self._owners.setdefault(tag, {})
        if own.get(key) == val:
            return
        own[key] = val
        slot = self._slot.get(tag)
        if slot is None and self._full():
            self._rebuild()
            slot = self._slot.get(tag)
        m = self.m
        m.words[F.W_VERSION] += 1
        if slot is None:
            slot = self._slot[tag] = self._free_slot(m, tag)
            m.words[F.W_COUNT] += 1
        m.vals[slot] = val if len(own) == 1 else _ASK
        m.tags[slot] = tag
        m.words[F.W_VERSION] += 1

    def remove(self, key: EntryKey, tag: int) -> None:
        own = self._owners.get(tag)
        if not own or own.pop(key, None) is None:
            return
        m, slot = self.m, self._slot[tag]
        m.words[F.W_VERSION] += 1
        if own:
            m.vals[slot] = next(iter(own.values())) if len(own) == 1 else _ASK
        else:
            m.tags[slot] = F.TOMBSTONE
            m.vals[slot] = 0
            del self._owners[tag], self._slot[tag]
            m.words[F.W_COUNT] -= 1
            m.words[F.W_TOMBS] += 1
        m.words[F.W_VERSION] += 1

    def set_meta(self, meta: bytes) -> None:
        if meta != self._meta:
            if len(meta) > F.META_MAX:
                raise ValueError(f"lookup index meta of {len(meta)} bytes; at most {F.META_MAX}")
            self._meta = meta
            self._write_meta(self.m, meta)

    @staticmethod
    def _write_meta(m: F.Mapped, meta: bytes) -> None:
        m.words[F.W_VERSION] += 1
        m.mm[F.META_AT : F.META_AT + len(meta)] = meta
        m.words[F.W_META_LEN] = len(meta)
        m.words[F.W_META_GEN] += 1
        m.words[F.W_VERSION] += 1

    def _free_slot(self, m: F.Mapped, tag: int) -> int:
        i, run = int(F.home(tag, m.mask)), 0
        while m.tags[i] > F.TOMBSTONE:
            i, run = (i + 1) & m.mask, run + 1
        if m.tags[i] == F.TOMBSTONE:
            m.words[F.W_TOMBS] -= 1
        if run > m.words[F.W_MAX_PROBE]:
            m.words[F.W_MAX_PROBE] = run
        return i

    def _full(self) -> bool:
        m = self.m
        return int(m.words[F.W_COUNT]) + int(m.words[F.W_TOMBS]) + 1 > m.capacity // 2

    def _rebuild(self) -> None:
        """A new file at the same path, twice as large when more than a quarter is in use (else the
        same size, without tombstones), holding every published tag; the old one is told ``MOVED``."""
        n, cap = len(self._slot), self.m.capacity
        new_cap = cap * 2 if n + 1 > cap // 4 else cap
        m, fd, _ = self._create(new_cap)  # a reader that opens it now sees an odd version: asks the daemon
        # The published tags and values, as the old table holds them, placed all at once (F.place): on
        # the event loop, one tag at a time in Python took 7 ms for 8K tags and 125 ms for 100K on the
        # 2-core VM (now 3.4 and 38.9 ms: benchmarks/results/index_rebuild.json), a pause every client's
        # requests waited out. (No tag's owners are ever empty: ``remove`` drops a tag with its last key.)
        live = self.m.tags > F.TOMBSTONE
        tags, vals = self.m.tags[live], self.m.vals[live]
        slots, probe = F.place(tags, m.mask)
        m.tags[slots], m.vals[slots] = tags, vals
        m.words[F.W_MAX_PROBE] = probe
        self._slot = dict(zip(tags.tolist(), slots.tolist()))
        m.words[F.W_COUNT] = len(self._slot)
        m.words[F.W_VERSION] += 1  # filled: even
        self.m.words[F.W_STATE] = F.MOVED  # then the old file's readers go to the new one
        os.close(self._fd)  # its flock with it (the old mapping goes with its last view)
        self.m, self._fd = m, fd
        logger.info("lookup index %s: %d slots (%d in use)", self.path, new_cap, n)

    def close(self) -> None:
        """The daemon stops: readers are told ``CLOSED`` and the file goes."""
        self.m.words[F.W_STATE] = F.CLOSED  # the mapping itself goes with its last view
        self.path.unlink(missing_ok=True)
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _map_existing(p: Path) -> F.Mapped | None:
    """A previous daemon's index at ``p``, mapped to tell its readers it is gone; None if not one."""
    try:
        m, fd = F.map_file(p, writable=True)
    except (OSError, ValueError):
        return None
    os.close(fd)  # the mapping stays
    return m


class Publisher:
    """Every partition's index file, and how an entry becomes a published row."""

    def __init__(self, index: Index, *, chunk_tokens: int) -> None:
        self.index = index
        self.host = host = index.landing.tier
        self.writers: dict[str, IndexWriter] = {}
        try:
            # Under tenants the default partition holds the namespaces no tenant lists: an admin's, and
            # those of other hosts' tenants the remote tier's scan adopted. Its arena has the socket's
            # mode (every client's), so its index would let any tenant test, tag by tag, whether
            # another host's tenant stored a given prompt: it is the daemon's user's (and root's) only.
            tenants = len(host.arenas) > 1  # type: ignore[attr-defined]
            for part, arena in host.arenas.items():  # type: ignore[attr-defined]
                self.writers[part] = IndexWriter(index_path(arena.path), arena_id=arena.arena_id,
                                                 chunk_tokens=chunk_tokens, like=arena.path,
                                                 private=tenants and part == "")
        except BaseException:
            self.close()
            raise
        self._sets: dict[tuple[str, ...], int] = {}
        self.levels_changed()  # (made with the store, before recovery: every entry comes through watch)

    def path(self, partition: str) -> str | None:
        w = self.writers.get(partition)
        return None if w is None else str(w.path)

    def _meta(self) -> bytes:
        return json.dumps({"tiers": [lv.name for lv in self.index.levels], "sets": [list(s) for s in self._sets],
                           "records": [lv.level for lv in self.index.records],
                           "shared": any(lv.tier.shared for lv in self.index.levels)}).encode()

    def levels_changed(self) -> None:
        meta = self._meta()
        for part, w in list(self.writers.items()):
            self._guarded(part, w, lambda w=w: w.set_meta(meta))

    def _guarded(self, part: str, w: IndexWriter, fn) -> None:
        """``fn()`` on a writer; should it fail (no room for a bigger file, say), that partition's index
        is closed for good (its clients ask the daemon from then on) and the store's operation that
        changed the entry goes on: the index may never cost the store a write."""
        try:
            fn()
        except Exception:
            logger.exception("lookup index %s failed; it is closed and its clients ask the daemon", w.path)
            self.writers.pop(part, None)
            try:
                w.close()
            except Exception:  # noqa: BLE001 - already failing; the daemon goes on without it
                pass

    # ---- entries ---------------------------------------------------------------------------------

    def watch(self, e: Entry) -> None:
        e.rows.on_change = lambda: self.publish(e)
        self.publish(e)

    def unwatch(self, e: Entry) -> None:
        e.rows.on_change = None
        part, w = self._writer(e)
        if w is None:
            return
        s = F.salt(e.namespace, e.fingerprint)

        def remove() -> None:
            for h in (e.hash, *e.aliases):
                w.remove((e.namespace, e.fingerprint, h), F.tag_of(s, h))

        self._guarded(part, w, remove)

    def alias(self, e: Entry, alias_hash: str) -> None:
        self.publish(e, only=alias_hash)

    def publish(self, e: Entry, only: str | None = None) -> None:
        """``e``'s row (and its aliases') as an exact lossless reader's lookup would give it, or none
        when such a reader cannot read it (other attention, trimmed, nothing lossless left)."""
        if self.index.entries.get(e.key) is not e:
            return
        part, w = self._writer(e)
        if w is not None:
            self._guarded(part, w, lambda: self._publish(w, e, only))

    def _publish(self, w: IndexWriter, e: Entry, only: str | None) -> None:
        s = F.salt(e.namespace, e.fingerprint)
        parts = None
        if e.kind == "prefix" and readable_by(EXACT_READER, e, EXACT):
            parts = L.cached_parts(self.index.levels, self.index.by_name, e, False)
        tokens = {e.hash: e.num_tokens} | {a: n for (ns, fp, a), (_, n) in self._aliases(e)}
        for h, n in tokens.items():
            if only is not None and h != only:
                continue
            key = (e.namespace, e.fingerprint, h)
            if parts is None:
                w.remove(key, F.tag_of(s, h))
            else:
                tier, classes, complete = parts
                cs = self._set(classes)
                w.set(key, F.tag_of(s, h), _ASK if cs < 0 else
                      F.pack_val(self.index.by_name[tier].level, cs, complete, n))

    def _aliases(self, e: Entry):
        for h in e.aliases:
            k = (e.namespace, e.fingerprint, h)
            a = self.index.aliases.get(k)
            if a is not None:
                yield k, a

    def _writer(self, e: Entry) -> tuple[str, IndexWriter | None]:
        """The partition of the arena ``e``'s bytes live in, and its index (None once closed)."""
        part = self.host.partition_of(e.namespace)
        return part, self.writers.get(part)

    def _set(self, classes: tuple[str, ...]) -> int:
        """The id of a class set in the meta; -1 past ``MAX_SETS`` or the meta's room (such rows say
        ``V_ASK``: ask the daemon)."""
        i = self._sets.get(classes)
        if i is None:
            if len(self._sets) >= F.MAX_SETS:
                return -1
            i = self._sets[classes] = len(self._sets)
            if len(self._meta()) > F.META_MAX:
                del self._sets[classes]
                return -1
            self.levels_changed()
        return i

    def close(self) -> None:
        for w in self.writers.values():
            w.close()


def index_path(arena_path: Path) -> Path:
    return Path(f"{arena_path}.index")
