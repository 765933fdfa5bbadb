"""A/B of ``benchmarks/sglang_backend.py`` between a base commit and the working tree, on one machine.

Runs the benchmark (a real daemon each run, SGLang's controller page functions, bit-exactness checked
first) from a worktree of ``--base`` and from this tree in turn (base, this, base, this, ...),
``--rounds`` times each, and writes every run's figures and the medians to
``benchmarks/results/<--out>``. The benchmark writes its own result files in the tree it runs in;
this tree's committed ``sglang_backend.json`` / ``.png`` are put back afterwards.

Usage: python benchmarks/notes/sglang_backend_ab.py --base <commit> [--rounds 6] [--out NAME.json]
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

KEYS = ["memcpy_GBps", "batch_get_GBps", "batch_set_GBps", "batch_get_vs_memcpy", "batch_set_vs_memcpy"]
RESULT = Path("benchmarks/results/sglang_backend.json")


def run(tree: Path) -> dict:
    subprocess.run([sys.executable, "benchmarks/sglang_backend.py"], cwd=tree, check=True, stdout=subprocess.DEVNULL)
    d = json.loads((tree / RESULT).read_text())
    return {**{k: d[k] for k in KEYS}, "load_avg_1m": d.get("load_avg_1m")}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", required=True)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--out", default="sglang_backend.ab.json", help="file name under benchmarks/results")
    args = ap.parse_args()
    try:
        with tempfile.TemporaryDirectory() as tmp, worktree(args.base, Path(tmp) / "base") as base:
            runs = alternate(base, args.rounds, lambda name, tree, r: run(tree))
            res = {"date": str(date.today()), "script": "benchmarks/notes/sglang_backend_ab.py",
                   "base": commit_of(base), "this": commit_of(ROOT) + " + working tree",
                   "order": "base, this, base, this, ...", "runs": runs, "median": medians(runs, KEYS)}
    finally:  # the benchmark overwrote this tree's committed figures
        subprocess.run(["git", "checkout", "--", str(RESULT), str(RESULT.with_suffix(".png"))], cwd=ROOT, check=False)
    (ROOT / "benchmarks" / "results" / args.out).write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(res["median"], indent=2))


if __name__ == "__main__":
    main()
