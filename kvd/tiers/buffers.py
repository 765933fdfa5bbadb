"""Reusable read buffers for the record tiers (remote, SSD).

A record read out of a tier lands in a buffer of a few MB, which the promotion decodes into the arena
and then drops. A fresh buffer of that size costs a page fault per 4 KiB page on first touch; profiled
during a remote restore, allocating it took more of the I/O threads' time than receiving into it.
So a tier takes its read buffers from a ``BufferPool``, and the promotion gives each back
(``Tier.recycle``) once the decode that read it has finished; the next read of a similar size reuses it.

Only what the pool handed out comes back into it: ``give`` ignores anything that is not a view of a
``bytearray`` (e.g. the ``bytes`` redis-py returns), and a caller that never gives a buffer back just
lets it be collected.
"""

from __future__ import annotations

import threading

# At most kept for reuse: a few restores' worth of records, held by the daemon while idle.
MAX_BUFFERS = 32
MAX_BYTES = 64 << 20


class BufferPool:
    def __init__(self, *, max_buffers: int = MAX_BUFFERS, max_bytes: int = MAX_BYTES) -> None:
        self.max_buffers, self.max_bytes = max_buffers, max_bytes
        self._free: list[bytearray] = []
        self._lock = threading.Lock()

    def take(self, n: int) -> memoryview:
        """A writable view of exactly ``n`` bytes: of a free buffer of ``n`` to ``2n`` bytes, else of a new one.
        The most recently given back first: its bytes are the likeliest to be in the CPU's caches."""
        with self._lock:
            for i in range(len(self._free) - 1, -1, -1):
                if n <= len(self._free[i]) <= 2 * n:
                    return memoryview(self._free.pop(i))[:n]
        return memoryview(bytearray(n))

    def give(self, value) -> None:
        """``value`` (from ``take``, or a slice of it) is read no more: its buffer may serve a later ``take``."""
        buf = value.obj if isinstance(value, memoryview) else None
        if not isinstance(buf, bytearray):
            return
        with self._lock:
            if len(self._free) < self.max_buffers and sum(map(len, self._free)) + len(buf) <= self.max_bytes:
                self._free.append(buf)
