"""Where one SGLang batch get's time goes: kvd's ``PageIO.load`` timed by phase.

``benchmarks/sglang_backend.py`` measures a 64-page get (94 MB of a SmolLM2-shaped ``page_head`` pool)
through SGLang's controller against a one-thread memcpy; this times the same get's phases, wrapping
the functions ``PageIO.load`` calls: the lease RPC (``open_lease``: the daemon's answer and its
parsing), the copies on the backend's copy threads (each page hashed right before its copy:
``Lease._hashes_match`` is timed per page too), and the release RPC. Every get is checked to load all
64 pages; the first three are not timed. Writes ``benchmarks/results/sglang_get_phases.json``.

Usage: python benchmarks/notes/sglang_get_phases.py [--gets 15]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import sglang_backend as SB  # noqa: E402

from tests.daemon_proc import DaemonProc  # noqa: E402

PHASES: dict[str, list[float]] = {}


def timed(name: str, fn):
    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            PHASES.setdefault(name, []).append(time.perf_counter() - t0)
    return wrapper


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gets", type=int, default=15)
    args = ap.parse_args()
    version = SB.import_sglang()
    import kvd.client.transfer as TR
    import kvd.connectors.sglang.io as IO

    IO.open_lease = timed("lease_ms", IO.open_lease)
    IO.PageIO._each = timed("copies_with_hashing_ms", IO.PageIO._each)
    TR.Lease.release = timed("release_ms", TR.Lease.release)
    TR.Lease._hashes_match = timed("hash_one_page_ms", TR.Lease._hashes_match)
    from sglang.srt.managers.cache_controller import PrefetchOperation

    with tempfile.TemporaryDirectory() as tmp:
        daemon = DaemonProc(Path(tmp), env_extra={"KVD_HOST__CAPACITY_BYTES": "1GiB"}).start()
        try:
            c = SB.Controller(SB.make_pool(SB.LAYOUT, num_pages=3 * SB.NUM_PAGES, page_size=SB.P),
                              SB.extra_config(daemon.socket, namespace="bench"))
            pool, cc = c.pool, c.cc
            src, dst = pool.alloc(SB.NUM_PAGES * SB.P), pool.alloc(SB.NUM_PAGES * SB.P)
            SB.fill_random(pool, src, seed=1)
            k = SB.keys(SB.NUM_PAGES)
            assert cc.page_set_func(k, src), "store failed"
            op = PrefetchOperation("bench", [0] * (SB.NUM_PAGES * SB.P))
            for _ in range(3):
                assert cc.page_get_func(op, k, dst) == SB.NUM_PAGES
            assert all(a.equal(b) for a, b in zip(SB.page_bytes(pool, src), SB.page_bytes(pool, dst))), "not bit-exact"
            PHASES.clear()
            for _ in range(args.gets):
                t0 = time.perf_counter()
                assert cc.page_get_func(op, k, dst) == SB.NUM_PAGES
                PHASES.setdefault("get_ms", []).append(time.perf_counter() - t0)
            c.close()
        finally:
            daemon.kill()
    nbytes = SB.NUM_PAGES * SB.P * 30 * 3 * 64 * 2 * 2
    res = {"date": str(date.today()), "script": "benchmarks/notes/sglang_get_phases.py", "sglang_version": version,
           "layout": SB.LAYOUT, "batch_bytes": nbytes, "gets": args.gets, "memcpy_GBps": SB.memcpy_gbps(nbytes),
           **{name: {"median": statistics.median(xs) * 1e3, "min": min(xs) * 1e3, "calls": len(xs)}
              for name, xs in PHASES.items()},
           "hash_pages_sum_ms_median_get": float(np.median(PHASES["hash_one_page_ms"])) * 1e3 * SB.NUM_PAGES}
    res["memcpy_ms"] = nbytes / res["memcpy_GBps"] / 1e6
    out = ROOT / "benchmarks" / "results" / "sglang_get_phases.json"
    out.write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
