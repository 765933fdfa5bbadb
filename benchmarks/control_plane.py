"""Control-plane benchmark: lookup and store latency with 8 concurrent clients, arena copy throughput.

Runs the real ``kvd`` entry point as a subprocess and N client *processes* against it:

1. correctness first: a store -> lookup -> load round trip must be bit-exact, or nothing is timed;
2. lookup: each client looks up the same 32K-token prompt (128 chunks, by prefix hashes it computed)
   back to back for a fixed time; p50/p99 latency and ops/s;
3. store: each client reserves 128 new entries of 64 KiB segments (1 layer × 4 KV heads × 256 tokens ×
   head_dim 64, bf16: 256 KiB per entry, 32 MiB per operation), copies the KV into the arena and
   commits; p50/p99 of the commit call and of the whole reserve + copy + commit;
4. arena copy: 64 MiB of KV (entries of 8 layers × 4 KV heads) copied from a KV tensor into arena
   extents (the client's store path) and, in the same run, a plain numpy memcpy between two
   preallocated buffers of the same size.

Usage: python benchmarks/control_plane.py [--clients 8] [--seconds 6] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from kvd.client import prefix as kvio  # noqa: E402
from kvd.client.client import KvdClient  # noqa: E402
from kvd.client.transfer import copy_block, extent_to_kv_views  # noqa: E402
from kvd.core import protocol as P  # noqa: E402
from kvd.core.errors import DaemonUnavailable  # noqa: E402
from kvd.core.keys import ModelSpec  # noqa: E402

LOOKUP_SPEC = ModelSpec("bench-lookup", num_layers=30, num_kv_heads=3, head_dim=64, kv_dtype="bfloat16")
STORE_SPEC = ModelSpec("bench-store", num_layers=1, num_kv_heads=4, head_dim=64, kv_dtype="bfloat16")
# Arena copy is measured with entries shaped like a real model's (8 layers × 4 KV heads, 2 MiB per
# 256-token entry): per-copy call overhead of the tiny store entries above would dominate otherwise.
COPY_SPEC = ModelSpec("bench-copy", num_layers=8, num_kv_heads=4, head_dim=64, kv_dtype="bfloat16")
PROMPT_TOKENS = 32 * 1024
ENTRIES_PER_STORE = 128


def start_daemon(root: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KVD_")}
    env.update({"KVD_HOST__PATH": str(root / "arena"), "KVD_HOST__CAPACITY_BYTES": "1GiB",
                "KVD_SSD__ENABLED": "false", "KVD_DAEMON__LOG_LEVEL": os.environ.get("KVD_BENCH_LOG", "WARNING")})
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "kvd.daemon.service", "--socket", str(root / "kvd.sock"),
                             "--metrics-addr", f"127.0.0.1:{port}"], env=env, cwd=ROOT)
    c = KvdClient(root / "kvd.sock", register_cuda=False)
    for _ in range(600):
        try:
            c.health()
            return proc
        except DaemonUnavailable:
            time.sleep(0.05)
    raise RuntimeError("kvd did not start")


def check_round_trip(sock: str) -> None:
    with KvdClient(sock, register_cuda=False) as c:
        h = kvio.register(c, STORE_SPEC, namespace="check")
        toks = list(range(1024))
        kv = (torch.randn(1, 2, 4, 1024, 64) * 5).to(torch.bfloat16)
        kvio.store_prefix(h, toks, kv)
        with kvio.load_prefix(h, toks) as loaded:
            assert loaded.num_chunks == 4, loaded.num_chunks
            assert torch.equal(loaded.to_tensor(), kv), "round trip is not bit-exact: nothing timed"


def lookup_worker(sock: str, seconds: float, start_at: float, q) -> None:
    c = KvdClient(sock, register_cuda=False)
    h = kvio.register(c, LOOKUP_SPEC, namespace="bench")
    toks = np.arange(PROMPT_TOKENS) % 49152
    req = P.LookupRequest(fingerprint=h.fingerprint, namespace="bench", prefix_hashes=h.hashes(toks),
                          prefetch=False)
    while time.time() < start_at:
        time.sleep(0.001)
    lat, hits = [], 0
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        t0 = time.perf_counter()
        hits = c.lookup(req).num_prefix_hits
        lat.append(time.perf_counter() - t0)
    q.put({"lat": lat, "hits": hits})


def store_worker(sock: str, seconds: float, start_at: float, wid: int, q) -> None:
    c = KvdClient(sock, register_cuda=False)
    h = kvio.register(c, STORE_SPEC, namespace=f"store-{wid}")
    n_tok = ENTRIES_PER_STORE * 256
    kv = (torch.randn(1, 2, 4, n_tok, 64)).to(torch.bfloat16)
    while time.time() < start_at:
        time.sleep(0.001)
    op_lat, commit_lat, nbytes, it = [], [], 0, 0
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        toks = np.arange(n_tok) + it * n_tok + wid * 10**8  # new prompt each time: never "exists"
        it += 1
        hashes = h.hashes(toks)
        t0 = time.perf_counter()
        r = c.reserve(P.ReserveRequest(fingerprint=h.fingerprint, namespace=h.namespace, entries=[
            P.ReserveEntry(hash=x, num_tokens=256, start_token=i * 256) for i, x in enumerate(hashes)]))
        arena = c.arena(r.arena_id)
        plan = h.plans(256)["global"]
        for i, e in enumerate(r.entries):
            for ext in e.extents:
                dst = arena.torch_extent(ext, plan, "bfloat16")
                for part, src in extent_to_kv_views(plan, dst, kv, i * 256):
                    copy_block(part, src)
                nbytes += ext.nbytes
        t1 = time.perf_counter()
        if r.reservation_id:
            c.commit(P.CommitRequest(reservation_id=r.reservation_id, transfer_s=t1 - t0))
        t2 = time.perf_counter()
        op_lat.append(t2 - t0)
        commit_lat.append(t2 - t1)
    q.put({"op": op_lat, "commit": commit_lat, "bytes": nbytes})


def run_phase(target, sock: str, clients: int, seconds: float, extra=()) -> list[dict]:
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    start_at = time.time() + 1.5  # every worker registered and warm before the clock starts
    procs = [ctx.Process(target=target, args=(sock, seconds, start_at, *((i,) if extra else ()), q))
             for i in range(clients)]
    for p in procs:
        p.start()
    out = [q.get(timeout=seconds + 120) for _ in procs]
    for p in procs:
        p.join()
    return out


def arena_copy(sock: str, repeats: int = 21) -> tuple[float, float, int]:
    """GB/s of the client's store copy (KV tensor -> arena extents) and of numpy memcpy, same bytes."""
    with KvdClient(sock, register_cuda=False) as c:
        h = kvio.register(c, COPY_SPEC, namespace="copy")
        n_tok = 32 * 256  # 64 MiB of KV
        kv = torch.randn(8, 2, 4, n_tok, 64).to(torch.bfloat16)
        hashes = h.hashes(np.arange(n_tok))
        r = c.reserve(P.ReserveRequest(fingerprint=h.fingerprint, namespace="copy", entries=[
            P.ReserveEntry(hash=x, num_tokens=256) for x in hashes]))
        statuses = [e.status for e in r.entries]
        assert statuses == ["reserved"] * len(hashes), f"arena copy could not reserve its entries: {statuses}"
        arena = c.arena(r.arena_id)
        plan = h.plans(256)["global"]
        dsts = [arena.torch_extent(e.extents[0], plan, "bfloat16") for e in r.entries]
        nbytes = sum(d.numel() * 2 for d in dsts)

        def copy_in() -> None:  # exactly the client's store path (kvio.store_prefix) minus the RPCs
            for i, dst in enumerate(dsts):
                for part, src in extent_to_kv_views(plan, dst, kv, i * 256):
                    copy_block(part, src)

        src = np.random.default_rng(0).integers(0, 255, nbytes, dtype=np.uint8)
        dst = np.empty_like(src)
        copy_in()
        np.copyto(dst, src)  # warm both: page faults out of the timing
        arena_t, memcpy_t = [], []
        for _ in range(repeats):  # interleaved, so machine noise hits both alike
            t0 = time.perf_counter()
            copy_in()
            arena_t.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            np.copyto(dst, src)
            memcpy_t.append(time.perf_counter() - t0)
        for i, d in enumerate(dsts):  # correctness of what was timed: segment (layer 5, head 3)'s V
            j = plan.segment_index(5, 3)
            assert torch.equal(d[j, 1], kv[5, 1, 3, i * 256 : (i + 1) * 256])
        c.abort(P.AbortRequest(reservation_id=r.reservation_id))
        return nbytes / np.median(arena_t) / 1e9, nbytes / np.median(memcpy_t) / 1e9, nbytes


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs) * 1e3, q))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=6.0)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    root = Path(tempfile.mkdtemp(prefix="kvd-bench-"))
    daemon = start_daemon(root)
    sock = str(root / "kvd.sock")
    try:
        check_round_trip(sock)
        # The looked-up prompt is stored once (128 chunk entries of the 30×3-head model).
        with KvdClient(sock, register_cuda=False) as c:
            h = kvio.register(c, LOOKUP_SPEC, namespace="bench")
            toks = np.arange(PROMPT_TOKENS) % 49152
            hashes = h.hashes(toks)
            r = c.reserve(P.ReserveRequest(fingerprint=h.fingerprint, namespace="bench", entries=[
                P.ReserveEntry(hash=x, num_tokens=256, start_token=i * 256) for i, x in enumerate(hashes[:32])]))
            c.commit(P.CommitRequest(reservation_id=r.reservation_id))
        lk = run_phase(lookup_worker, sock, args.clients, args.seconds)
        assert all(w["hits"] == 32 for w in lk), "lookup answered wrong hit counts"
        st = run_phase(store_worker, sock, args.clients, args.seconds, extra=True)
        arena_gbps, memcpy_gbps, copy_bytes = arena_copy(sock)
    finally:
        daemon.terminate()
        daemon.wait(30)
    lookup_lat = [x for w in lk for x in w["lat"]]
    op_lat = [x for w in st for x in w["op"]]
    commit_lat = [x for w in st for x in w["commit"]]
    res = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()} {os.cpu_count()} cores, {platform.python_version()}, torch {torch.__version__}",
        "clients": args.clients, "seconds_per_phase": args.seconds,
        "lookup_chunks": PROMPT_TOKENS // 256,
        "lookup_p50_ms": pct(lookup_lat, 50), "lookup_p99_ms": pct(lookup_lat, 99),
        "lookup_ops_per_s": len(lookup_lat) / args.seconds,
        "commit_p50_ms": pct(commit_lat, 50), "commit_p99_ms": pct(commit_lat, 99),
        "store_op_p50_ms": pct(op_lat, 50), "store_op_p99_ms": pct(op_lat, 99),
        "store_ops_per_s": len(op_lat) / args.seconds,
        "store_entries_per_s": len(op_lat) * ENTRIES_PER_STORE / args.seconds,
        "store_MBps": sum(w["bytes"] for w in st) / args.seconds / 1e6,
        "arena_copy_GBps": arena_gbps, "memcpy_GBps": memcpy_gbps, "arena_copy_bytes": copy_bytes,
        "arena_copy_vs_memcpy": arena_gbps / memcpy_gbps,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "control_plane.json").write_text(json.dumps(res, indent=1) + "\n")
    rows = [("lookup 128 chunks", res["lookup_p50_ms"], res["lookup_p99_ms"], res["lookup_ops_per_s"]),
            ("commit 128 entries", res["commit_p50_ms"], res["commit_p99_ms"], res["store_ops_per_s"]),
            ("reserve+copy+commit", res["store_op_p50_ms"], res["store_op_p99_ms"], res["store_ops_per_s"])]
    print(f"\ncontrol plane, {args.clients} concurrent clients, {res['machine']}")
    print(f"{'operation':<22}{'p50 ms':>9}{'p99 ms':>9}{'ops/s':>9}")
    for name, p50, p99, ops in rows:
        print(f"{name:<22}{p50:>9.2f}{p99:>9.2f}{ops:>9.1f}")
    print(f"arena copy {arena_gbps:.2f} GB/s vs numpy memcpy {memcpy_gbps:.2f} GB/s "
          f"({res['arena_copy_vs_memcpy']:.2f}×; goal ≥ 0.8×); lookup p99 goal ≤ 2 ms")
    _plot(res, lookup_lat, commit_lat, out / "control_plane.png")


def _plot(res: dict, lookup_lat: list[float], commit_lat: list[float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(10, 3.6))
    for lat, name in ((lookup_lat, "lookup (128 chunks)"), (commit_lat, "commit (128 entries)")):
        xs = np.sort(np.asarray(lat) * 1e3)
        ax[0].plot(xs, np.linspace(0, 1, len(xs)), label=name)
    ax[0].set_xscale("log")
    ax[0].set_xlabel("latency (ms)")
    ax[0].set_ylabel("CDF")
    ax[0].axvline(2.0, ls=":", c="grey")
    ax[0].legend()
    ax[0].set_title(f"{res['clients']} concurrent clients")
    ax[1].bar(["arena copy", "numpy memcpy"], [res["arena_copy_GBps"], res["memcpy_GBps"]])
    ax[1].set_ylabel("GB/s")
    ax[1].set_title("copy throughput, same bytes")
    fig.suptitle(f"kvd control plane — {res['date']}, {res['machine']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
