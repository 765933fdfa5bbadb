"""How long Python's automatic full garbage collections stop the daemon, by index size, before and after
``kvd.daemon.collector``.

A real ``Store`` (host arena only, a tiny model so that 100K entries fit a sparse arena file) is filled
with N committed prefix entries through ``reserve`` / ``commit``, as engines fill it, with the start-up
heap frozen (what the daemon did before). Then N/2 more entries are stored and as many of the oldest
deleted (churn), twice: first as before (``before``: only the start-up heap frozen), then with the
``Collector`` installed (``after``). During each churn every automatic full collection (generation 2)
is timed by a ``gc`` callback: how many, the longest and their total. Also: ``maintenance_ms``, the
periodic full pass over everything (``daemon.gc_full_interval_s``) at that size, and the tracked
objects per entry (what a full collection walks).

Usage: python benchmarks/notes/gc_pauses.py [--sizes 10000 50000 100000]
Writes benchmarks/results/gc_pauses.json.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from kvd.core import protocol as P  # noqa: E402
from kvd.core.config import load_settings  # noqa: E402
from kvd.core.keys import prefix_hashes  # noqa: E402
from kvd.daemon.collector import Collector  # noqa: E402
from kvd.daemon.metrics import Metrics  # noqa: E402
from kvd.store.store import Store  # noqa: E402
from kvd.tiers.host import HostTier  # noqa: E402

SLOT = 4096  # a toy entry: 1 layer x 1 KV head x 8 dims x 256 tokens x K,V x bf16 = 8 KiB = 2 slots


def keys(n: int, start: int) -> list[str]:
    return prefix_hashes(list(range(start * 256, (start + n) * 256)), chunk_tokens=256, namespace="default",
                         fingerprint="gc")


async def fill(store: Store, fp: str, n: int, start: int) -> None:
    for i in range(0, n, 512):
        hs = keys(min(512, n - i), start + i)
        r = await store.reserve(P.ReserveRequest(fingerprint=fp, entries=[
            P.ReserveEntry(hash=h, num_tokens=256, start_token=0) for h in hs]))
        await store.commit(P.CommitRequest(reservation_id=r.reservation_id))


class Pauses:
    """Automatic full collections while active: (seconds) each."""

    def __init__(self) -> None:
        self.full: list[float] = []
        self.on = False
        self._t0 = 0.0

    def __call__(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._t0 = time.perf_counter()
        elif self.on and info["generation"] == 2:
            self.full.append(time.perf_counter() - self._t0)

    def summary(self) -> dict:
        return {"full_collections": len(self.full), "longest_ms": round(1000 * max(self.full, default=0), 2),
                "total_ms": round(1000 * sum(self.full), 2)}


async def churn(store: Store, fp: str, n: int, first_new: int, first_old: int, pauses: Pauses) -> dict:
    pauses.full.clear()
    pauses.on = True
    for i in range(0, n, 512):
        k = min(512, n - i)
        await fill(store, fp, k, first_new + i)
        store.delete(P.EntriesRequest(hashes=keys(k, first_old + i)))
    pauses.on = False
    return pauses.summary()


async def measure(n: int, tmp: Path) -> dict:
    cap = (2 * n + 2048) * 2 * SLOT
    settings = load_settings(None, environ={}, overrides={"host": {"capacity_bytes": cap, "slot_bytes": SLOT}})
    pool = ThreadPoolExecutor(2)
    host = HostTier(tmp / f"arena-{n}", cap, SLOT)
    store = Store(settings, [host], metrics=Metrics(), cpu=pool, io=pool)
    fp = store.register_model(P.RegisterModelRequest(model_id="gc-toy", num_layers=1, num_kv_heads=1,
                                                     head_dim=8)).fingerprint
    gc.collect()
    gc.freeze()  # the start-up heap, as the daemon froze it before this change too
    before = len(gc.get_objects())
    await fill(store, fp, n, 0)
    tracked = (len(gc.get_objects()) - before) / n
    pauses = Pauses()
    gc.callbacks.append(pauses)
    half = n // 2
    old = await churn(store, fp, half, n, 0, pauses)
    m = Metrics()
    c = Collector(m.gc_pauses, m.gc_frozen, full_interval_s=0)
    t0 = time.perf_counter()
    c.start()  # the full pass over everything: what maintenance costs at this size
    maintenance = time.perf_counter() - t0
    new = await churn(store, fp, half, n + half, half, pauses)
    c.stop()
    gc.callbacks.remove(pauses)
    gc.unfreeze()
    host.close()
    pool.shutdown()
    return {"entries": n, "churned": half, "tracked_per_entry": round(tracked, 1), "before": old, "after": new,
            "maintenance_ms": round(1000 * maintenance, 1)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 50_000, 100_000])
    args = ap.parse_args()
    res = {"date": str(date.today()), "script": "benchmarks/notes/gc_pauses.py", "cores": os.cpu_count(),
           "python": sys.version.split()[0], "runs": []}
    with tempfile.TemporaryDirectory(prefix="kvd-gc-") as tmp:
        for n in args.sizes:
            r = asyncio.run(measure(n, Path(tmp)))
            print(r, flush=True)
            res["runs"].append(r)
    (ROOT / "benchmarks" / "results" / "gc_pauses.json").write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
