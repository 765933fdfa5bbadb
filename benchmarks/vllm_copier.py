"""The vLLM connector's copy of a prefix load into vLLM's CPU KV blocks, alone (no engine): checks,
then times ``StridedCopier.load_layer`` / ``save_layer`` over every layer beside a numpy memcpy of the
same bytes (the ceiling). ``--base COMMIT`` also times that commit's ``StridedCopier`` (its
``kvd/connectors/vllm/strided.py``, loaded beside this tree's other modules), interleaved with this
one's: an A/B on one machine in one run, checked the same way.

Shape: SmolLM2-135M (30 layers, 3 KV heads, D 64, bf16), a 4,096-token load: 16 chunk entries of 256
tokens with the shipped head map's 7 extents each, into 128-token blocks; layouts ``LBHNC_KT`` (vLLM's
``vec``/``vec16`` ISA: K stored transposed), ``LBHNC`` and, on a CPU with AMX tiles, vLLM's ``amx``
packing (probed from its write kernel; loads as the connector does them: packed by that kernel when
``StridedCopier.adopt_engine_write`` measures it faster, ``strided_only_load_ms`` beside). Correctness:
every loaded block, read back through the layout's index map, equals the extents' tokens.

Usage: ``python benchmarks/vllm_copier.py [--repeats 15] [--base COMMIT]`` -> ``benchmarks/results/vllm_copier.json``.
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

from kvd.connectors.vllm.copy import Piece, make_copier  # noqa: E402
from kvd.connectors.vllm.layout import BlockLayout, known_layout, probe_block_layout  # noqa: E402
from kvd.core.extents import plan_extents  # noqa: E402
from kvd.core.headmap import HeadMap  # noqa: E402
from kvd.core.keys import ModelSpec  # noqa: E402

OUT = ROOT / "benchmarks/results/vllm_copier.json"
H, N, D, L, CHUNK, CHUNKS = 3, 128, 64, 30, 256, 16


def cpu_write(isa: str):
    """vLLM's CPU cache write for ``isa`` (what the connector probes and, for loads, may adopt)."""
    import vllm._custom_ops as ops

    def write(key, value, kv, slots):  # as vLLM's do_kv_cache_update: shaped from kv (a head view too)
        kc, vc = kv.view(kv.shape[0], kv.shape[1], 2 * kv.shape[2], -1).chunk(2, dim=2)
        ops.cpu_attn_reshape_and_cache(key, value, kc, vc, slots, isa)

    return write


def layout_of(name: str) -> BlockLayout:
    """A named layout, or ``amx``: vLLM's AMX packing, probed from its CPU write kernel."""
    if name == "amx":
        return probe_block_layout(cpu_write("amx"), torch.zeros(3, H, N, 2 * D, dtype=torch.bfloat16))
    to = known_layout(name, H, N, D)
    fr = torch.empty_like(to)
    fr[to] = torch.arange(to.numel())
    return BlockLayout(name, H, N, D, to, fr)


def setup(name: str):
    lay = layout_of(name)
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


def base_copier(commit: str):
    """``StridedCopier`` of ``commit``'s ``kvd/connectors/vllm/strided.py``, imported beside this tree."""
    import importlib.util
    import subprocess
    import tempfile

    src = subprocess.run(["git", "show", f"{commit}:kvd/connectors/vllm/strided.py"], cwd=ROOT, check=True,
                         capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / "strided_base.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("strided_base", path)
    mod = sys.modules["strided_base"] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def measure(name: str, repeats: int, base) -> dict:
    lay, ext, blocks, layers = setup(name)
    copiers = {"this": make_copier(lay, layers[0])}
    if name == "amx":  # as the connector: loads packed by the engine's write if that measures faster
        copiers["this"].adopt_engine_write(cpu_write("amx"), layers[0])
        copiers["strided_only"] = make_copier(lay, layers[0])
    if base is not None:
        copiers["base"] = base.StridedCopier(lay, base.half_models(lay, 2))
    for cp in copiers.values():
        for layer in layers:
            layer.zero_()
        for i in range(L):
            cp.load_layer(layers[i], i, pieces_of(ext, blocks))
        check(lay, ext, blocks, layers)  # before any timing
    nbytes = sum(v.numel() * 2 for c in ext for _, v in c)

    def load(cp):
        ps = pieces_of(ext, blocks)  # as the worker: new pieces per load
        for i in range(L):
            cp.load_layer(layers[i], i, ps)

    def save(cp):
        ps = pieces_of(ext, blocks)
        for i in range(L):
            cp.save_layer(layers[i], i, ps)

    src = np.random.default_rng(0).integers(0, 255, nbytes, dtype=np.uint8)
    dst = np.empty_like(src)
    times: dict[str, list[float]] = {}
    for _ in range(3):  # rounds, each copier in turn: the VM's speed drifts within a run
        for who, cp in copiers.items():
            times.setdefault(f"{who}_load", []).append(median_ms(lambda cp=cp: load(cp), repeats))
            times.setdefault(f"{who}_save", []).append(median_ms(lambda cp=cp: save(cp), repeats))
        times.setdefault("memcpy", []).append(median_ms(lambda: np.copyto(dst, src), repeats))
    check(lay, ext, blocks, layers)  # the timed loads left the same bytes (save wrote them back unchanged)
    med = {k: float(np.median(v)) for k, v in times.items()}
    out = {"load_ms": med["this_load"], "save_ms": med["this_save"], "memcpy_ms": med["memcpy"]}
    if name == "amx":
        out["engine_write_adopted"] = copiers["this"].engine_write is not None
        out["strided_only_load_ms"] = med["strided_only_load"]
    if base is not None:
        out["base_load_ms"], out["base_save_ms"] = med["base_load"], med["base_save"]
    out["bytes"] = nbytes
    out["load_GBps"] = nbytes / out["load_ms"] / 1e6
    out["load_vs_memcpy"] = out["memcpy_ms"] / out["load_ms"]
    out["rounds_ms"] = {k: [round(x, 2) for x in v] for k, v in times.items()}
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--base", help="also time this commit's StridedCopier, interleaved (an A/B)")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    base = base_copier(args.base) if args.base else None
    torch.set_num_threads(1)  # as in vLLM's CPU worker here (one OpenMP thread on its pinned core)
    res = {"date": datetime.date.today().isoformat(),
           "machine": f"{platform.machine()} {os.cpu_count()} cores, {platform.python_version()}, torch {torch.__version__}",
           "shape": f"SmolLM2-135M, {CHUNKS * CHUNK} tokens, {CHUNKS} entries x 7 extents, {N}-token blocks, bf16",
           "checked": True}
    if args.base:
        res["base"] = args.base
    for name in ("LBHNC_KT", "LBHNC") + (("amx",) if torch.cpu._is_amx_tile_supported() else ()):
        res[name] = measure(name, args.repeats, base)
        print(name, json.dumps(res[name]), flush=True)
    args.out.write_text(json.dumps(res, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
