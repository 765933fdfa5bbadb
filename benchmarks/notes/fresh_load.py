"""A fresh vLLM worker's load of a 4K SmolLM2 prompt, as ``WorkerIO`` does it, without the engine: a
same-run A/B of the two choices that decide how the load first touches the arena.

- ``sums``: ``before`` hashes every leased extent when the lease opens (``verify=True``), then copies;
  ``with_copy`` (``verify_with_copy``, the connector's default) opens the lease without hashing and
  has the copier hash each extent's rows of a layer right after copying them
  (``kvd.connectors.vllm.sums``).
- ``populate``: the process maps every arena page when it maps the arena (``populate_arena``), or not.

A daemon (1 GiB arena on /dev/shm, its default place) holds 16 chunk entries of a 4,096-token
SmolLM2-shaped prompt (30 layers x 3 KV heads x 64 dims, bf16, the shipped head map's 7 extents each:
94 MB). Each round runs one fresh process per variant, in turn: it maps the arena by registering
(``map_ms``, which holds any populate), opens the lease (``lease_ms``), copies all 30 layers into
vLLM-CPU-``vec``-packed blocks with the connector's ``StridedCopier`` (``copy_ms``, with the per-layer
hashing for ``with_copy``), compares the sums (``check_ms``), checks every block against the stored
KV and releases. ``total_ms`` = lease + copy + check: what a fresh engine's first hit pays for these
steps. Minor page faults are counted over the same span. The child makes the calls ``WorkerIO`` makes
for a load (``open_lease``, ``Piece``, ``LoadSums``, ``StridedCopier.load_layer``), without its step
bookkeeping. The bytes are checked after the timed span, not before, because what is timed is the
process's first touch of the arena (a check first would take the faults); a child whose check fails
exits non-zero and the run stops without writing a result.

Usage: python benchmarks/notes/fresh_load.py [--rounds 5] [--variants ...] [--out PATH]
(default benchmarks/results/fresh_load.json)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from kvd.client.client import KvdClient  # noqa: E402
from kvd.client.prefix import register  # noqa: E402
from kvd.client.transfer import open_lease, reserve  # noqa: E402
from kvd.connectors.vllm.copy import Piece, make_copier  # noqa: E402
from kvd.connectors.vllm.layout import BlockLayout, known_layout  # noqa: E402
from kvd.connectors.vllm.sums import LoadSums  # noqa: E402
from kvd.core import protocol as P  # noqa: E402
from kvd.core.headmap import HeadMap  # noqa: E402
from kvd.core.keys import ModelSpec  # noqa: E402

SPEC = ModelSpec("smollm2-shape", num_layers=30, num_kv_heads=3, head_dim=64, kv_dtype="bfloat16")
TOKENS, CHUNK, BLOCK = 4096, 256, 128
VARIANTS = {"before": ("before", False), "with_copy": ("with_copy", False),
            "before+populate": ("before", True), "with_copy+populate": ("with_copy", True)}
OUT = ROOT / "benchmarks/results/fresh_load.json"


def head_map() -> HeadMap:
    return HeadMap.load(ROOT / "kvd/data/heads/smollm2-135m.json").model_copy(
        update={"fingerprint": None, "model": SPEC.model_id})


def kv() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randn(SPEC.num_layers, 2, SPEC.num_kv_heads, TOKENS, SPEC.head_dim, generator=g).bfloat16()


def child(socket: str, variant: str) -> None:
    torch.set_num_threads(1)  # as vLLM's CPU worker here
    sums_mode, populate = VARIANTS[variant]
    H, D = SPEC.num_kv_heads, SPEC.head_dim
    to = known_layout("LBHNC_KT", H, BLOCK, D)
    fr = torch.empty_like(to)
    fr[to] = torch.arange(to.numel())
    layout = BlockLayout("LBHNC_KT", H, BLOCK, D, to, fr)
    layers = [torch.zeros(TOKENS // BLOCK + 8, H, BLOCK, 2 * D, dtype=torch.bfloat16) for _ in range(SPEC.num_layers)]
    copier = make_copier(layout, layers[0])
    faults = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt  # noqa: E731
    t0 = time.perf_counter()
    client = KvdClient(socket, register_cuda=False, populate_arena=populate)
    h = register(client, SPEC, head_map(), namespace="bench")
    hashes = h.hashes(list(range(TOKENS)))
    t1, f1 = time.perf_counter(), faults()
    lease = open_lease(h, hashes, verify=sums_mode == "before")
    t2 = time.perf_counter()
    pieces = [Piece([4 + 2 * i, 5 + 2 * i], 0, CHUNK, list(lease.entry(i).extents)) for i in range(len(hashes))]
    sums = LoadSums([(i * CHUNK, p) for i, p in enumerate(pieces)],
                    SPEC.num_layers) if sums_mode == "with_copy" else None
    for layer in range(SPEC.num_layers):
        copier.load_layer(layers[layer], layer, pieces)
        if sums is not None:
            sums.layer_copied(layer)
    t3 = time.perf_counter()
    bad = sums.failures() if sums is not None else []
    t4, f4 = time.perf_counter(), faults()
    n = lease.num_leading
    lease.release()
    want = kv()
    for layer in range(SPEC.num_layers):  # every block holds its chunk's tokens, read through the layout
        flat = layers[layer].reshape(layers[layer].shape[0], -1)
        got = flat[4 : 4 + TOKENS // BLOCK][:, layout.to_canon].view(-1, H, 2, BLOCK, D)
        got = got.permute(2, 1, 0, 3, 4).reshape(2, H, TOKENS, D)
        assert torch.equal(got, want[layer]), f"layer {layer}: wrong KV"
    assert n == len(hashes) and not bad, (n, bad)
    print(json.dumps({"map_ms": (t1 - t0) * 1e3, "lease_ms": (t2 - t1) * 1e3, "copy_ms": (t3 - t2) * 1e3,
                      "check_ms": (t4 - t3) * 1e3, "total_ms": (t4 - t1) * 1e3, "faults": f4 - f1}))


def summary(runs: dict[str, list[dict]]) -> dict:
    """Medians per variant, and each variant against the first one round by round (same round, adjacent
    processes: the machine's drift cancels): the median of the per-round differences of ``total_ms``
    and how many rounds it was faster in."""
    first, *rest = runs
    paired = {}
    for v in rest:
        diffs = [a["total_ms"] - b["total_ms"] for a, b in zip(runs[first], runs[v])]
        paired[f"{first} - {v}"] = {"median_ms": round(statistics.median(diffs), 2),
                                     "rounds_faster": f"{sum(d > 0 for d in diffs)} of {len(diffs)}"}
    return {"median": {v: {k: round(statistics.median(r[k] for r in rs), 2) for k in rs[0]} for v, rs in runs.items()},
            "paired_total_ms": paired}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--child", nargs=2, metavar=("SOCKET", "VARIANT"))
    args = ap.parse_args()
    if args.child:
        return child(*args.child)
    from benchmarks.vllm_e2e_procs import KvdDaemon

    d = KvdDaemon(Path(tempfile.mkdtemp(prefix="kvd-fresh-load-")), "1GiB").start()  # arena on /dev/shm
    runs: dict[str, list[dict]] = {v: [] for v in args.variants}
    try:
        with KvdClient(d.socket, register_cuda=False) as c:
            h = register(c, SPEC, head_map(), namespace="bench")
            hashes = h.hashes(list(range(TOKENS)))
            entries = [P.ReserveEntry(hash=x, num_tokens=CHUNK, start_token=i * CHUNK, end_token=TOKENS)
                       for i, x in enumerate(hashes)]
            data = kv()
            with reserve(h, entries) as res:
                for i in range(len(hashes)):
                    res.entry(i).write_from(data, i * CHUNK)
        for _ in range(args.rounds):
            for v in args.variants:
                proc = subprocess.run([sys.executable, __file__, "--child", d.socket, v], capture_output=True, text=True)
                if proc.returncode:
                    raise SystemExit(f"{v} failed: {proc.stderr[-2000:]}")
                runs[v].append(json.loads(proc.stdout.strip().splitlines()[-1]))
                print(v, {k: round(x, 1) for k, x in runs[v][-1].items()}, flush=True)
    finally:
        d.stop()
    res = {"date": date.today().isoformat(), "script": "benchmarks/notes/fresh_load.py",
           "machine": f"{platform.machine()}, {os.cpu_count()} cores", "arena": "1 GiB on /dev/shm",
           "bytes": SPEC.num_layers * 2 * SPEC.num_kv_heads * TOKENS * SPEC.head_dim * 2, "layout": "LBHNC_KT (vec)",
           "order": "each round: " + ", ".join(args.variants) + "; one fresh process each", "checked": True,
           **summary(runs), "runs": runs}
    args.out.write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps({k: v for k, v in res.items() if k != "runs"}, indent=1))


if __name__ == "__main__":
    main()
