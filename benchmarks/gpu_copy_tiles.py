"""Tile sweep of the gather/scatter kernel on the GPU machine (issue 18): which (tokens per program,
warps) moves segments between kvd's form and vLLM's paged GPU layout fastest, and how that compares
with a plain device copy of as many bytes.

Shape: the gpu_tier benchmark's layer (Llama-3-8B KV: 8 KV heads, head_dim 128, bf16; 128 entries of
256 tokens; blocks of 16 tokens, a shuffled block table), ``LBNHC``. Four layers and four buffers are
rotated so that L2 (50 MB on H100) holds none of a timed launch's 128 MiB. Every configuration is
checked first: the destination is poisoned, the kernel runs, and the result must equal plain torch
indexing bit for bit. The compiler's register and spill counts are recorded beside each time.

    python3 benchmarks/gpu_copy_tiles.py --out DIR      (GPU only; writes DIR/gpu_copy_tiles.json)
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import triton.testing  # noqa: E402

from kvd.gpu_kernels.gather_scatter import TILE, _tile, gather_segments, scatter_segments  # noqa: E402

S, T, H, N, D = 128, 256, 8, 16, 128
ROT = 4


def make(device):
    g = torch.Generator(device="cpu").manual_seed(0)
    nblk = S * T // N + 64
    layers = [torch.empty((nblk, N, H, 2 * D), dtype=torch.bfloat16, device=device).permute(0, 2, 1, 3)
              for _ in range(ROT)]  # logical [B, H, N, 2D], physical [B, N, H, 2D]: LBNHC
    perm = torch.randperm(nblk, generator=g)[: S * T // N].view(S, T // N).to(device)
    seg = 2 * T * D
    bufs = [torch.randn(S * H * seg, generator=g).to(torch.bfloat16).to(device) for _ in range(ROT)]
    offs = (torch.arange(S * H, dtype=torch.int64) * seg).view(S, H).to(device)
    heads = torch.arange(H, dtype=torch.int64, device=device)
    return layers, perm, bufs, offs, heads


def expected(layer, perm, buf):
    """The segments of ``buf`` as the paged layer must hold them (plain torch indexing)."""
    seg = buf.view(S, H, 2, T, D)  # K[T, D] then V[T, D] per (entry, head)
    out = layer.clone()
    for s in range(S):
        blocks = perm[s]
        kv = torch.cat([seg[s, :, 0], seg[s, :, 1]], dim=-1)  # [H, T, 2D]
        out[blocks] = kv.view(H, T // N, N, 2 * D).permute(1, 0, 2, 3)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    dev = torch.device("cuda")
    layers, perm, bufs, offs, heads = make(dev)
    nbytes = S * H * 2 * T * D * 2
    want = [expected(layers[i].fill_(0), perm, bufs[i]) for i in range(ROT)]
    src = [b.clone() for b in bufs]
    dst = [torch.empty_like(b) for b in bufs]
    i = [0]
    used = perm.flatten()
    unused = torch.ones(layers[0].shape[0], dtype=torch.bool, device=dev)
    unused[used] = False

    def copy():
        k = i[0] = (i[0] + 1) % ROT
        dst[k].copy_(src[k])

    copy_ms = triton.testing.do_bench(copy, warmup=50, rep=300, return_mode="median")
    rows = []
    for block_t in (4, 8, 16, 32, 64):
        for warps in (1, 2, 4, 8):
            for aligned in (True, False):
                tile = (block_t, warps)
                row = {"block_t": block_t, "num_warps": warps, "aligned": aligned}
                try:
                    for k in range(ROT):  # correctness first: poisoned destination, exact result
                        layers[k].fill_(float("nan"))
                        ck = scatter_segments(layers[k], perm, heads, bufs[k], offs, layout="LBNHC", aligned=aligned,
                                              tile=tile)
                        got, w = layers[k][used], want[k][used]
                        assert torch.equal(got.view(torch.int16), w.view(torch.int16)), "scatter wrong"
                        assert layers[k][unused].isnan().all(), "scatter wrote outside its blocks"
                        back = torch.full_like(bufs[k], float("nan"))
                        gather_segments(layers[k], perm, heads, back, offs, layout="LBNHC", aligned=aligned, tile=tile)
                        assert torch.equal(back.view(torch.int16), bufs[k].view(torch.int16)), "gather wrong"
                    row.update(n_regs=getattr(ck, "n_regs", None), n_spills=getattr(ck, "n_spills", None))

                    def run(fn, buf_of, aligned=aligned, tile=tile):
                        def go():
                            k = i[0] = (i[0] + 1) % ROT
                            fn(layers[k], perm, heads, buf_of[k], offs, layout="LBNHC", aligned=aligned, tile=tile)
                        return triton.testing.do_bench(go, warmup=50, rep=300, return_mode="median")

                    sc = run(scatter_segments, bufs)
                    ga = run(gather_segments, dst)
                    row.update(scatter_GBps=nbytes / sc / 1e6, gather_GBps=nbytes / ga / 1e6, ok=True)
                except Exception as e:  # noqa: BLE001 - a configuration that fails is recorded, not fatal
                    row.update(ok=False, error=f"{type(e).__name__}: {e}"[:300])
                rows.append(row)
                print(row, flush=True)
    copy_GBps = nbytes / copy_ms / 1e6
    good = [r for r in rows if r.get("ok")]
    best = max(good, key=lambda r: r["scatter_GBps"] + r["gather_GBps"])
    default = next((r for r in good if (r["block_t"], r["num_warps"]) == _tile(D) and r["aligned"]), None)
    out = {"date": date.today().isoformat(), "device": torch.cuda.get_device_name(dev), "torch": torch.__version__,
           "shape": {"entries": S, "tokens": T, "heads": H, "block_tokens": N, "head_dim": D, "dtype": "bf16",
                     "layout": "LBNHC", "bytes_per_launch": nbytes},
           "copy_GBps": copy_GBps, "default_tile": TILE, "default": default, "best": best, "rows": rows}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "gpu_copy_tiles.json").write_text(json.dumps(out, indent=1))
    print(f"device copy {copy_GBps:.0f} GB/s (bytes copied / time)")
    for r in sorted(good, key=lambda r: -(r["scatter_GBps"] + r["gather_GBps"]))[:12]:
        print(f"BLOCK_T {r['block_t']:3d} warps {r['num_warps']} aligned {r['aligned']!s:5}  scatter "
              f"{r['scatter_GBps']:6.0f}  gather {r['gather_GBps']:6.0f} GB/s  regs {r['n_regs']} spills {r['n_spills']}")
    print("default", default)
    return 0


if __name__ == "__main__":
    sys.exit(main())
