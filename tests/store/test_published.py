"""The shared lookup index file: the daemon's writer (``kvd.store.published.IndexWriter``) against a dict
of what it was told, read back through the client's probe (``kvd.core.index_file.Mapped``) from a
separate read-only mapping, across growth, tombstones, tag collisions and the file's hand-over states."""

from __future__ import annotations

import mmap
import os
import random
import stat

import numpy as np
import pytest

from kvd.core import index_file as F
from kvd.core.errors import ConfigError
from kvd.store.published import IndexWriter, index_path

ARENA_ID = "ab" * 16


@pytest.fixture
def arena(tmp_path):
    p = tmp_path / "kvd.arena"
    p.write_bytes(b"\0" * 4096)
    os.chmod(p, 0o640)
    return p


def reader(path) -> F.Mapped:
    fd = os.open(path, os.O_RDONLY)
    try:
        return F.Mapped(mmap.mmap(fd, os.fstat(fd).st_size, mmap.MAP_SHARED, mmap.PROT_READ), writable=False)
    finally:
        os.close(fd)


def key(rng: random.Random, ns: str = "ns") -> tuple[str, str, str]:
    return (ns, "fp", f"{rng.getrandbits(128):032x}")


def published(m: F.Mapped, keys) -> dict:
    """What a reader finds of ``keys``: key -> value (0 left out)."""
    out = {}
    for ns in {k[0] for k in keys}:
        ks = [k for k in keys if k[0] == ns]
        vals = m.probe(F.tags_of(F.salt(ns, "fp"), [k[2] for k in ks]))
        out |= {k: int(v) for k, v in zip(ks, vals, strict=True) if v}
    return out


def test_random_changes_read_back_exactly_through_growth_and_tombstones(arena):
    rng = random.Random(7)
    w = IndexWriter(index_path(arena), arena_id=ARENA_ID, chunk_tokens=256, like=arena, capacity=16)
    first = reader(w.path)
    truth: dict = {}
    keys = [key(rng, ns) for ns in ("a", "b") for _ in range(1500)]
    for i, k in enumerate(keys):
        val = F.pack_val(i % 3, i % 5, i % 2 == 0, 256 + i)
        w.set(k, F.tag_of(F.salt(k[0], k[1]), k[2]), val)
        truth[k] = val
        if i % 3 == 0:  # remove one at random, and change another's value
            gone = keys[rng.randrange(i + 1)]
            if gone in truth:
                w.remove(gone, F.tag_of(F.salt(gone[0], "fp"), gone[2]))
                del truth[gone]
            again = keys[rng.randrange(i + 1)]
            if again in truth:
                truth[again] = F.pack_val(1, 1, True, 7)
                w.set(again, F.tag_of(F.salt(again[0], "fp"), again[2]), truth[again])
    m = reader(w.path)
    assert m.capacity > 16, "the table grew"
    assert int(first.words[F.W_STATE]) == F.MOVED, "the first file told its readers it was replaced"
    assert int(m.words[F.W_STATE]) == F.OPEN and int(m.words[F.W_VERSION]) % 2 == 0
    assert published(m, keys) == truth
    assert int(m.words[F.W_COUNT]) == len(truth)
    assert int(m.words[F.W_COUNT]) + int(m.words[F.W_TOMBS]) <= m.capacity // 2


def _insert_one_by_one(tags: list[int], mask: int) -> dict[int, int]:
    """The reference: each tag, in order of home slot, at the first free slot from its home (wrapping)."""
    taken, out = set(), {}
    for t in sorted(tags, key=lambda t: t & mask):
        i = t & mask
        while i in taken:
            i = (i + 1) & mask
        taken.add(i)
        out[t] = i
    return out


@pytest.mark.parametrize("case", ["random", "clustered", "wraps", "full_half", "empty"])
def test_placing_all_tags_at_once_equals_inserting_them_one_by_one(case):
    """``F.place`` (the rebuild's vectorized placement) against inserting tags one at a time, including
    runs that cross the last slot; every tag is then found by a reader's probe within the max probe."""
    rng = np.random.default_rng(3)
    bits = 10
    mask = (1 << bits) - 1
    n = {"random": 300, "clustered": 200, "wraps": 120, "full_half": 512, "empty": 0}[case]
    tags = rng.integers(1 << 20, 1 << 62, size=n, dtype=np.int64).astype(np.uint64) | np.uint64(1 << 63)
    if case == "clustered":  # a few homes only: long runs
        tags = (tags & ~np.uint64(mask)) | rng.choice([5, 6, 300, 301], size=n).astype(np.uint64)
    if case == "wraps":  # homes in the last slots: the run wraps past the end
        tags = (tags & ~np.uint64(mask)) | rng.choice([mask - 3, mask - 1, mask, 0, 2], size=n).astype(np.uint64)
    tags = np.unique(tags)
    slots, probe = F.place(tags, mask)
    want = _insert_one_by_one(tags.tolist(), mask)
    assert dict(zip(tags.tolist(), slots.tolist())) == want
    table = np.zeros(mask + 1, dtype=np.uint64)
    table[slots] = tags
    assert probe == max(((s - t) & mask for t, s in want.items()), default=0)
    for t in tags.tolist():  # a reader's probe: from home, no empty slot before the tag, within probe
        i, steps = t & mask, 0
        while int(table[i]) != t:
            assert table[i] != F.EMPTY and steps < probe
            i, steps = (i + 1) & mask, steps + 1


def test_a_rebuild_keeps_every_published_value_and_the_max_probe(arena):
    rng = random.Random(11)
    w = IndexWriter(index_path(arena), arena_id=ARENA_ID, chunk_tokens=256, like=arena, capacity=64)
    keys = [key(rng) for _ in range(200)]
    truth = {}
    for i, k in enumerate(keys):  # grows 64 -> 128 -> 256 -> 512 -> 1024 slots on the way
        truth[k] = F.pack_val(1, 2, True, 256 + i)
        w.set(k, F.tag_of(F.salt(k[0], k[1]), k[2]), truth[k])
    for k in keys[::3]:
        w.remove(k, F.tag_of(F.salt(k[0], k[1]), k[2]))
        del truth[k]
    w._rebuild()  # the same size, without tombstones
    m = reader(w.path)
    assert m.words[F.W_TOMBS] == 0 and m.words[F.W_COUNT] == len(truth)
    assert published(m, keys) == truth
    w.close()


def test_the_same_hash_in_two_namespaces_are_two_keys(arena):
    w = IndexWriter(index_path(arena), arena_id=ARENA_ID, chunk_tokens=256, like=arena)
    h = "0f" * 16
    w.set(("a", "fp", h), F.tag_of(F.salt("a", "fp"), h), F.pack_val(0, 0, True, 256))
    m = reader(w.path)
    assert published(m, [("a", "fp", h), ("b", "fp", h)]) == {("a", "fp", h): F.pack_val(0, 0, True, 256)}


def test_a_tag_two_keys_share_says_ask_the_daemon(arena):
    """Two keys whose tags collide (forced here) are never answered from the file: V_ASK, until one goes."""
    w = IndexWriter(index_path(arena), arena_id=ARENA_ID, chunk_tokens=256, like=arena)
    a, b, tag = ("ns", "fp", "01" * 16), ("ns", "fp", "02" * 16), F.tag_of(F.salt("ns", "fp"), "01" * 16)
    w.set(a, tag, F.pack_val(0, 0, True, 256))
    w.set(b, tag, F.pack_val(0, 0, True, 128))
    m = reader(w.path)
    [v] = m.probe(np.array([tag], dtype=np.uint64))
    assert int(v) & F.V_ASK
    w.remove(a, tag)
    [v] = m.probe(np.array([tag], dtype=np.uint64))
    assert int(v) == F.pack_val(0, 0, True, 128)


def test_the_file_copies_the_arenas_mode_and_is_closed_and_removed_at_stop(arena):
    w = IndexWriter(index_path(arena), arena_id=ARENA_ID, chunk_tokens=256, like=arena)
    st = os.stat(w.path)
    assert stat.S_IMODE(st.st_mode) == 0o640 and st.st_gid == os.stat(arena).st_gid
    m = reader(w.path)
    assert m.arena_id == ARENA_ID and int(m.words[F.W_CHUNK]) == 256
    w.close()
    assert int(m.words[F.W_STATE]) == F.CLOSED and not w.path.exists()


def test_a_killed_daemons_index_is_told_closed_and_replaced_never_a_foreign_file(arena):
    path = index_path(arena)
    old = IndexWriter(path, arena_id=ARENA_ID, chunk_tokens=256, like=arena)
    m = reader(path)
    new = IndexWriter(path, arena_id="cd" * 16, chunk_tokens=256, like=arena)  # the next daemon, old never closed
    assert int(m.words[F.W_STATE]) == F.CLOSED
    assert reader(path).arena_id == "cd" * 16
    del old, new
    path.unlink()
    path.write_bytes(b"not ours" * 1000)
    with pytest.raises(ConfigError, match="not a kvd lookup index"):
        IndexWriter(path, arena_id=ARENA_ID, chunk_tokens=256, like=arena)
    path.unlink()
    path.symlink_to(arena)
    with pytest.raises(ConfigError, match="not a regular file"):
        IndexWriter(path, arena_id=ARENA_ID, chunk_tokens=256, like=arena)


def test_a_reader_that_checks_the_version_never_accepts_a_torn_answer(arena):
    """The seqlock the client relies on, under a writer thread that keeps adding, changing and removing
    rows (and growing the table) with the GIL switching every microsecond: every answer a reader
    accepts (even ``version`` before, the same after) gives each key its own value or nothing."""
    import sys
    import threading

    w = IndexWriter(index_path(arena), arena_id=ARENA_ID, chunk_tokens=256, like=arena, capacity=64)
    rng = random.Random(3)
    keys = [key(rng) for _ in range(96)]
    salt = F.salt("ns", "fp")
    tags = F.tags_of(salt, [k[2] for k in keys])
    stop = threading.Event()

    def write() -> None:
        r = random.Random(4)
        while not stop.is_set():
            i = r.randrange(len(keys))
            if r.random() < 0.5:
                w.set(keys[i], int(tags[i]), F.pack_val(r.randrange(3), 0, True, i))  # tokens name the key
            else:
                w.remove(keys[i], int(tags[i]))

    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    t = threading.Thread(target=write)
    t.start()
    accepted = rejected = 0
    try:
        m = reader(w.path)
        deadline = __import__("time").monotonic() + 2.0
        while __import__("time").monotonic() < deadline:
            if int(m.words[F.W_STATE]) == F.MOVED:
                m = reader(w.path)
            v = int(m.words[F.W_VERSION])
            vals = m.probe(tags)
            if v & 1 or int(m.words[F.W_VERSION]) != v:
                rejected += 1
                continue
            accepted += 1
            for i, x in enumerate(vals.tolist()):
                assert x == 0 or (x & F.V_PRESENT and x >> 32 == i), (i, hex(x))
    finally:
        stop.set()
        t.join()
        sys.setswitchinterval(old)
    assert accepted > 100, (accepted, rejected)
