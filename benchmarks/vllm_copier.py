"""The vLLM connector's copy of a prefix load into vLLM's CPU KV blocks, alone (no engine): checks,
then times ``StridedCopier.load_layer`` / ``save_layer`` over every layer beside a numpy memcpy of the
same bytes (the ceiling), and pass A (extents -> token-ordered staging) apart from pass B (staging ->
the ISA's packing).

Shape: SmolLM2-135M (30 layers, 3 KV heads, D 64, bf16), a 4,096-token load: 16 chunk entries of 256
tokens with the shipped head map's 7 extents each, into 128-token blocks; layouts ``LBHNC_KT`` (vLLM's
``vec``/``vec16`` ISA: K stored transposed) and ``LBHNC``. Correctness: every loaded block, read back
through the layout's index map, equals the extents' tokens.

Usage: ``python benchmarks/vllm_copier.py [--repeats 15]`` -> ``benchmarks/results/vllm_copier.json``.
Timings are medians of interleaved repeats on this machine; compare only figures of one run.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kvd.client.views import copy_block  # noqa: E402
from kvd.connectors.vllm.copy import Piece, make_copier  # noqa: E402
from kvd.connectors.vllm.layout import BlockLayout, known_layout  # noqa: E402
from kvd.core.extents import plan_extents  # noqa: E402
from kvd.core.headmap import HeadMap  # noqa: E402
from kvd.core.keys import ModelSpec  # noqa: E402

OUT = ROOT / "benchmarks/results/vllm_copier.json"
H, N, D, L, CHUNK, CHUNKS = 3, 128, 64, 30, 256, 16


def setup(name: str):
    to = known_layout(name, H, N, D)
    fr = torch.empty_like(to)
    fr[to] = torch.arange(to.numel())
    lay = BlockLayout(name, H, N, D, to, fr)
    hm = HeadMap.load(ROOT / "kvd/data/heads/smollm2-135m.json").model_copy(update={"fingerprint": None})
    plans = plan_extents(ModelSpec("m", num_layers=L, num_kv_heads=H, head_dim=D, kv_dtype="bfloat16"), hm, CHUNK)
    g = torch.Generator().manual_seed(0)
    ext = [[(p, torch.randn(p.num_segments, 2, CHUNK, D, generator=g).bfloat16()) for p in plans.values()]
           for _ in range(CHUNKS)]
    blocks = [[2 * c + 7, 2 * c + 8] for c in range(CHUNKS)]  # not from 0: offsets matter
    layers = [torch.zeros(2 * CHUNKS + 10, H, N, 2 * D).bfloat16() for _ in range(L)]
    return lay, ext, blocks, layers


def pieces_of(ext, blocks):
    return [Piece(blocks[c], 0, CHUNK, ext[c]) for c in range(CHUNKS)]


def check(lay, ext, blocks, layers) -> None:
    """Every block holds, at the layout's positions, the tokens of its chunk's extents."""
    for c in range(CHUNKS):
        for plan, view in ext[c]:
            for i, (layer, head) in enumerate(plan.heads):
                flat = layers[layer].reshape(layers[layer].shape[0], -1)
                for j, b in enumerate(blocks[c]):
                    canon = flat[b][lay.to_canon].view(H, 2, N, D)
                    assert torch.equal(canon[head], view[i, :, j * N:(j + 1) * N]), (c, plan.head_class, layer, head)


def median_ms(fn, repeats: int) -> float:
    fn()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts) * 1e3)


def measure(name: str, repeats: int) -> dict:
    lay, ext, blocks, layers = setup(name)
    cp = make_copier(lay, layers[0])
    pieces = pieces_of(ext, blocks)
    for i in range(L):
        cp.load_layer(layers[i], i, pieces)
    check(lay, ext, blocks, layers)  # before any timing
    nbytes = sum(v.numel() * 2 for c in ext for _, v in c)

    def load():
        ps = pieces_of(ext, blocks)  # as the worker: new pieces per load
        for i in range(L):
            cp.load_layer(layers[i], i, ps)

    def save():
        ps = pieces_of(ext, blocks)
        for i in range(L):
            cp.save_layer(layers[i], i, ps)

    def pass_a():
        ps = pieces_of(ext, blocks)
        for i in range(L):
            stage = cp._staging(layers[i], ps)
            for src, dst in cp._extent_pairs(stage, i, ps):
                copy_block(dst, src, non_blocking=False)

    src = np.random.default_rng(0).integers(0, 255, nbytes, dtype=np.uint8)
    dst = np.empty_like(src)
    out = {"load_ms": median_ms(load, repeats), "save_ms": median_ms(save, repeats),
           "pass_a_ms": median_ms(pass_a, repeats), "memcpy_ms": median_ms(lambda: np.copyto(dst, src), repeats)}
    check(lay, ext, blocks, layers)  # the timed loads left the same bytes (save wrote them back unchanged)
    out["bytes"] = nbytes
    out["load_GBps"] = nbytes / out["load_ms"] / 1e6
    out["load_vs_memcpy"] = out["memcpy_ms"] / out["load_ms"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=15)
    args = ap.parse_args()
    torch.set_num_threads(1)  # as in vLLM's CPU worker here (one OpenMP thread on its pinned core)
    res = {"date": datetime.date.today().isoformat(),
           "machine": f"{platform.machine()} {os.cpu_count()} cores, {platform.python_version()}, torch {torch.__version__}",
           "shape": f"SmolLM2-135M, {CHUNKS * CHUNK} tokens, {CHUNKS} entries x 7 extents, {N}-token blocks, bf16",
           "checked": True}
    for name in ("LBHNC_KT", "LBHNC"):
        res[name] = measure(name, args.repeats)
        print(name, json.dumps(res[name]), flush=True)
    OUT.write_text(json.dumps(res, indent=1) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
