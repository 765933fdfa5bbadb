"""Where a 4K load's copy into vLLM's ``amx`` KV packing spends its time, and vLLM's own cache write
as pass B (docs/vllm.md, "Why the amx layout was slow"). Needs a CPU with AMX tiles.

Same shape as ``benchmarks/vllm_copier.py`` (SmolLM2-135M, 4,096 tokens, 16 entries x 7 extents,
128-token blocks, bf16). Per 30-layer load: pass A (extents -> staging), pass B for K and for V with
numpy's strided copy, pass B by ``cpu_attn_reshape_and_cache`` (both halves); and for ``vec`` the
two pass Bs as well. Checks first: the kernel's pass B leaves the same bytes as the strided one. Then
``amx_one_extent_loads``: whole loads of entries without a head map, straight from the extents to the
kernel (pass A skipped), through the staging, and strided (medians of interleaved rounds);
``amx_two_extent_loads`` the same for entries whose heads a head map splits in two extents (heads [0:1]
and [1:3] of every layer), each written by the kernel into a head view of the layer.

``python benchmarks/notes/vllm_amx_pass_b.py [OUT]`` -> ``benchmarks/results/vllm_amx_pass_b.json`` or OUT.
"""

from __future__ import annotations

import datetime
import json
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import benchmarks.vllm_copier as VC  # noqa: E402
from kvd.client.views import copy_block  # noqa: E402
from kvd.connectors.vllm.copy import make_copier  # noqa: E402
from kvd.connectors.vllm.layout import probe_block_layout  # noqa: E402

H, N, D, L = VC.H, VC.N, VC.D, VC.L
ROUNDS = 5


def slots_of(pieces) -> torch.Tensor:
    return torch.tensor([b * N + n for p in pieces for b in p.block_ids for n in range(N)], dtype=torch.int64)


def phases(isa: str) -> dict:
    write = VC.cpu_write(isa)
    lay = probe_block_layout(write, torch.zeros(3, H, N, 2 * D, dtype=torch.bfloat16))
    _, ext, blocks, layers = VC.setup("LBHNC")
    cp = make_copier(lay, layers[0])  # the strided copier, engine write not adopted
    pieces = VC.pieces_of(ext, blocks)
    slots = slots_of(pieces)
    acc = {"pass_a_ms": 0.0, "pass_b_numpy_k_ms": 0.0, "pass_b_numpy_v_ms": 0.0, "pass_b_kernel_ms": 0.0}
    ref = [torch.zeros_like(x) for x in layers]
    for r in range(ROUNDS + 1):
        for i in range(L):
            t0 = time.perf_counter()
            stage = cp._staging(layers[i], pieces)
            for src, dst in cp._extent_pairs(stage, i, pieces):
                copy_block(dst, src, non_blocking=False)
            t1 = time.perf_counter()
            runs, _, _, _ = cp._targets(ref[i], pieces)
            for k, (src, dst) in enumerate(cp._block_pairs(stage, ref[i], runs)):
                t = time.perf_counter()
                copy_block(dst, src, non_blocking=False)
                acc["pass_b_numpy_v_ms" if k % 2 else "pass_b_numpy_k_ms"] += (time.perf_counter() - t) * (r > 0)
            t2 = time.perf_counter()
            write(stage[:, 0].permute(1, 0, 2), stage[:, 1].permute(1, 0, 2), layers[i], slots)
            acc["pass_b_kernel_ms"] += (time.perf_counter() - t2) * (r > 0)
            acc["pass_a_ms"] += (t1 - t0) * (r > 0)
            if r == 0:
                assert torch.equal(layers[i].view(torch.uint8), ref[i].view(torch.uint8)), (isa, i)
    return {"layout": lay.name, **{k: round(v * 1e3 / ROUNDS, 2) for k, v in acc.items()}, "checked": True}


def extent_loads(global_heads: list[int] | None) -> dict:
    """Whole 4K loads into the ``amx`` packing: straight from the extents to vLLM's write (the
    connector's path), through the staging, and the strided copy; the three checked equal first, then
    timed in turn. ``global_heads`` None: entries without a head map (one extent each, as
    ``vllm_e2e``'s); else a head map with those heads global in every layer, the others local (two
    extents per entry, each a consecutive run of heads: the direct path writes each into a head view
    of the layer, checked at start as the connector does, ``EngineLoads._split_write_ok``)."""
    from kvd.connectors.vllm.copy import Piece
    from kvd.core.extents import plan_extents
    from kvd.core.headmap import HeadMap
    from kvd.core.keys import ModelSpec

    lay = VC.layout_of("amx")
    hm = None if global_heads is None else HeadMap.from_classes(
        "m", [[h in global_heads for h in range(H)]] * L, sink=4, window=1024)
    plans = plan_extents(ModelSpec("m", num_layers=L, num_kv_heads=H, head_dim=D, kv_dtype="bfloat16"), hm,
                         VC.CHUNK)
    g = torch.Generator().manual_seed(0)
    ext = [[(p, torch.randn(p.num_segments, 2, VC.CHUNK, D, generator=g).bfloat16()) for p in plans.values()]
           for _ in range(VC.CHUNKS)]
    blocks = [[2 * c + 7, 2 * c + 8] for c in range(VC.CHUNKS)]
    pieces = [Piece(blocks[c], 0, VC.CHUNK, ext[c]) for c in range(VC.CHUNKS)]
    cp = make_copier(lay, torch.zeros(1, H, N, 2 * D, dtype=torch.bfloat16))
    write = VC.cpu_write("amx")
    cp.engine_split = cp._split_write_ok(write, torch.zeros(2 * VC.CHUNKS + 10, H, N, 2 * D).bfloat16())
    assert cp.engine_split and all(cp._direct_rows(pieces[0], i) is not None for i in range(L))
    direct = cp._write_direct

    def mode(name: str) -> None:
        cp.engine_write = None if name == "strided" else write
        cp._write_direct = (lambda *a: False) if name == "staged" else direct

    out, results = {}, {}
    for name in ("direct", "staged", "strided"):
        mode(name)
        layers = [torch.zeros(2 * VC.CHUNKS + 10, H, N, 2 * D).bfloat16() for _ in range(L)]
        for i in range(L):
            cp.load_layer(layers[i], i, pieces)
        results[name] = layers
    assert all(torch.equal(a.view(torch.uint8), b.view(torch.uint8)) for name in ("staged", "strided")
               for a, b in zip(results["direct"], results[name]))
    layers = results["direct"]
    for _ in range(ROUNDS):
        for name in ("direct", "staged", "strided"):
            mode(name)
            t0 = time.perf_counter()
            for i in range(L):
                cp.load_layer(layers[i], i, pieces)
            out.setdefault(f"{name}_load_ms", []).append((time.perf_counter() - t0) * 1e3)
    return {k: round(sorted(v)[len(v) // 2], 2) for k, v in out.items()} | {
        "extents_per_entry": len(plans), "checked": True}


def main() -> None:
    torch.set_num_threads(1)
    res = {"date": datetime.date.today().isoformat(), "machine": f"{platform.machine()}, torch {torch.__version__}",
           "shape": "SmolLM2-135M, 4096 tokens, 16 entries x 7 extents, 128-token blocks, bf16; ms per 30-layer load"}
    for isa in ("vec", "amx") if torch.cpu._is_amx_tile_supported() else ("vec",):
        res[isa] = phases(isa)
        print(isa, json.dumps(res[isa]), flush=True)
    if "amx" in res:
        for key, heads in (("amx_one_extent_loads", None), ("amx_two_extent_loads", [0])):
            res[key] = extent_loads(heads)
            print(key, json.dumps(res[key]), flush=True)
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "benchmarks/results/vllm_amx_pass_b.json"
    out.write_text(json.dumps(res, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
