"""How long a full garbage collection stops the daemon, by index size, with and without the freezing of
``kvd.daemon.collector``.

A real ``Store`` (host arena only, a tiny model so that 100K entries fit a sparse arena file) is filled
with N committed prefix entries through ``reserve`` / ``commit``, as engines fill it. Then, per N:

- ``unfrozen_full_ms``: ``gc.collect()`` with the start-up heap frozen and the index not: what every
  automatic full collection cost a daemon whose index was built after start (before this change the
  daemon froze only its start-up heap);
- ``frozen_full_ms``: after ``Collector``'s freeze, 1,000 more entries stored and 1,000 deleted (churn
  since the last full collection), then ``gc.collect()``: what an automatic full collection costs now;
- ``tracked_per_entry``: objects the collector tracks per entry (what a full collection walks).

Best of 3 each. Usage: python benchmarks/notes/gc_pauses.py [--sizes 10000 50000 100000]
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


def best_collect_ms(reps: int = 3) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        gc.collect()
        times.append(1000 * (time.perf_counter() - t0))
    return min(times)


async def measure(n: int, tmp: Path) -> dict:
    cap = (n + 2048) * 2 * SLOT
    settings = load_settings(None, environ={}, overrides={"host": {"capacity_bytes": cap, "slot_bytes": SLOT}})
    pool = ThreadPoolExecutor(2)
    host = HostTier(tmp / f"arena-{n}", cap, SLOT)
    store = Store(settings, [host], metrics=Metrics(), cpu=pool, io=pool)
    fp = store.register_model(P.RegisterModelRequest(model_id="gc-toy", num_layers=1, num_kv_heads=1,
                                                     head_dim=8)).fingerprint
    gc.collect()
    gc.freeze()  # the start-up heap, frozen by the daemon before this change too
    before = len(gc.get_objects())
    await fill(store, fp, n, 0)
    gc.collect()
    tracked = (len(gc.get_objects()) - before) / n
    unfrozen = best_collect_ms()
    m = Metrics()
    c = Collector(m.gc_pauses, m.gc_frozen, full_interval_s=0)
    c.start()  # collects and freezes everything so far, as the daemon does at start and after each full pass
    await fill(store, fp, 1000, n)  # churn since that pass
    store.delete(P.EntriesRequest(hashes=keys(1000, 0)))
    frozen = best_collect_ms()
    c.stop()
    gc.unfreeze()
    host.close()
    pool.shutdown()
    return {"entries": n, "tracked_per_entry": round(tracked, 1), "unfrozen_full_ms": round(unfrozen, 2),
            "frozen_full_ms": round(frozen, 2)}


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
