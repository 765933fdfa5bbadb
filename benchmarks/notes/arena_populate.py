"""What populating the client's arena mapping (``KvdClient(populate_arena=True)``, ``kvd.client.arena``)
buys and costs, in one run on one machine.

A fresh engine's first kvd hit reads its leased extents for the first time in that process: every
4 KiB page of them takes a minor fault (about 1,440 for a 4K SmolLM2 hit's 94 MB, with the kernel's
fault-around). This times, over a real arena file in /dev/shm, (a) the lease's xxh3 pass over 94 MB of
a fresh mapping (faulting), (b) the same pass again (mapped), (c) populating a fresh mapping of the
same 94 MB and of a whole 1 GiB arena (the default size), (d) the pass over the populated mapping,
and (e) the same number of bytes hashed in 28 KiB pieces that sit in cache, as a checksum fused into
the copy (each layer's rows hashed right after they are copied) would hash them. Each is the median
of ``--repeats`` fresh mappings.

Usage: python benchmarks/notes/arena_populate.py [--repeats 7] -> benchmarks/results/arena_populate.json
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import platform
import resource
import statistics
import sys
import time
from datetime import date
from pathlib import Path

import xxhash

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from kvd.client.arena import MADV_POPULATE_READ  # noqa: E402

LOAD = 94_371_840  # a 4,096-token SmolLM2 load (30 layers x 3 heads x 64 dims x 2 x bf16)
ARENA = 1 << 30


def hash_pass(m: mmap.mmap, n: int) -> float:
    """The lease's check: xxh3 of the bytes, in 1 MiB extents; seconds."""
    mv = memoryview(m)
    t0 = time.perf_counter()
    for off in range(0, n, 1 << 20):
        xxhash.xxh3_64_hexdigest(mv[off : min(n, off + (1 << 20))])
    dt = time.perf_counter() - t0
    mv.release()
    return dt


def faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    path = Path("/dev/shm") / f"kvd-populate-note-{os.getpid()}"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.posix_fallocate(fd, 0, ARENA)  # as the daemon: every page allocated up front
        with mmap.mmap(fd, LOAD) as m:
            m[:] = os.urandom(LOAD)
        runs: dict[str, list[float]] = {}
        for _ in range(args.repeats):
            with mmap.mmap(fd, LOAD) as m:  # (a) then (b): a fresh mapping, hashed twice
                f0 = faults()
                runs.setdefault("hash_fresh_mapping_ms", []).append(hash_pass(m, LOAD) * 1e3)
                runs.setdefault("faults_fresh_mapping", []).append(faults() - f0)
                runs.setdefault("hash_mapped_ms", []).append(hash_pass(m, LOAD) * 1e3)
            with mmap.mmap(fd, LOAD) as m:  # (c) and (d)
                t0 = time.perf_counter()
                m.madvise(MADV_POPULATE_READ)
                runs.setdefault("populate_94MB_ms", []).append((time.perf_counter() - t0) * 1e3)
                f0 = faults()
                runs.setdefault("hash_populated_ms", []).append(hash_pass(m, LOAD) * 1e3)
                runs.setdefault("faults_populated", []).append(faults() - f0)
            piece = memoryview(os.urandom(28 << 10))  # (e)
            t0 = time.perf_counter()
            for _ in range(LOAD // len(piece)):
                xxhash.xxh3_64_hexdigest(piece)
            runs.setdefault("hash_in_cache_ms", []).append((time.perf_counter() - t0) * 1e3)
            with mmap.mmap(fd, ARENA) as m:
                t0 = time.perf_counter()
                m.madvise(MADV_POPULATE_READ)
                runs.setdefault("populate_1GiB_ms", []).append((time.perf_counter() - t0) * 1e3)
    finally:
        os.close(fd)
        path.unlink()
    med = {k: round(statistics.median(v), 2) for k, v in runs.items()}
    res = {"date": date.today().isoformat(), "script": "benchmarks/notes/arena_populate.py",
           "machine": f"{platform.machine()}, {os.cpu_count()} cores", "bytes": LOAD, "repeats": args.repeats,
           "median": med, "fault_cost_ms": round(med["hash_fresh_mapping_ms"] - med["hash_populated_ms"], 2),
           "runs": {k: [round(x, 2) for x in v] for k, v in runs.items()}}
    (ROOT / "benchmarks/results/arena_populate.json").write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps({k: res[k] for k in ("median", "fault_cost_ms")}, indent=1))


if __name__ == "__main__":
    main()
