"""The shared lookup index's rebuild (``kvd.store.published.IndexWriter._rebuild``), which runs on the
daemon's event loop when the index file doubles or tombstones fill it: this tree against a base commit,
alternated, in fresh processes.

Per size: an ``IndexWriter`` whose table holds N published tags (random, as tags of entry hashes are),
then ``_rebuild`` timed, best of 3 (each rebuild doubles the file while more than a quarter is in use,
so the first is the one a growing index pays). Both trees' writers are checked to read back every
tag's value through a reader's probe after the rebuild.

Usage: python benchmarks/notes/index_rebuild.py --base <commit> [--sizes 8000 30000 100000] [--rounds 3]
Writes benchmarks/results/index_rebuild.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from datetime import date
from pathlib import Path

from worktree import ROOT, commit_of, worktree  # beside this script

CHILD = r"""
import json, sys, tempfile, time
from pathlib import Path
import numpy as np
from kvd.core import index_file as F
from kvd.store.published import IndexWriter
n = int(sys.argv[1])
with tempfile.TemporaryDirectory() as tmp:
    like = Path(tmp) / "arena"
    like.write_bytes(b"x")
    w = IndexWriter(Path(tmp) / "a.index", arena_id="ab" * 8, chunk_tokens=256, like=like,
                    capacity=1 << max(14, (4 * n).bit_length()))
    rng = np.random.default_rng(n)
    tags = (rng.integers(2, 1 << 62, size=n, dtype=np.int64).astype(np.uint64) | np.uint64(1 << 63)).tolist()
    for i, t in enumerate(tags):
        w.set(("ns", "fp", str(i)), t, F.V_PRESENT | i)
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        w._rebuild()
        times.append(time.perf_counter() - t0)
    got = w.m.probe(np.array(tags, dtype=np.uint64))
    assert got.tolist() == [F.V_PRESENT | i for i in range(n)], "a tag lost or wrong after the rebuild"
    w.close()
    print(json.dumps({"first_ms": 1000 * times[0], "best_ms": 1000 * min(times)}))
"""


def run(tree: Path, n: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    out = subprocess.run([sys.executable, "-c", CHILD, str(n)], env=env, capture_output=True, text=True, check=True,
                         cwd=tempfile.gettempdir())
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", required=True)
    ap.add_argument("--sizes", type=int, nargs="+", default=[8000, 30000, 100000])
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    res = {"date": str(date.today()), "script": "benchmarks/notes/index_rebuild.py", "base": args.base,
           "this": commit_of(ROOT), "cores": os.cpu_count(), "sizes": {}}
    with tempfile.TemporaryDirectory(prefix="kvd-rebuild-") as tmp, worktree(args.base, Path(tmp) / "base") as base:
        for n in args.sizes:
            runs: dict[str, list[dict]] = {"base": [], "this": []}
            for _ in range(args.rounds):
                for name, tree in (("base", base), ("this", ROOT)):
                    runs[name].append(run(tree, n))
            res["sizes"][str(n)] = {name: {"median_first_ms": round(statistics.median(r["first_ms"] for r in rs), 2),
                                           "median_best_ms": round(statistics.median(r["best_ms"] for r in rs), 2)}
                                    for name, rs in runs.items()}
            print(n, res["sizes"][str(n)], flush=True)
    (ROOT / "benchmarks" / "results" / "index_rebuild.json").write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
