"""The client's mapping of the arena: with ``populate`` every page is mapped when the arena is mapped,
so reading or writing it later takes no page faults (an engine's first loads); without, pages map on
first touch; a kernel that cannot populate leaves a working mapping that maps on first touch."""

from __future__ import annotations

import resource

import numpy as np
import pytest

from kvd.client import arena as arena_mod
from kvd.client.arena import ArenaMapping
from kvd.connectors.vllm.settings import ConnectorSettings, open_session
from kvd.core.keys import ModelSpec
from kvd.core.protocol import ArenaInfo

SIZE = 32 << 20


@pytest.fixture
def info(tmp_path):
    path = tmp_path / "arena"
    with open(path, "wb") as f:
        f.truncate(SIZE)
    return ArenaInfo(path=str(path), capacity_bytes=SIZE, slot_bytes=1 << 20, arena_id="a1")


def faults_reading(m: ArenaMapping) -> int:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    assert int(np.frombuffer(m.buffer, dtype=np.uint64)[::512].sum()) == 0  # one read per 4 KiB page
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


def kernel_populates(info) -> bool:
    """MADV_POPULATE_READ is Linux 5.14+; an older kernel answers EINVAL (the mapping then maps lazily)."""
    import mmap

    with open(info.path, "r+b") as f, mmap.mmap(f.fileno(), 4096) as m:
        try:
            m.madvise(arena_mod.MADV_POPULATE_READ)
        except OSError:
            return False
    return True


def test_populated_mapping_reads_without_faults_and_an_unpopulated_one_faults(info):
    if not kernel_populates(info):
        pytest.skip("this kernel has no MADV_POPULATE_READ (Linux < 5.14): the fallback test covers it")
    lazy = ArenaMapping(info, register_cuda=False)
    assert lazy.populate_s is None
    assert faults_reading(lazy) > SIZE // 4096 // 32  # fault-around maps up to 16 pages per fault
    lazy.close()
    eager = ArenaMapping(info, register_cuda=False, populate=True)
    assert eager.populate_s is not None and eager.populate_s > 0
    assert faults_reading(eager) < 8
    eager.buffer[:4] = b"kvd!"  # writable, and the file sees it
    eager.close()
    with open(info.path, "rb") as f:
        assert f.read(4) == b"kvd!"


def test_a_kernel_that_cannot_populate_leaves_a_working_mapping(info, monkeypatch):
    monkeypatch.setattr(arena_mod, "MADV_POPULATE_READ", 0x7FFF)  # no such advice: EINVAL
    m = ArenaMapping(info, register_cuda=False, populate=True)
    assert m.populate_s is None
    assert faults_reading(m) > 0
    m.close()


def test_vllm_populates_the_workers_mapping_only_and_only_when_asked():
    spec = ModelSpec("m", num_layers=1, num_kv_heads=1, head_dim=8, kv_dtype="bfloat16")
    on, off = ConnectorSettings(populate_arena=True), ConnectorSettings()
    assert open_session(on, spec, None, block_size=16, role="worker").client.populate_arena
    assert not open_session(on, spec, None, block_size=16, role="scheduler").client.populate_arena
    assert not open_session(off, spec, None, block_size=16, role="worker").client.populate_arena


def test_a_client_never_maps_a_newer_arena_file_under_an_older_arena_id(tmp_path):
    """A daemon answers arena X, dies, and its successor recreates the file at the same path before the
    client opens it: the client must refuse the mapping (X's offsets would land on the successor's
    entries), not label the successor's file X. The daemon's own arena says which file is X's."""
    from kvd.core.errors import DaemonUnavailable
    from kvd.tiers.arena import Arena

    path = tmp_path / "kvd.arena"
    first = Arena(path, SIZE, 1 << 20)
    info = ArenaInfo(path=str(path), capacity_bytes=first.capacity_bytes, slot_bytes=first.slot_bytes,
                     arena_id=first.arena_id, file_id=first.file_id)
    ArenaMapping(info, register_cuda=False).close()  # the file named: mapped
    replaced = tmp_path / "successor"
    with open(replaced, "wb") as f:  # the successor's file, same size, renamed into place as Arena does
        f.truncate(SIZE)
    replaced.replace(path)
    with pytest.raises(DaemonUnavailable, match="not the file of arena"):
        ArenaMapping(info, register_cuda=False)
    first.close()
