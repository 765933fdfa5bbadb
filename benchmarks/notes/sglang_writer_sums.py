"""SGLang batch set with and without the writer's checksums (``Reservation.written``), in one process.

``benchmarks/sglang_backend.py``'s set (64 SmolLM2 pages, 92 MiB, SGLang's own controller page
functions, a real daemon), timed alternately with the backend hashing each page on its copy threads
right after copying it (the commit carries the digests) and with ``written`` made a no-op (the daemon
hashes every extent at commit, as before). Alternating in one process keeps this VM's speed changes
out of the comparison. Each set's steps are timed too: the reserve, the copies (with the writer's
hashing, when on) and the commit call; a single-thread memcpy of the batch's bytes in the same run
is the ceiling. Checked before timing: pages stored with the writer's checksums load back bit-exact.

Usage: python benchmarks/notes/sglang_writer_sums.py [--reps 30] -> benchmarks/results/sglang_backend.writer_sums.json
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

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import sglang_backend as B  # noqa: E402

from tests.connectors.sglang.conftest import extra_config  # noqa: E402
from tests.connectors.sglang.sglang_env import Controller, fill_random, import_sglang, make_pool, page_bytes  # noqa: E402
from tests.daemon_proc import DaemonProc  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=30)
    args = ap.parse_args()
    version = import_sglang()
    from kvd.client import transfer as T
    from kvd.core import protocol as P

    real = T.Reservation.written
    times: dict[str, list[dict[str, float]]] = {"writer": [], "daemon": []}
    with tempfile.TemporaryDirectory() as tmp:
        daemon = DaemonProc(Path(tmp), env_extra={"KVD_HOST__CAPACITY_BYTES": "1GiB"}).start()
        try:
            c = Controller(make_pool(B.LAYOUT, num_pages=3 * B.NUM_PAGES, page_size=B.P),
                           extra_config(daemon.socket, namespace="bench"))
            io, steps = c.backend.io, {}
            call, each = io.session.call, io._each

            def timed_call(name, fn):
                t = time.perf_counter()
                try:
                    return call(name, fn)
                finally:
                    steps[name] = (time.perf_counter() - t) * 1e3

            def timed_each(fn, n):
                t = time.perf_counter()
                try:
                    each(fn, n)
                finally:
                    steps["copies"] = (time.perf_counter() - t) * 1e3

            io.session.call, io._each = timed_call, timed_each
            src = c.pool.alloc(B.NUM_PAGES * B.P)
            fill_random(c.pool, src, seed=1)
            ks = B.keys(B.NUM_PAGES)
            assert c.cc.page_set_func(ks, src)  # warm, and checked below: the pages round-trip
            dst = c.pool.alloc(B.NUM_PAGES * B.P)
            from sglang.srt.managers.cache_controller import PrefetchOperation

            op = PrefetchOperation("check", [0] * (B.NUM_PAGES * B.P))
            assert c.cc.page_get_func(op, ks, dst) == B.NUM_PAGES, "a page stored with writer checksums failed"
            assert all(torch.equal(a, b) for a, b in zip(page_bytes(c.pool, src), page_bytes(c.pool, dst))), \
                "pages stored with writer checksums did not load back bit-exact"
            for rep in range(2 * args.reps):
                mode = "writer" if rep % 2 == 0 else "daemon"
                T.Reservation.written = real if mode == "writer" else (lambda self, i: None)
                ks = B.keys(B.NUM_PAGES)
                steps.clear()
                t = time.perf_counter()
                assert c.cc.page_set_func(ks, src)
                times[mode].append({"total": (time.perf_counter() - t) * 1e3, **steps})
                h = io.session.handle()
                h.client.delete(P.EntriesRequest(namespace=h.namespace, fingerprint=h.fingerprint,
                                                 hashes=io.hashes(h, ks)))
            T.Reservation.written = real
            c.close()
        finally:
            daemon.kill()
    nbytes = B.NUM_PAGES * B.P * 30 * 3 * 64 * 2 * 2
    memcpy_ms = nbytes / B.memcpy_gbps(nbytes) / 1e6  # the ceiling, in this run: one thread, best of reps
    summary = {m: {"min_ms": min(x["total"] for x in ts), "median_ms": statistics.median(x["total"] for x in ts),
                   "best_GBps": nbytes / min(x["total"] for x in ts) / 1e6,
                   "median_steps_ms": {k: statistics.median(x[k] for x in ts) for k in ts[0] if k != "total"}}
               for m, ts in times.items()}
    out = {"date": str(date.today()), "sglang_version": version, "script": "benchmarks/notes/sglang_writer_sums.py",
           "batch_bytes": nbytes, "memcpy_ms": memcpy_ms, "reps_each": args.reps, "order": "writer, daemon, writer, ...",
           "summary": summary, "runs": times}
    (ROOT / "benchmarks" / "results" / "sglang_backend.writer_sums.json").write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
