"""Fakes implementing kvd's real interfaces, for scenario tests."""

from __future__ import annotations

from collections import OrderedDict


class FakeClock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, dt: float) -> None:
        self.t += dt


class RecordingLru:
    """A plain LRU with the EvictionPolicy interface that records what it was told."""

    def __init__(self) -> None:
        self.order: OrderedDict = OrderedDict()
        self.removed: list = []

    def on_insert(self, key, meta) -> None:
        self.order[key] = meta.nbytes

    def on_access(self, key, now: float) -> None:
        self.order.move_to_end(key)

    def on_remove(self, key) -> None:
        self.order.pop(key, None)
        self.removed.append(key)

    def victims(self, nbytes_needed: int, *, now: float, can_evict) -> list:
        out, total = [], 0
        for key, n in self.order.items():
            if total >= nbytes_needed:
                break
            if can_evict(key):
                out.append(key)
                total += n
        return out
