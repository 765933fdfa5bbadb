"""A/B of ``benchmarks/control_plane.py`` between a base commit and the working tree, on one machine.

The VM this project runs on changes speed from one session to the next (the store's 128-hit lookup
took 240 us in one run and 680 us in another, same code), so a figure from today cannot be compared
with a committed one from another day. This runs the same benchmark from a worktree of ``--base`` and
from this tree in turn (base, this, base, this, ...), ``--rounds`` times each, and writes each run's
lookup figures and the medians to ``benchmarks/results/control_plane.ab.json``.

Usage: python benchmarks/notes/control_plane_ab.py --base <commit> [--rounds 2] [--out NAME.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from datetime import date
from pathlib import Path

from worktree import ROOT, alternate, commit_of, medians, worktree  # beside this script

KEYS = [f"lookup_compact_{m}_{q}" for m in ("hits", "miss", "mixed") for q in ("p50_ms", "p99_ms", "ops_per_s")]


def run(tree: Path, out: Path) -> dict:
    subprocess.run([sys.executable, "benchmarks/control_plane.py", "--out", str(out)], cwd=tree, check=True,
                   stdout=subprocess.DEVNULL)
    d = json.loads((out / "control_plane.json").read_text())
    b = d["lookup_breakdown_us"]["compact"]
    return {**{k: d[k] for k in KEYS}, "store_lookup_us": b["store_lookup"], "round_trip_1_client_us":
            b["round_trip_1_client"], "arena_copy_vs_memcpy": d["arena_copy_vs_memcpy"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", required=True)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", default="control_plane.ab.json", help="file name under benchmarks/results")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp, worktree(args.base, Path(tmp) / "base") as base:
        runs = alternate(base, args.rounds, lambda name, tree, r: run(tree, Path(tmp) / f"{name}{r}"))
        res = {"date": str(date.today()), "script": "benchmarks/notes/control_plane_ab.py",
               "base": commit_of(base), "this": commit_of(ROOT) + " + working tree",
               "order": "base, this, base, this, ...", "runs": runs, "median": medians(runs, list(runs["base"][0]))}
    path = ROOT / "benchmarks" / "results" / args.out
    path.write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(res["median"], indent=2))


if __name__ == "__main__":
    main()
