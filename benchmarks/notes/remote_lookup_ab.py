"""A/B of host B's daemon in the remote-hit lookup of ``benchmarks/remote_tier.py`` between a base commit
and this tree.

``remote_tier.py``'s ``lookup_p99_ms``: 8 client processes look up prompts (8 chunks each) that host A
stored and wrote through to the 6-node loopback cluster, so each lookup on B misses locally and
finds its entries in the cluster. This VM's speed swings up to 2x within minutes, so the two daemons
run in turn against one cluster and one host A: host B is restarted from the base tree, then from
this tree, and so on, each time with an empty index (``remote.scan_limit = 0``: nothing is adopted at
start, every lookup asks the cluster), and the same 8 clients (this tree's client) look up the same
``--prompts`` prompts. Writes each round's p50 / p99 and daemon B's CPU seconds (from /proc) per tree
to ``benchmarks/results/remote_lookup.ab.json``.

Usage: python benchmarks/notes/remote_lookup_ab.py --base <commit> [--rounds 3] [--prompts 512]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from datetime import date
from pathlib import Path

from worktree import ROOT, commit_of, worktree  # beside this script

sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import remote_tier as R  # noqa: E402

from tests.redis_cluster import RedisCluster  # noqa: E402


def cpu_s(pid: int) -> float:
    st = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(st[11]) + int(st[12])) / os.sysconf("SC_CLK_TCK")


def lookups(b, prompts: list[list[int]]) -> dict:
    """``remote_tier.lookup_figures``' timed part (``lookup_latencies``), and daemon B's CPU meanwhile."""
    cpu0 = cpu_s(b.proc.pid)
    lat = R.lookup_latencies(b, prompts)
    p50, p99 = R.p50_p99_ms(lat)
    return {"p50_ms": p50, "p99_ms": p99, "daemon_b_cpu_s": cpu_s(b.proc.pid) - cpu0, "lookups": len(lat)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", required=True)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--prompts", type=int, default=512)
    args = ap.parse_args()
    prompts = R.lookup_prompts(args.prompts)
    runs: dict[str, list[dict]] = {"base": [], "this": []}
    with tempfile.TemporaryDirectory(prefix="kvd-remote-ab-") as tmp, worktree(args.base, Path(tmp) / "base") as base:
        root = Path(tmp)
        os.chdir(root)  # host B imports kvd from PYTHONPATH (the tree of its turn), not from a cwd holding one
        cluster = RedisCluster(root / "redis").start()
        a, b = R.start_hosts(cluster, root)
        try:
            R.store_lookup_prompts(a, prompts)
            R.lookup_latencies(b, prompts)  # a first pass on B (not kept)
            b.env_extra["KVD_REMOTE__SCAN_LIMIT"] = "0"
            for _ in range(args.rounds):
                for name, tree in (("base", base), ("this", ROOT)):
                    b.kill()
                    b.env_extra["PYTHONPATH"] = str(tree)
                    b.start()
                    runs[name].append(lookups(b, prompts))
        finally:
            a.kill()
            b.kill()
            cluster.stop()
    res = {"date": str(date.today()), "script": "benchmarks/notes/remote_lookup_ab.py", "base": args.base,
           "this": commit_of(ROOT) + " + working tree", "order": "base, this, base, this, ...",
           "clients": 8, "chunks_per_lookup": 8, "prompts": args.prompts, "cores": os.cpu_count(), "runs": runs,
           "summary": {n: {"median_p50_ms": statistics.median(r["p50_ms"] for r in rs),
                           "median_p99_ms": statistics.median(r["p99_ms"] for r in rs),
                           "min_p99_ms": min(r["p99_ms"] for r in rs),
                           "median_daemon_b_cpu_ms_per_lookup":
                               1e3 * statistics.median(r["daemon_b_cpu_s"] / r["lookups"] for r in rs)}
                       for n, rs in runs.items()}}
    out = ROOT / "benchmarks" / "results" / "remote_lookup.ab.json"
    out.write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps(res["summary"], indent=1))


if __name__ == "__main__":
    main()
