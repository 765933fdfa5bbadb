"""Progress bars for kvctl's long commands (tqdm, on stderr, so stdout stays clean for ``--json``).

- ``flush``: host-tier entries not yet on SSD are listed, then flushed batch by batch; the bar counts
  their bytes, with rate and ETA.
- ``compact``: one daemon call that rewrites the SSD tier's file; the bar's total is the tier's size
  before, its clock runs while the daemon works, and it completes with the call (the daemon reports
  no progress inside a compaction, so there is no ETA before it ends).

Bars show on a terminal (``auto``), always (``always``: logs, tests) or never.
"""

from __future__ import annotations

import sys
import threading
from itertools import groupby

from tqdm import tqdm

from kvd.client.client import KvdClient
from kvd.core import protocol as P

BATCH_ENTRIES = 64
BATCH_BYTES = 256 << 20  # one flush call moves at most this much (one entry may be larger)
REFRESH_S = 0.2


def bar(total: float, desc: str, mode: str, *, unit: str = "B") -> tqdm:
    """A tqdm bar in bytes (``unit="B"``, scaled 1024) or counts; ``mode``: auto / always / never."""
    disable = {"always": False, "never": True}.get(mode)  # None: tqdm shows it only on a terminal
    return tqdm(total=total, desc=desc, unit=unit, unit_scale=True, unit_divisor=1024 if unit == "B" else 1000,
                file=sys.stderr, disable=disable, dynamic_ncols=True, leave=True)


def _batches(entries: list[P.EntryInfo]) -> list[list[P.EntryInfo]]:
    out: list[list[P.EntryInfo]] = []
    key = lambda e: (e.namespace, e.fingerprint)  # noqa: E731 - one flush call takes one model and namespace
    for _, group in groupby(sorted(entries, key=key), key=key):
        cur: list[P.EntryInfo] = []
        for e in group:
            if cur and (len(cur) == BATCH_ENTRIES or sum(x.nbytes for x in cur) + e.nbytes > BATCH_BYTES):
                out.append(cur)
                cur = []
            cur.append(e)
        out.append(cur)
    return out


def flush(c: KvdClient, namespace: str | None, fingerprint: str | None, mode: str) -> tuple[int, int, int]:
    """Flush host entries not yet on SSD. Returns (entries flushed, entries asked, bytes asked)."""
    listing = c.entries(model=fingerprint, namespace=namespace, tier="host", limit=1_000_000)
    todo = [e for e in listing.entries if "ssd" not in e.tiers]
    total = sum(e.nbytes for e in todo)
    done = 0
    with bar(total, "flush to ssd", mode) as b:
        for batch in _batches(todo):
            r = c.flush(P.FlushRequest(namespace=batch[0].namespace, fingerprint=batch[0].fingerprint,
                                       hashes=[e.hash for e in batch]))
            done += r.count
            b.update(sum(e.nbytes for e in batch))
    return done, len(todo), total


def compact(c: KvdClient, mode: str) -> int:
    """Compact the SSD tier; returns the bytes the daemon reports reclaimed."""
    before = next((t.used_bytes for t in c.stats().tiers if t.name == "ssd"), 0)
    result: list[P.CountResponse | BaseException] = []

    def call() -> None:
        try:
            result.append(c.compact())
        except BaseException as e:  # noqa: BLE001 - handed to the main thread, re-raised there
            result.append(e)

    worker = threading.Thread(target=call, name="kvctl-compact", daemon=True)
    with bar(before, "compact ssd", mode) as b:
        worker.start()
        while worker.is_alive():
            worker.join(REFRESH_S)
            b.refresh()  # the clock and rate move while the daemon works
        if isinstance(result[0], BaseException):
            raise result[0]
        b.update(before)
    return result[0].count
