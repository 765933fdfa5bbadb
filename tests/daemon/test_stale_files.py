"""What a daemon leaves behind, and what the next one removes: stale arenas of dead daemons go with
everything beside them, and nothing of a live daemon goes, wherever that daemon runs."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess

import pytest

from kvd.client import prefix as kvio
from kvd.core.keys import ModelSpec
from tests.daemon_proc import DaemonProc

SPEC = ModelSpec("toy", num_layers=2, num_kv_heads=2, head_dim=32, kv_dtype="bfloat16")


def _unshare_works() -> bool:
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return False
    return subprocess.run(["unshare", "--pid", "--fork", "true"], capture_output=True).returncode == 0


def test_kill_9_leftovers_include_the_lookup_index(tmp_path):
    """remove_stale took the arena, its owner record and socket, but left ``<arena>.index`` (memory in
    /dev/shm) behind for good."""
    shm = tmp_path / "shm"
    shm.mkdir()
    arena = shm / f"kvd-{os.getuid()}-a.arena"
    (tmp_path / "a").mkdir()
    a = DaemonProc(tmp_path / "a", env_extra={"KVD_HOST__PATH": str(arena)}).start()
    a.proc.send_signal(signal.SIGKILL)
    a.proc.wait()
    assert os.path.exists(f"{arena}.index")
    (tmp_path / "b").mkdir()
    b = DaemonProc(tmp_path / "b", env_extra={"KVD_HOST__PATH": str(shm / f"kvd-{os.getuid()}-b.arena")}).start()
    try:
        assert sorted(p.name for p in shm.iterdir() if "-a." in p.name) == []
    finally:
        assert b.stop() == 0


@pytest.mark.skipif(not _unshare_works(), reason="needs root and unshare --pid")
def test_a_live_daemon_in_another_pid_namespace_keeps_its_arena(tmp_path):
    """Two daemons sharing /dev/shm from two PID namespaces (containers with --ipc=host): the second
    saw the first's pid as dead in its own namespace and deleted the live daemon's arena and owner
    record, so no new client of the first could map it."""
    shm = tmp_path / "shm"
    shm.mkdir()
    arena = shm / f"kvd-{os.getuid()}-a.arena"
    (tmp_path / "a").mkdir()
    a = DaemonProc(tmp_path / "a", env_extra={"KVD_HOST__PATH": str(arena)}).start()
    (tmp_path / "b").mkdir()
    b = DaemonProc(tmp_path / "b", env_extra={"KVD_HOST__PATH": str(shm / f"kvd-{os.getuid()}-b.arena")},
                   wrapper=["unshare", "--pid", "--kill-child"])
    try:
        b.start()
        assert arena.exists() and os.path.exists(f"{arena}.owner")
        with a.client() as c:  # a new client of the first daemon maps its arena
            kvio.register(c, SPEC, namespace="ns")
            assert c.arena_info.path == str(arena)
    finally:
        b.kill()  # unshare forwards no SIGTERM; --kill-child takes the daemon with it
        assert a.stop() == 0
    assert not arena.exists()  # the first removes its own files when it stops
