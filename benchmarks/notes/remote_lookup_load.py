"""The remote-hit lookup of ``benchmarks/remote_tier.py`` under offered load, and where its CPU goes.

``remote_tier.py``'s ``lookup_p99_ms`` is measured with 8 client processes looking up back to back
(each sends its next lookup the moment the last is answered): a saturation test. On the 2-core VM the
8 clients, daemon B and the 6 Redis servers then share 2 busy cores, and a lookup's latency is mostly
its wait for CPU. This measures the same lookups (8 chunks each, every one a local miss and a remote
hit, the compact body on the framed connection) at several loads, each on prompts B has never seen:

- ``back_to_back``: as ``remote_tier.py``;
- ``pause_<ms>``: each client waits that long after an answer before its next lookup (not timed);
- ``one_client``: a single client back to back (no queueing behind other clients).

The clients are ``remote_tier._lookup_worker``'s.

Also daemon B's garbage-collector pauses over the run (``kvd_gc_pause_seconds``, where it has them).

Per load: p50 / p99, lookups per second, and the CPU per lookup of daemon B, of the Redis servers
(from /proc) and of the clients (``time.process_time`` around their loops).

Usage: python benchmarks/notes/remote_lookup_load.py [--prompts 512]
Writes benchmarks/results/remote_lookup_load.json.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import tempfile
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import remote_tier as R  # noqa: E402
from remote_lookup_ab import cpu_s  # noqa: E402

from tests.redis_cluster import RedisCluster  # noqa: E402

LOADS = (("back_to_back", 8, 0.0), ("pause_2ms", 8, 0.002), ("pause_5ms", 8, 0.005), ("pause_10ms", 8, 0.010),
         ("pause_20ms", 8, 0.020), ("one_client", 1, 0.0))


def run(b, redis_pids: list[int], prompts: list[list[int]], clients: int, pause_s: float) -> dict:
    ctx = mp.get_context("spawn")
    q, start = ctx.Queue(), ctx.Barrier(clients + 1)
    procs = [ctx.Process(target=R._lookup_worker, args=(b.socket, prompts[i::clients], q, start, pause_s)) for i in range(clients)]
    for p in procs:
        p.start()
    start.wait()  # every client is up: the CPU counted from here is the lookups'
    b0, r0 = cpu_s(b.proc.pid), sum(cpu_s(p) for p in redis_pids)
    out = [q.get(timeout=600) for _ in procs]
    b1, r1 = cpu_s(b.proc.pid), sum(cpu_s(p) for p in redis_pids)
    for p in procs:
        p.join()
    lat = sorted(x for o in out for x in o[0])
    n = len(lat)
    p50, p99 = R.p50_p99_ms(lat)
    wall = max(o[2] for o in out)
    return {"clients": clients, "pause_ms": pause_s * 1000, "lookups": n, "p50_ms": round(p50, 3), "p99_ms": round(p99, 3),
            "lookups_per_s": round(n / wall, 1),
            "cpu_ms_per_lookup": {"daemon_b": round(1000 * (b1 - b0) / n, 3), "redis": round(1000 * (r1 - r0) / n, 3),
                                  "clients": round(1000 * sum(o[1] for o in out) / n, 3)}}


def gc_pauses(b) -> dict:
    """Daemon B's ``kvd_gc_pause_seconds`` (its garbage collector's pauses over the whole run), per
    generation: count, total seconds and the upper bound of the slowest bucket hit; {} where the daemon
    predates the metric."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"http://127.0.0.1:{b.port}/metrics", timeout=5).read().decode()
    out: dict = {}
    for fam in text_string_to_metric_families(text):
        if fam.name != "kvd_gc_pause_seconds":
            continue
        for s in fam.samples:
            g = out.setdefault(s.labels["generation"], {"max_le_s": 0.0})
            if s.name.endswith("_count"):
                g["count"] = int(s.value)
            elif s.name.endswith("_sum"):
                g["seconds"] = round(s.value, 4)
        for s in fam.samples:  # the smallest bucket bound that holds every pause
            if s.name.endswith("_bucket"):
                g = out[s.labels["generation"]]
                le = float(s.labels["le"])
                if s.value >= g.get("count", 0) and (g["max_le_s"] == 0.0 or le < g["max_le_s"]):
                    g["max_le_s"] = le
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=512)
    args = ap.parse_args()
    res: dict = {"date": str(date.today()), "script": "benchmarks/notes/remote_lookup_load.py", "cores": os.cpu_count(),
                 "chunks_per_lookup": 8, "load_avg_1m": [round(os.getloadavg()[0], 2)], "loads": {}}
    with tempfile.TemporaryDirectory(prefix="kvd-remote-load-") as tmp:
        root = Path(tmp)
        os.chdir(root)
        cluster = RedisCluster(root / "redis").start()
        a, b = R.start_hosts(cluster, root)
        try:
            sets = {}
            for i, (name, _, _) in enumerate(LOADS):  # prompts of their own: B adopts what it finds
                sets[name] = [[t + 10_000_000 * (i + 1) for t in p] for p in R.lookup_prompts(args.prompts)]
                R.store_lookup_prompts(a, sets[name])
            redis_pids = [p.pid for p in cluster.procs.values()]
            for name, clients, pause in LOADS:
                res["loads"][name] = run(b, redis_pids, sets[name], clients, pause)
                print(name, res["loads"][name], flush=True)
            res["daemon_b_gc_pauses"] = gc_pauses(b)
        finally:
            a.kill()
            b.kill()
            cluster.stop()
    res["load_avg_1m"].append(round(os.getloadavg()[0], 2))
    out = ROOT / "benchmarks" / "results" / "remote_lookup_load.json"
    out.write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
