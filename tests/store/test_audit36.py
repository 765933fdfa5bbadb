"""Audit 36: crash consistency of the SSD tier and the start-up rebuild (kvd.store.recovery)."""

from __future__ import annotations

import lmdb

from kvd.core import protocol as P
from kvd.daemon.metrics import Metrics
from kvd.store.recovery import recover
from kvd.store.store import Store
from kvd.tiers.host import HostTier
from kvd.tiers.ssd import SsdTier
from tests.store.test_pipeline import World


async def restart_unregistered(w: World) -> int:
    """``World.restart`` as the daemon restarts: the index rebuilt before any engine registers again."""
    await w.store.background.close()
    await w.store.admin.close()
    w.ssd.close()
    w.host.close()
    s = w.settings
    w.host = HostTier(w.tmp_path / "arena", int(s.host.capacity_bytes), int(s.host.slot_bytes))
    w.ssd = SsdTier(w.tmp_path / "ssd", s.ssd)
    w.store = Store(s, [w.host, w.ssd], metrics=Metrics(), cpu=w.cpu, io=w.io, clock=w.clock)
    return await recover(w.store)


async def test_records_are_written_only_once_their_model_registration_is_durable_beside_them(tmp_path, monkeypatch):
    """A registration is persisted beside the records (``model/<fp>``) by a task nobody awaited, once,
    when it first changes: one that failed (a full disk: LMDB's EIO, MapFullError) was never written
    again, the model's records were still written and flushes acknowledged, and the restart dropped
    every one of them as records of an unknown model."""
    real = SsdTier.put_meta
    calls = []

    def failing_once(self, name, value):
        calls.append(name)
        if len(calls) == 1:
            raise lmdb.DiskError("No space left on device")
        return real(self, name, value)

    monkeypatch.setattr(SsdTier, "put_meta", failing_once)
    w = World(tmp_path, ssd={"admit_after": 100})
    try:
        await w.store.admin.close()  # the registration's persist task ran (and failed)
        assert calls and w.ssd.get_meta(calls[0]) is None
        hs, data = await w.store_seq(1, chunks=2)
        done = await w.store.admin.flush(P.FlushRequest(namespace="default", fingerprint=w.fp, hashes=hs))
        assert done == 2  # acknowledged: durably on SSD
        for h in hs:  # on SSD only now
            for lv in w.store.index.memory:
                w.store.pipeline.drop_copies(w.entry(h), lv)
        await w.store.pipeline.drain()
        assert await restart_unregistered(w) == 2
        assert await w.read_back(hs) == (["ok", "ok"], data)
    finally:
        w.close()


def test_compaction_works_when_ssd_path_is_a_mount_point_and_a_failed_swap_leaves_the_tier_open(tmp_path, monkeypatch):
    """Compaction copied the file into a sibling of ``ssd.path`` (``<path>.compact``), then closed the
    environment and renamed the copy over ``data.mdb``. With ``ssd.path`` a mount point (a volume, a
    disk mounted there) the rename crosses filesystems (EXDEV): it failed after the close, and the tier
    stayed closed, every later SSD read and write failing until a restart; under the documented
    ``/nvme/kvd`` deployment (``ReadWritePaths``, a root-owned ``/nvme``) the sibling cannot even be
    made, so ``kvctl compact`` never worked there."""
    import errno
    import os
    from pathlib import Path

    from tests.tiers.test_ssd import get, kv_bytes, make_tier, put

    ssd = tmp_path / "mnt" / "ssd"
    real = os.replace

    def replace_on_one_filesystem(src, dst):  # ``ssd`` is the mount point: nothing crosses it
        if (ssd in Path(src).parents) != (ssd in Path(dst).parents):
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        return real(src, dst)

    monkeypatch.setattr(os, "replace", replace_on_one_filesystem)
    t = make_tier(ssd)
    try:
        locs = [put(t, f"m{i}", kv_bytes(i), "raw") for i in range(6)]
        for loc in locs[:3]:
            t.drop(loc)
        before, after = t.compact()
        assert after < before
        assert [get(t, loc) for loc in locs[3:]] == [kv_bytes(i) for i in range(3, 6)]
        assert sorted(p.name for p in ssd.parent.iterdir()) == ["ssd"]  # nothing left beside it
        put(t, "later", kv_bytes(9), "raw")  # the tier is open and writable
    finally:
        t.close()


def test_a_compaction_that_fails_part_way_leaves_no_partial_copy_behind(tmp_path):
    """A compaction whose copy failed (a full disk: the case ``kvctl compact`` is run for) left its
    partial copy on the disk until the next compaction or restart, taking what room was left."""
    from pathlib import Path

    from tests.tiers.test_ssd import get, kv_bytes, make_tier, put

    t = make_tier(tmp_path / "ssd")

    class FullDisk:  # the environment, whose copy fills the disk part-way
        def __init__(self, env):
            self.env = env

        def __getattr__(self, name):
            return getattr(self.env, name)

        def copy(self, path, compact=False):
            (Path(path) / "data.mdb").write_bytes(b"\0" * (1 << 20))
            raise lmdb.DiskError("No space left on device")

    try:
        loc = put(t, "x", kv_bytes(1), "raw")
        real, t._env = t._env, FullDisk(t._env)
        try:
            t.compact()
            raise AssertionError("the compaction did not fail")
        except lmdb.DiskError:
            pass
        t._env = real
        assert sorted(p.name for p in tmp_path.iterdir()) == ["ssd"]
        assert not (tmp_path / "ssd" / "compact.tmp").exists()
        assert get(t, loc) == kv_bytes(1)
    finally:
        t.close()


def test_compaction_makes_its_copy_durable_before_the_rename_and_the_rename_after(tmp_path, monkeypatch):
    """LMDB's copy writes the new file with O_DIRECT and never fsyncs it (strace: no fsync/fdatasync),
    and the rename was not synced either: a power loss soon after ``kvctl compact`` could leave
    ``data.mdb`` empty or short, every record acknowledged as durable before it lost, and the daemon
    refusing to start on an unreadable file."""
    import os

    from tests.tiers.test_ssd import kv_bytes, make_tier, put

    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", str(src)))
        return real_replace(src, dst)

    t = make_tier(tmp_path / "ssd")
    try:
        put(t, "x", kv_bytes(1), "raw")
        monkeypatch.setattr(os, "fsync", fsync)
        monkeypatch.setattr(os, "replace", replace)
        t.compact()
    finally:
        t.close()
    ssd = tmp_path / "ssd"
    at = events.index(("replace", str(ssd / "compact.tmp" / "data.mdb")))
    assert ("fsync", str(ssd / "compact.tmp" / "data.mdb")) in events[:at]
    assert ("fsync", str(ssd)) in events[at:]


def _dead_pid() -> int:
    import subprocess
    import sys

    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_a_dead_daemons_arena_gives_its_memory_back_although_engines_still_map_it(tmp_path):
    """A daemon killed while engines map its arena: the next daemon unlinked the stale file, but a
    tmpfs file's pages live until its last mapping goes, and engines never unmap it on their own. The
    restarted daemon's arena then did not fit beside it in /dev/shm sized for one (the documented
    ``--shm-size=18g`` for a 16 GiB arena, a Kubernetes ``sizeLimit``): kvd refused to start, blaming
    host.capacity_bytes, until every engine exited. A straggling copy out of the old arena reads zeros,
    and its lease's release fails (the daemon that granted it is gone), so it is never used."""
    import json
    import mmap
    import os

    from kvd.tiers.arena import Arena, _pid_namespace

    path = tmp_path / "arena"
    size = 4 << 20
    with open(path, "wb") as f:  # the dead daemon's arena, every page written
        f.write(b"\x5a" * size)
    (tmp_path / "arena.owner").write_text(json.dumps({"pid": _dead_pid(), "socket": "", "pid_ns": _pid_namespace()}))
    fd = os.open(path, os.O_RDWR)
    engine = mmap.mmap(fd, size)  # an engine's mapping of it, still open
    try:
        assert os.fstat(fd).st_blocks * 512 >= size
        new = Arena(path, size, 1 << 20)
        try:
            assert os.fstat(fd).st_blocks == 0  # the old file's pages are free
            assert engine[:4] == b"\0\0\0\0" and engine[-4:] == b"\0\0\0\0"  # zeros, no SIGBUS
            assert os.stat(path).st_ino != os.fstat(fd).st_ino  # a new file in its place
        finally:
            new.close()
    finally:
        engine.close()
        os.close(fd)


def test_a_stopped_daemons_arena_gives_its_memory_back_although_engines_still_map_it(tmp_path):
    """The same at a graceful stop (``systemctl restart kvd``, an upgrade): the arena was unlinked, its
    pages kept by every engine's mapping, and the next daemon did not fit beside them."""
    import mmap
    import os

    from kvd.tiers.arena import Arena

    size = 4 << 20
    a = Arena(tmp_path / "arena", size, 1 << 20)
    a.view[:] = b"\x5a" * size
    fd = os.open(tmp_path / "arena", os.O_RDWR)
    engine = mmap.mmap(fd, size)
    try:
        a.close()
        assert os.fstat(fd).st_blocks == 0 and engine[:4] == b"\0\0\0\0"
    finally:
        engine.close()
        os.close(fd)
