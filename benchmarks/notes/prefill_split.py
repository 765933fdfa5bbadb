"""Throwaway sweep (benchmarks/notes/kernels.md, "Local rows under every config"): prefill 32K as in
``benchmarks/kernels.py``; the global row and the local rows each alone under 15 configs, and the two
launched apart (one stream, then two streams) against one launch of all rows.

Run on a GPU: ``PYTHONPATH=. python benchmarks/notes/prefill_split.py`` (prints; writes nothing)."""

import json
import sys
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kernels import HKV, HQ, G, prefill_inputs, prefill_rows  # noqa: E402  (benchmarks/kernels.py)

from kvd.gpu_kernels.segpaged_prefill import segpaged_prefill  # noqa: E402

S = 1 << 15


def main() -> None:
    torch.manual_seed(0)
    full = prefill_inputs(S)
    scale = full[0].shape[-1] ** -0.5

    parts = {"glob": (prefill_rows(full, slice(0, 1), slice(0, G)), 1),
             "loc": (prefill_rows(full, slice(1, HKV), slice(G, HQ)), HKV - 1), "full": (full, HKV)}

    def run(part: str, cfg: dict) -> torch.Tensor:
        args, nkv = parts[part]
        return segpaged_prefill(*args, scale=scale, num_kv_heads=nkv, max_seqlen_q=S, config=cfg)

    ref = segpaged_prefill(*full, scale=scale, num_kv_heads=HKV, max_seqlen_q=S)
    configs = {f"{bm}_w{w}_s{st}": dict(BLOCK_M=bm, BLOCK_N=64, num_warps=w, num_stages=st, tma=True)
               for bm, warps in ((64, (4,)), (128, (4, 8)), (256, (8, 16))) for w in warps for st in (2, 3, 4)}
    res = {}
    for name, c in configs.items():
        err = max((run("glob", c).float() - ref[:, :G].float()).abs().max().item(),
                  (run("loc", c).float() - ref[:, G:].float()).abs().max().item())
        res[name] = {p: triton.testing.do_bench(lambda p=p, c=c: run(p, c), rep=150) for p in parts} | {"err": err}
        print(name, json.dumps(res[name]), flush=True)
    best = {p: min(res, key=lambda k, p=p: res[k][p]) for p in parts}
    print("best", {p: (k, res[k][p]) for p, k in best.items()})
    cg, cl = configs[best["glob"]], configs[best["loc"]]
    s1, s2 = torch.cuda.Stream(), torch.cuda.Stream()

    def two_streams() -> None:
        cur = torch.cuda.current_stream()
        s1.wait_stream(cur)
        s2.wait_stream(cur)
        with torch.cuda.stream(s1):
            run("glob", cg)
        with torch.cuda.stream(s2):
            run("loc", cl)
        cur.wait_stream(s1)
        cur.wait_stream(s2)

    seq = triton.testing.do_bench(lambda: (run("glob", cg), run("loc", cl)), rep=150)
    print("two launches, one stream", seq, "two streams", triton.testing.do_bench(two_streams, rep=150))


if __name__ == "__main__":
    main()
