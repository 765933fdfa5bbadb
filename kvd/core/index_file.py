"""The shared lookup index: a file the daemon writes and clients map read-only, answering an exact
reader's prefix lookup without a round trip (issue 17's lookup goal).

Why: every engine request looks up its prefix before it is scheduled. Over the socket, a 128-hit
lookup costs the daemon about 0.4 ms of Python and the client a round trip; with 8 clients on 2
cores the requests queue on the daemon's one event loop and any process descheduled mid-call adds a
scheduler slice (p99 10 ms, docs/benchmarks.md). Probing a table in shared memory takes the client
tens of microseconds and the daemon nothing.

What it holds: one slot per committed entry (and alias) an exact reader could read (computed under
exact attention, not trimmed), keyed by a 64-bit *tag* of ``(namespace, fingerprint, hash)``, with
what a lookup row says of it for a reader that takes no lossy bytes (tier, class set, complete,
tokens). Everything else (head-aware readers, chunk entries, lossy reads, token ids, prefetching
from SSD, the remote tier's misses) still asks the daemon (``kvd.client.local_lookup`` decides).

Isolation: one file per host-arena partition, beside its arena with the same owner, group and mode,
so a tenant maps only its own tenant's index, as with its arena (docs/security.md). A tag is not a
secret: it only has to keep the keys of two namespaces or models apart, and a stale or colliding tag
costs at most a lease that finds nothing (leases check the full key; a tag shared by two keys is
published as ``V_ASK``: ask the daemon).

Layout, little-endian u64 words unless said::

    header (4096 bytes)
      0 magic b"KVDIDX01"   1 version (seqlock: odd while the daemon writes)
      2 state (0 open, 1 closed: daemon gone, 2 moved: a bigger file replaced it at the same path)
      3 capacity (slots, a power of two)   4 count   5 tombstones   6 max_probe (longest probe run)
      7 meta_gen   8 meta_len   9-10 arena_id (16 bytes)   11 chunk_tokens   12 flags (reserved, 0)
      from byte 128: meta, meta_len bytes of JSON {"tiers": [names by level], "sets": [[class names]],
      "records": [levels of record tiers], "shared": a shared (remote) tier is configured}
    tags  capacity x u64 at byte 4096          (0 empty, 1 tombstone, else a tag: top bit set)
    vals  capacity x u64 after the tags        (``pack_val``)

Consistency: the daemon is the only writer; every change is bracketed by two increments of
``version``. A reader reads ``version`` (even), probes, and reads it again: equal means no write
overlapped. The order of plain loads and stores is what makes this hold, which x86-64 guarantees
(TSO); elsewhere the client does not use the file (``SUPPORTED``).
"""

from __future__ import annotations

import binascii
import functools
import json
import mmap
import os
import platform
import struct

import numpy as np
import xxhash

MAGIC = b"KVDIDX01"
HEADER_BYTES = 4096
META_AT, META_MAX = 128, HEADER_BYTES - 128
W_MAGIC, W_VERSION, W_STATE, W_CAPACITY, W_COUNT, W_TOMBS, W_MAX_PROBE, W_META_GEN, W_META_LEN = range(9)
W_ARENA, W_CHUNK, W_FLAGS = 9, 11, 12
OPEN, CLOSED, MOVED = 0, 1, 2
EMPTY, TOMBSTONE = 0, 1

# vals: bit 18 set for every published slot, so 0 is never a value
V_PRESENT, V_ASK, V_COMPLETE = 1 << 18, 1 << 17, 1 << 16
MAX_SETS = 255
# Only on x86-64 are plain loads kept in order with each other (and stores with stores), which the
# seqlock needs; elsewhere clients ask the daemon.
SUPPORTED = platform.machine().lower() in ("x86_64", "amd64")


def file_bytes(capacity: int) -> int:
    return HEADER_BYTES + 16 * capacity


@functools.lru_cache(maxsize=4096)  # asked per lookup and per published entry; salted namespaces come and go
def salt(namespace: str, fingerprint: str) -> int:
    """What a key's namespace and model add to its tag (so equal hashes in two namespaces differ)."""
    return xxhash.xxh3_64_intdigest(f"{namespace}\0{fingerprint}".encode())


@functools.lru_cache(maxsize=4096)
def salt_u64(namespace: str, fingerprint: str) -> np.uint64:
    """``salt`` as the numpy scalar ``tags_of`` xors with (making one costs a lookup ~2 us)."""
    return np.uint64(salt(namespace, fingerprint))


TOP = 1 << 63
_TOP = np.uint64(TOP)


def tag_of(salt_: int, hash_hex: str) -> int:
    """The tag of one key: its hash's first 8 bytes (little-endian) xor the salt, top bit set (so
    never EMPTY or TOMBSTONE)."""
    return (int.from_bytes(bytes.fromhex(hash_hex[:16]), "little") ^ salt_) | TOP


def tags_of(salt_: int | np.uint64, hashes: list[str]) -> np.ndarray:
    """``tag_of`` of many hashes (32 hex characters each) at once (``salt_``: ``salt`` or ``salt_u64``)."""
    raw = np.frombuffer(binascii.unhexlify("".join(hashes)), dtype="<u8")  # (faster than bytes.fromhex)
    return (raw[0::2] ^ salt_) | _TOP


def home(tags: np.ndarray | int, mask: int):
    """The slot a tag's probe starts at: its low bits (the top bit the tag forces is above any mask)."""
    return tags & mask


def place(tags: np.ndarray, mask: int) -> tuple[np.ndarray, int]:
    """Slots for distinct ``tags`` in an empty table of ``mask + 1`` slots, by linear probing from each
    tag's ``home``, and the longest probe. Vectorized: taken in order of home slot, tag i lands at
    ``max(home_i, slot_{i-1} + 1)`` (the slots before it form runs that start at their first tag's
    home, so every slot between its home and its own is taken: a reader's probe from its home meets
    no empty slot before it), a running maximum; the few that run past the last slot wrap to the
    first free slots from slot 0, in order, as a probe would. 100K tags: 2-10 ms on the 2-core VM,
    where placing them one by one in Python held the daemon's event loop for over 100 ms."""
    cap = mask + 1
    h_all = (tags & np.uint64(mask)).astype(np.int64)
    order = np.argsort(h_all, kind="stable")
    h = h_all[order]
    i = np.arange(h.size, dtype=np.int64)
    s = np.maximum.accumulate(h - i) + i if h.size else h
    slots = np.empty(h.size, dtype=np.int64)
    over = s >= cap
    slots[order[~over]] = s[~over]
    probe = int((s[~over] - h[~over]).max(initial=0))
    if over.any():
        free = np.ones(cap, dtype=bool)
        free[s[~over]] = False
        q = 0
        for k, hk in zip(order[over].tolist(), h[over].tolist()):
            while not free[q]:
                q += 1
            slots[k], free[q] = q, False
            probe = max(probe, q + cap - hk)
            q += 1
    return slots, probe


def pack_val(level: int, class_set: int, complete: bool, num_tokens: int) -> int:
    return V_PRESENT | (V_COMPLETE if complete else 0) | (class_set << 8) | level | (num_tokens << 32)


class Mapped:
    """One index file, mapped: the header words, the meta, the tag and value arrays."""

    def __init__(self, mm: mmap.mmap, *, writable: bool) -> None:
        self.mm = mm
        if len(mm) < HEADER_BYTES:
            raise ValueError(f"not a kvd lookup index ({len(mm)} bytes, shorter than its header)")
        # The header words as Python ints, read-only when the mapping is (a reader's hot path reads
        # several per lookup: indexing a memoryview costs a third of indexing a numpy array)
        self.words = memoryview(mm)[:HEADER_BYTES].cast("Q")
        if bytes(self.words[:1]) != MAGIC:
            raise ValueError("not a kvd lookup index (bad magic)")
        self.capacity = int(self.words[W_CAPACITY])
        if self.capacity & (self.capacity - 1) or len(mm) < file_bytes(self.capacity):
            raise ValueError(f"lookup index: capacity {self.capacity} does not fit its {len(mm)} bytes")
        self.mask = self.capacity - 1
        self.mask_u64 = np.uint64(self.mask)
        self.tags = np.frombuffer(mm, dtype="<u8", count=self.capacity, offset=HEADER_BYTES)
        self.vals = np.frombuffer(mm, dtype="<u8", count=self.capacity, offset=HEADER_BYTES + 8 * self.capacity)
        if not writable:
            for a in (self.tags, self.vals):
                a.flags.writeable = False

    @property
    def arena_id(self) -> str:
        return bytes(self.words[W_ARENA : W_ARENA + 2]).hex()

    def meta(self) -> dict:
        n = int(self.words[W_META_LEN])
        return json.loads(bytes(self.mm[META_AT : META_AT + n])) if n else {"tiers": [], "sets": []}

    def probe(self, want: np.ndarray, want_bytes: bytes | None = None) -> np.ndarray:
        """The value of each wanted tag (0: not published). A tag is published at most ``max_probe``
        slots past its home, so a probe stops there. (Only meaningful when no write overlapped it:
        the caller checks ``version``.) ``want_bytes``: ``want.tobytes()``, if the caller has it."""
        tags, vals, mask = self.tags, self.vals, self.mask_u64
        pos = want & mask
        t = tags.take(pos)
        if t.tobytes() == (want.tobytes() if want_bytes is None else want_bytes):  # the common answers
            # settle at their home slot: all found...
            return vals.take(pos)  # (take and a bytes compare: half the time of fancy indexing and ==)
        hit = t == want
        done = hit | (t == EMPTY)
        if done.all():  # ...or found or missing there
            return np.where(hit, vals.take(pos), np.uint64(0))
        out = np.where(hit, vals.take(pos), np.uint64(0))
        todo = np.flatnonzero(~done)
        for _ in range(self.words[W_MAX_PROBE]):
            pos[todo] = (pos[todo] + np.uint64(1)) & mask
            p = pos[todo]
            t = tags[p]
            hit = t == want[todo]
            if hit.any():
                out[todo[hit]] = vals[p[hit]]
            todo = todo[~hit & (t != EMPTY)]
            if not todo.size:
                break
        return out


def map_file(path, *, writable: bool) -> tuple[Mapped, int]:
    """The index file at ``path`` (never through a symlink), mapped, and its open fd (the caller keeps
    or closes it); ``OSError`` if it cannot be opened or mapped, ``ValueError`` if it is not an index."""
    fd = os.open(path, (os.O_RDWR if writable else os.O_RDONLY) | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
        return Mapped(mmap.mmap(fd, os.fstat(fd).st_size, mmap.MAP_SHARED, prot), writable=writable), fd
    except BaseException:
        os.close(fd)
        raise


def header(capacity: int, arena_id: str, chunk_tokens: int, *, version: int = 0) -> bytes:
    """The first words of a new index file (the rest of it is zeros: every slot empty)."""
    words = [0] * 13
    words[W_CAPACITY], words[W_CHUNK], words[W_VERSION] = capacity, chunk_tokens, version
    raw = bytearray(struct.pack("<13Q", *words))
    raw[0:8] = MAGIC
    raw[8 * W_ARENA : 8 * W_ARENA + 16] = bytes.fromhex(arena_id)[:16].ljust(16, b"\0")
    return bytes(raw)
