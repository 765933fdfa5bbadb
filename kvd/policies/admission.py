"""Admission to the SSD tier: write an entry to SSD only once it has proven it is reused.

Every SSD write costs disk bandwidth and flash wear, and most KV is never read again (one-shot
prompts). An entry is admitted once it has been *seen* ``ssd.admit_after`` times — each store or
lookup hit on it counts one, as the store reports them — or when it is pinned. ``admit_after`` 0 or 1
admits everything on first sight.

Sightings are counted here, per key, in a bounded table (``max_tracked`` keys, least recently seen
forgotten first), so an entry evicted from the host tier and stored again keeps its history. The
store may pass its own count instead (``seen=``), e.g. the ``Entry.seen`` it keeps in its index.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable

Key = Hashable


class SsdAdmission:
    """Counts sightings per key and answers whether a key may go to SSD. Refusals are counted by the
    caller, in the daemon's metrics (one counter source)."""

    def __init__(self, admit_after: int, *, max_tracked: int = 1 << 16) -> None:
        if admit_after < 0 or max_tracked <= 0:
            raise ValueError(f"admit_after={admit_after} must be ≥ 0 and max_tracked={max_tracked} > 0")
        self.admit_after = admit_after
        self.max_tracked = max_tracked
        self._seen: OrderedDict[Key, int] = OrderedDict()  # key -> sightings, least recently seen first

    def record(self, key: Key) -> int:
        """Count one sighting (a store of the key, or a lookup hit on it); returns the new count."""
        count = self._seen.pop(key, 0) + 1
        self._seen[key] = count
        if len(self._seen) > self.max_tracked:
            self._seen.popitem(last=False)
        return count

    def seen(self, key: Key) -> int:
        return self._seen.get(key, 0)

    def admit(self, key: Key, *, pinned: bool = False, seen: int | None = None) -> bool:
        """Whether ``key`` may be written to SSD now. ``seen``: the caller's own count, if it keeps one
        (the larger of it and ours is used). Pure: asking changes nothing."""
        return pinned or max(self._seen.get(key, 0), seen or 0) >= self.admit_after

    def forget(self, key: Key) -> None:
        """The entry is gone for good (deleted): drop its history."""
        self._seen.pop(key, None)
