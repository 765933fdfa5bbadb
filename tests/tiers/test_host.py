import pytest

from kvd.core.errors import ConfigError
from kvd.tiers.host import HostTier, SlotAllocator


def test_allocator_scenario_best_fit_and_coalescing():
    a = SlotAllocator(8)
    assert a.allocate(3) == 0  # [0,3)
    assert a.allocate(2) == 3  # [3,5)
    a.free(0, 3)  # free runs: [0,3) and [5,8)
    assert a.largest_free_run() == 3
    assert a.allocate(3) == 0  # best fit, lower start wins the tie
    a.free(0, 3)
    a.free(3, 2)  # coalesces everything back
    assert a.largest_free_run() == 8 and a.used_slots == 0
    assert a.allocate(9) is None
    assert a.allocate(8) == 0 and a.allocate(1) is None


def test_allocator_fragmentation_returns_none_without_change():
    a = SlotAllocator(6)
    starts = [a.allocate(1) for _ in range(6)]
    for s in starts[::2]:
        a.free(s, 1)
    assert a.used_slots == 3 and a.allocate(2) is None and a.used_slots == 3
    a.free(1, 1)  # [0,3) free now
    assert a.allocate(3) == 0


def test_double_free_is_caught():
    a = SlotAllocator(4)
    s = a.allocate(2)
    a.free(s, 2)
    with pytest.raises(AssertionError):
        a.free(s, 2)


def test_arena_write_read_and_accounting(tmp_path):
    t = HostTier(tmp_path / "arena", 1 << 20, 64 << 10)
    assert t.num_slots == 16
    loc = t.reserve(100_000)
    assert loc.nbytes == 2 * (64 << 10) and loc.offset % (64 << 10) == 0
    t.write(loc, b"x" * 100_000)
    assert bytes(t.read(loc)[:100_000]) == b"x" * 100_000
    assert t.stats().used_bytes == 128 << 10
    # the file is shared: another mapping sees the bytes
    import mmap

    with open(tmp_path / "arena", "r+b") as f, mmap.mmap(f.fileno(), 0) as m:
        assert m[loc.offset : loc.offset + 3] == b"xxx"
    t.drop(loc)
    assert t.stats().used_bytes == 0
    t.close()
    assert not (tmp_path / "arena").exists()


def test_arena_rejects_bad_sizes(tmp_path):
    with pytest.raises(ConfigError, match="slot_bytes"):
        HostTier(tmp_path / "a", 1 << 20, 1000)
