"""A/B of one client's local lookup (``kvd.client.local_lookup``) between a base commit and this tree.

The time of one lookup answered from the shared lookup index decides how often 8 busy clients on 2
cores get preempted mid-lookup (``benchmarks/control_plane.py``'s back-to-back p99). This VM's speed
swings up to 2x within minutes, so the two trees run in turn (base, this, base, this, ...) against
one daemon holding the 32K-token prompt of ``control_plane.py`` (128 stored chunks): each run is a
fresh process that looks it up ``--lookups`` times back to back (the lookup and its leading tiers,
as ``control_plane.py`` times it) after checking that the answer is local and has 128 hits. Writes
each run's median / mean / p99 in microseconds, and per tree the min and median of the run medians,
to ``benchmarks/results/local_lookup.ab.json``.

Usage: python benchmarks/notes/local_lookup_ab.py --base <commit> [--rounds 10] [--lookups 6000]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from datetime import date
from pathlib import Path

from worktree import ROOT, commit_of, worktree  # beside this script

sys.path.insert(0, str(ROOT / "benchmarks"))

import control_plane as CP  # noqa: E402

CHILD = r"""
import sys, time
sys.path.insert(0, sys.argv[1]); sys.path.insert(1, sys.argv[1] + "/benchmarks")
import numpy as np, control_plane as CP
from kvd.client.client import KvdClient
with KvdClient(sys.argv[2], register_cuda=False) as c:
    req = CP.lookup_requests(c)["hits"]
    for _ in range(3):
        c.lookup_compact(req)
    before = c.local.answered
    xs = []
    for _ in range(int(sys.argv[3])):
        t0 = time.perf_counter()
        a = c.lookup_compact(req)
        CP.leading_tiers(a)
        xs.append(time.perf_counter() - t0)
    assert a.num_prefix_hits == 128 and c.local.answered - before == len(xs), "not answered locally"
    print(np.median(xs) * 1e6, np.mean(xs) * 1e6, np.percentile(xs, 99) * 1e6)
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", required=True)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--lookups", type=int, default=6000)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp, worktree(args.base, Path(tmp) / "base") as base:
        daemon = CP.start_daemon(Path(tmp))
        sock = str(Path(tmp) / "kvd.sock")
        try:
            CP.store_lookup_prompt(sock)
            runs: dict[str, list[dict]] = {"base": [], "this": []}
            for _ in range(args.rounds):
                for name, tree in (("base", base), ("this", ROOT)):
                    out = subprocess.run([sys.executable, "-c", CHILD, str(tree), sock, str(args.lookups)],
                                         cwd=tree, capture_output=True, text=True, check=True).stdout.split()
                    runs[name].append(dict(zip(("median_us", "mean_us", "p99_us"), map(float, out), strict=True)))
        finally:
            daemon.terminate()
            daemon.wait(30)
    res = {"date": str(date.today()), "script": "benchmarks/notes/local_lookup_ab.py", "base": args.base,
           "this": commit_of(ROOT) + " + working tree", "order": "base, this, base, this, ...",
           "lookups_per_run": args.lookups, "runs": runs,
           "summary": {n: {"min_of_medians_us": min(r["median_us"] for r in rs),
                           "median_of_medians_us": statistics.median(r["median_us"] for r in rs)}
                       for n, rs in runs.items()}}
    out = ROOT / "benchmarks" / "results" / "local_lookup.ab.json"
    out.write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps(res["summary"]))


if __name__ == "__main__":
    main()
