"""``kvctl flush`` with a progress bar: flush host-only entries to SSD in batches and show the count."""

from __future__ import annotations

import sys
from itertools import groupby

from kvd.client.client import KvdClient
from kvd.core import protocol as P

BATCH = 64


def bar(done: int, total: int, width: int = 30) -> str:
    frac = done / total if total else 1.0
    filled = int(frac * width)
    return f"[{'#' * filled}{'.' * (width - filled)}] {done}/{total} ({frac:.0%})"


def flush_with_progress(c: KvdClient, req: P.FlushRequest, *, quiet: bool = False) -> P.CountResponse:
    """List host entries not yet on SSD, then flush them batch by batch, drawing a bar on stderr."""
    listing = c.entries(model=req.fingerprint, namespace=req.namespace, tier="host", limit=1_000_000)
    todo = sorted((e.namespace, e.fingerprint, e.hash) for e in listing.entries if "ssd" not in e.tiers)
    done = 0
    show = not quiet and sys.stderr.isatty()
    for (ns, fp), group in groupby(todo, key=lambda k: k[:2]):
        hashes = [k[2] for k in group]
        for i in range(0, len(hashes), BATCH):
            r = c.flush(P.FlushRequest(namespace=ns, fingerprint=fp, hashes=hashes[i : i + BATCH]))
            done += r.count
            if show:
                print("\r" + bar(done, len(todo)), end="", file=sys.stderr, flush=True)
    if show:
        print(file=sys.stderr)
    return P.CountResponse(count=done)
