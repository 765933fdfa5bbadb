"""The record tiers' read buffers (``kvd.tiers.buffers``): reused only once given back, never when still
held, never for a value far smaller, bounded, and blind to buffers it did not hand out."""

from __future__ import annotations

from kvd.tiers.buffers import BufferPool


def test_a_buffer_is_reused_only_after_it_is_given_back():
    pool = BufferPool()
    a = pool.take(1000)
    b = pool.take(1000)
    assert a.obj is not b.obj and len(a) == len(b) == 1000
    pool.give(a)
    c = pool.take(800)  # 800 <= 1000 <= 1600: reused, cut to the size asked
    assert c.obj is a.obj and len(c) == 800
    d = pool.take(800)  # nothing free any more
    assert d.obj is not a.obj and d.obj is not b.obj


def test_no_reuse_for_a_value_under_half_the_buffer_or_over_it():
    pool = BufferPool()
    big = pool.take(4096)
    pool.give(big)
    assert pool.take(1000).obj is not big.obj  # would hold 4x the bytes asked
    assert pool.take(5000).obj is not big.obj  # too small
    assert pool.take(3000).obj is big.obj


def test_bounded_and_foreign_objects_ignored():
    pool = BufferPool(max_buffers=2, max_bytes=3000)
    views = [pool.take(1000) for _ in range(4)]
    for v in views:
        pool.give(v)
    kept = {id(pool.take(1000).obj) for _ in range(4)}
    assert len(kept & {id(v.obj) for v in views}) == 2  # two kept (count bound), the rest new
    pool = BufferPool(max_buffers=8, max_bytes=2500)
    for v in [pool.take(1000) for _ in range(3)]:
        pool.give(v)
    assert len(pool._free) == 2  # the byte bound: a third 1000-byte buffer would pass 2500
    pool.give(b"bytes from elsewhere")
    pool.give(memoryview(b"read-only bytes"))
    assert len(pool._free) == 2
