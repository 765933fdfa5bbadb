"""Time to first token of position-independent chunk reuse on one H200 (issue 7's speed goals).

Model: Llama-3-8B-shaped (32 layers, hidden 4096, 32 query / 8 KV heads of 128, MLP 14336, vocab
128256, RoPE theta 500000) with random bf16 weights, built from a ``LlamaConfig`` (no download).
Request: 16 documents x 2048 tokens (reusable, cached as chunk entries in GPU memory beforehand) in a
shuffled order, then a 128-token question: 32,896 tokens. TTFT = wall time from the request's token
ids to the first token's logits (chunk lookup, assembly, RoPE shift, the one forward), median of
``--reps`` after a warm-up. ``ttft_host_<method>_s`` adds the time to copy, from pinned host memory,
the chunk KV that the method reads (kvd reads only the local heads' unless Sparse FFN freezes tokens).

Head map: SmolLM2's shipped map (config/heads/smollm2-135m.json) stretched over 32 layers x 8 KV
heads (layer l takes SmolLM2 layer round(l * 29 / 31), KV head h takes SmolLM2 head h * 3 // 8), so the
global-head share and the window mix are the ones the fidelity benchmark measured. Method settings
come from ``kvd.reuse.plan.method_config``, shared with benchmarks/pi_reuse_fidelity.py.

Checks before timing (written to the JSON): the Triton SegPaged and RoPE-shift kernels against their
torch references on random inputs; the engine's full recompute against ``model.forward``; kvd's
forward with the Triton kernels against the sdpa fallback. If the kernels fail, every method runs
with the sdpa fallbacks (``attention_backend`` says which).

Run on the device: ``python benchmarks/pi_reuse_speed.py --out $OUT``; locally: ``--smoke`` (a tiny
model on the CPU, to check the script). ``--plot`` draws accuracy (from pi_reuse_fidelity.json)
against TTFT into pi_reuse.png.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kvd.connectors.hf_pool import HeadLayout, PagePool  # noqa: E402
from kvd.connectors.hf_reuse import chunk_key, compute_chunk, reuse_request  # noqa: E402
from kvd.reuse.chunks import LocalChunkStore  # noqa: E402
from kvd.reuse.plan import BENCH_METHODS, Segment, method_config  # noqa: E402

FULL = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
            num_attention_heads=32, num_key_value_heads=8, head_dim=128)
SMOKE = dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
             num_attention_heads=8, num_key_value_heads=4, head_dim=16)
NAMESPACE, FINGERPRINT = "bench", "0" * 32


def build_model(shape: dict, device: str, dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**shape, max_position_embeddings=65536, rope_theta=500000.0, tie_word_embeddings=False)
    cfg._attn_implementation = "sdpa"
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(old)
    return model.eval()


def stretched_layout(num_layers: int, num_kv_heads: int) -> HeadLayout:
    doc = json.loads((ROOT / "config/heads/smollm2-135m.json").read_text())
    rows = doc["heads"]
    src_l, src_h = len(rows), len(rows[0])
    is_global, window = [], []
    for layer in range(num_layers):
        row = rows[round(layer * (src_l - 1) / max(1, num_layers - 1))]
        specs = [row[h * src_h // num_kv_heads] for h in range(num_kv_heads)]
        is_global.append([s["class"] == "global" for s in specs])
        window.append([int(s.get("window", 0)) for s in specs])
    sink = max(int(s.get("sink", 0)) for row in rows for s in row)
    return HeadLayout.from_grid(is_global, sink=sink, window=window)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str, reps: int) -> tuple[float, object]:
    fn()  # warm-up: compiles kernels, fills allocator caches
    times, out = [], None
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        out = fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def check_kernels(device: str, dtype) -> dict:
    """Triton kernels against their references on random inputs (bf16 tolerances)."""
    from kvd.gpu_kernels import rope_shift, rope_shift_ref, segpaged_prefill, segpaged_prefill_ref

    g = torch.Generator(device="cpu").manual_seed(0)
    T, Hkv, G, D, N = 700, 4, 4, 128, 64
    pages = -(-T // N)
    k_pool = torch.randn(Hkv * pages, N, D, generator=g).to(device=device, dtype=dtype)
    v_pool = torch.randn(Hkv * pages, N, D, generator=g).to(device=device, dtype=dtype)
    table = torch.arange(Hkv * pages, dtype=torch.int32).view(Hkv, pages).to(device)
    ppos = (torch.arange(pages, dtype=torch.int32) * N).repeat(Hkv, 1).to(device)
    lens = torch.full((Hkv,), T, dtype=torch.int32, device=device)
    qpos = torch.sort(torch.randperm(T, generator=g)[:300]).values.to(torch.int32).to(device)
    q = torch.randn(300, Hkv * G, D, generator=g).to(device=device, dtype=dtype)
    cu = torch.tensor([0, 300], dtype=torch.int32, device=device)
    sink = torch.tensor([0, 4, 4, 0], dtype=torch.int32, device=device)
    window = torch.tensor([0, 128, 300, 0], dtype=torch.int32, device=device)
    args = (q, k_pool, v_pool, table, ppos, lens, qpos, cu, sink, window)
    out = segpaged_prefill(*args, scale=D ** -0.5, num_kv_heads=Hkv).float()
    ref = segpaged_prefill_ref(*args, scale=D ** -0.5, num_kv_heads=Hkv).float()
    keys = torch.randn(T, 8, D, generator=g).to(device=device, dtype=dtype)
    inv = (1.0 / 500000.0 ** (torch.arange(0, D, 2, dtype=torch.float32) / D)).to(device)
    delta = torch.randint(0, 30000, (T,), generator=g).to(torch.int32).to(device)
    a, b = rope_shift(keys.clone(), inv, delta).float(), rope_shift_ref(keys.clone(), inv, delta).float()
    return {"segpaged_prefill_rel_err": float((out - ref).norm() / ref.norm()),
            "rope_shift_rel_err": float((a - b).norm() / b.norm())}


def make_request(shape: dict, num_docs: int, doc_tokens: int, question_tokens: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    docs = [torch.randint(100, shape["vocab_size"], (doc_tokens,), generator=g) for _ in range(num_docs)]
    question = torch.randint(100, shape["vocab_size"], (question_tokens,), generator=g)
    order = torch.randperm(num_docs, generator=g).tolist()
    return docs, [Segment(docs[i], reusable=True) for i in order] + [Segment(question)]


def h2d_s(nbytes: int, device: str, piece: int = 256 << 20) -> float:
    """Seconds to copy ``nbytes`` from pinned host memory to the GPU in ``piece``-byte copies (a
    chunk entry's extents are contiguous per head class, so this is what a lease's copy costs)."""
    if nbytes <= 0 or not device.startswith("cuda"):
        return 0.0
    src = torch.empty(min(nbytes, piece), dtype=torch.uint8).pin_memory()
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst[: src.numel()].copy_(src)  # warm-up
    sync(device)
    t0 = time.perf_counter()
    for off in range(0, nbytes, piece):
        n = min(piece, nbytes - off)
        dst[off : off + n].copy_(src[:n], non_blocking=True)
    sync(device)
    return time.perf_counter() - t0


def read_bytes(method: str, cfg, layout: HeadLayout, chunk_bytes: int) -> int:
    """Chunk-entry bytes a method copies from the host tier: none for full recompute, the local-head
    extents for kvd when it keeps cached local KV and freezes no token, every extent otherwise."""
    if not cfg.uses_cache:
        return 0
    if cfg.method == "kvd" and cfg.sparse_ffn is None or (cfg.sparse_ffn and cfg.sparse_ffn.skipped != "freeze"
                                                           and cfg.method == "kvd"):
        if cfg.local_kv == "recomputed":
            return 0
        local = sum(w > 0 for row in layout.window for w in row) / (layout.num_layers * layout.num_kv_heads)
        return int(chunk_bytes * local)
    return chunk_bytes


def run_checks(model, segs, store, layout, device: str, dtype, res: dict) -> str:
    """Correctness before timing; returns the attention backend to time with."""
    backend = "paged"
    if device.startswith("cuda"):
        try:
            res["checks"] = check_kernels(device, dtype)
            if max(res["checks"].values()) > 2e-2:
                backend = "dense"
        except Exception:  # a kernel that does not compile here: time the sdpa fallbacks instead
            res["checks"] = {"kernel_error": traceback.format_exc()[-2000:]}
            backend = "dense"
    ids = torch.tensor([t for s in segs for t in s.token_ids], device=device)[None]
    with torch.no_grad():
        ref = model(ids, logits_to_keep=1, use_cache=False).logits[0, -1].float()
    num_layers, num_kv = model.config.num_hidden_layers, model.config.num_key_value_heads
    glob = HeadLayout.all_global(num_layers, num_kv)
    pool = PagePool(glob, head_dim=model.config.head_dim, dtype=dtype, device=device, page_tokens=64)
    mine = reuse_request(model, segs, method_config("recompute"), pool, store, namespace=NAMESPACE,
                         fingerprint=FINGERPRINT, attention=backend).logits[0]
    out = {"recompute_vs_model_cos": float(torch.nn.functional.cosine_similarity(mine, ref, dim=0)),
           "recompute_vs_model_top1": bool(mine.argmax() == ref.argmax())}
    if backend == "paged":
        cfg = method_config("kvd")
        a = reuse_request(model, segs, cfg, PagePool(layout, head_dim=model.config.head_dim, dtype=dtype,
                          device=device, page_tokens=64), store, namespace=NAMESPACE, fingerprint=FINGERPRINT,
                          attention="paged").logits[0]
        b = reuse_request(model, segs, cfg, PagePool(layout, head_dim=model.config.head_dim, dtype=dtype,
                          device=device, page_tokens=64), store, namespace=NAMESPACE, fingerprint=FINGERPRINT,
                          attention="dense").logits[0]
        out["kvd_paged_vs_dense_cos"] = float(torch.nn.functional.cosine_similarity(a, b, dim=0))
        if out["kvd_paged_vs_dense_cos"] < 0.99:
            backend = "dense"
    res.setdefault("checks", {}).update(out)
    res["attention_backend"] = backend
    return backend


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results"))
    ap.add_argument("--smoke", action="store_true", help="tiny model on the CPU (checks the script)")
    ap.add_argument("--plot", action="store_true", help="only draw the plot from the two result files")
    ap.add_argument("--docs", type=int, default=16)
    ap.add_argument("--doc-tokens", type=int, default=2048)
    ap.add_argument("--question-tokens", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--methods", default=",".join(BENCH_METHODS))
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.plot:
        plot(out)
        return 0
    device = "cpu" if args.smoke or not torch.cuda.is_available() else "cuda"
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    shape = SMOKE if args.smoke else FULL
    if args.smoke:
        args.docs, args.doc_tokens, args.question_tokens, args.reps = 4, 96, 16, 1
    res = {"date": time.strftime("%Y-%m-%d"), "device": torch.cuda.get_device_name() if device == "cuda" else
           platform.processor() or "cpu", "torch": torch.__version__, "dtype": str(dtype), "shape": shape,
           "docs": args.docs, "doc_tokens": args.doc_tokens, "question_tokens": args.question_tokens,
           "reps": args.reps}
    path = out / ("pi_reuse_speed.smoke.json" if args.smoke else "pi_reuse_speed.json")

    def save():
        path.write_text(json.dumps(res, indent=1) + "\n")

    t0 = time.perf_counter()
    model = build_model(shape, device, dtype)
    res["build_s"] = round(time.perf_counter() - t0, 1)
    layout = stretched_layout(shape["num_hidden_layers"], shape["num_key_value_heads"])
    res["global_head_share"] = 1 - sum(w > 0 for r in layout.window for w in r) / (layout.num_layers * layout.num_kv_heads)
    docs, segs = make_request(shape, args.docs, args.doc_tokens, args.question_tokens, seed=1)
    store = LocalChunkStore()
    with torch.no_grad():
        t0 = time.perf_counter()
        for d in docs:
            seg = Segment(d, reusable=True)
            store.put(chunk_key(seg, namespace=NAMESPACE, fingerprint=FINGERPRINT), compute_chunk(model, seg))
        sync(device)
        res["chunks_s"] = round(time.perf_counter() - t0, 2)
        res["num_tokens"] = sum(len(s) for s in segs)
        save()
        backend = run_checks(model, segs, store, layout, device, dtype, res)
        save()
        time_methods(model, segs, store, layout, device, dtype, backend, args, res, save)
    save()
    print(json.dumps({k: v for k, v in res.items() if k.startswith(("ttft", "speedup", "checks", "attention"))},
                     indent=1))
    return 0


def time_methods(model, segs, store, layout, device, dtype, backend, args, res, save) -> None:
    cfgm = model.config
    glob = HeadLayout.all_global(cfgm.num_hidden_layers, cfgm.num_key_value_heads)
    pools = {}
    for name in ("kvd", "full"):
        lay = layout if name == "kvd" else glob
        pools[name] = PagePool(lay, head_dim=cfgm.head_dim, dtype=dtype, device=device, page_tokens=64)
        pools[name].reserve(res["num_tokens"])
    ids = torch.tensor([t for s in segs for t in s.token_ids], device=device)[None]
    try:
        res["ttft_recompute_model_s"], _ = timed(lambda: model(ids, logits_to_keep=1).logits, device, args.reps)
    except Exception:
        res["error_recompute_model"] = traceback.format_exc()[-2000:]
    chunk_bytes = sum(kv.numel() * kv.element_size() for kv in store._entries.values())
    for method in args.methods.split(","):
        cfg = method_config(method)
        pool = pools["kvd" if method.startswith("kvd") else "full"]

        def run(cfg=cfg, pool=pool):
            pool.clear()
            return reuse_request(model, segs, cfg, pool, store, namespace=NAMESPACE, fingerprint=FINGERPRINT,
                                 attention=backend)

        try:
            dt, r = timed(run, device, args.reps)
        except Exception:
            res[f"error_{method}"] = traceback.format_exc()[-2000:]
            save()
            continue
        res[f"ttft_{method}_s"] = dt
        res[f"active_fraction_{method}"] = r.active_fraction
        res[f"ffn_fraction_{method}"] = r.ffn_fraction
        res[f"host_bytes_{method}"] = read_bytes(method, cfg, layout, chunk_bytes)
        res[f"ttft_host_{method}_s"] = dt + h2d_s(res[f"host_bytes_{method}"], device)
        print(f"{method}: ttft {dt:.3f} s (with host load {res[f'ttft_host_{method}_s']:.3f} s)", flush=True)
        save()
    if "ttft_recompute_s" in res and "ttft_recompute_model_s" in res:
        res["ttft_recompute_engine_s"] = res["ttft_recompute_s"]
        res["ttft_recompute_s"] = min(res["ttft_recompute_s"], res["ttft_recompute_model_s"])
    for m in args.methods.split(","):
        if f"ttft_{m}_s" in res and "ttft_recompute_s" in res:
            res[f"speedup_{m}"] = res["ttft_recompute_s"] / res[f"ttft_{m}_s"]


# ---- predicted TTFT (a cost model, for when no GPU run could be made) -----------------------------

# Rates measured on this workplace's H200 (benchmarks/results/kernels.json, notes/kernels.md) or given
# by the device docs; the model is a roofline per operation, each op at its own measured rate.
RATES = {
    "matmul_TFLOPs": 0.85 * 790,  # bf16 GEMM: 790 measured on 8192^3; 85% assumed for the model's shapes
    "sdpa_causal_TFLOPs": 8.8e12 / 14.90e-3 / 1e12,  # SDPA causal prefill 32K x 32 heads: 14.90 ms
    "segpaged_TFLOPs": 1.34e12 / 4.86e-3 / 1e12,  # SegPaged prefill 32K (1 global + 7 local heads): 4.86 ms
    "hbm_TBps": 4.25,  # device-to-device copy
    "h2d_GBps": 55.4,  # pinned host -> GPU
    "num_sms": 132,
    "host_overhead_per_layer_ms": 0.3,  # assumed (page tables, selections, launches); not measured
}


def _pairs(q_pos, reach: float) -> float:
    """Query-key pairs the attention computes for queries at ``q_pos`` (numpy int array), each seeing
    ``min(p + 1, reach)`` keys (reach = inf for a global head)."""
    import numpy as np

    return float(np.minimum(q_pos + 1, reach).sum())


def _query_sets(name: str, cfg, S: int, docs: int, doc_tokens: int, q_tokens: int, num_layers: int):
    """Per layer: positions whose hidden states the method computes (expected, selections uniform)."""
    import numpy as np

    rng = np.random.default_rng(0)
    allpos = np.arange(S)
    question = np.arange(docs * doc_tokens, S)
    starts = np.arange(docs) * doc_tokens

    def firsts(k):
        return (starts[:, None] + np.arange(min(k, doc_tokens))[None, :]).reshape(-1)

    def sample(exclude, frac):
        free = np.setdiff1d(allpos, exclude)
        return np.sort(np.concatenate([exclude, rng.choice(free, int(round(frac * free.size)), replace=False)]))

    if not cfg.uses_cache:
        return [allpos] * num_layers
    if cfg.method == "naive":
        return [question] * num_layers
    if cfg.method == "epic":
        return [np.sort(np.concatenate([firsts(cfg.epic_tokens), question]))] * num_layers
    if cfg.method == "cacheblend":
        sel = sample(question, cfg.cacheblend_ratio)
        return [allpos if layer < cfg.cacheblend_layer else sel for layer in range(num_layers)]
    sf = cfg.sparse_ffn
    if sf is None or sf.skipped != "freeze":
        return [allpos] * num_layers
    keep = sample(np.union1d(question, firsts(cfg.boundary_tokens)), sf.keep_fraction or sf.mass)
    return [allpos if layer <= sf.dense_layers else keep for layer in range(num_layers)]


def predict(shape: dict, layout: HeadLayout, docs: int, doc_tokens: int, q_tokens: int, methods) -> dict:
    """Predicted TTFT per method from exact FLOP and byte counts at the measured rates (RATES)."""
    R = RATES
    h, inter, L = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"]
    Hq, Hkv, D = shape["num_attention_heads"], shape["num_key_value_heads"], shape["head_dim"]
    G, S, N = Hq // Hkv, docs * doc_tokens + q_tokens, 64
    attn_w = h * (Hq + 2 * Hkv) * D + Hq * D * h  # projection weights (elements)
    ffn_w = 3 * h * inter

    def gemm_s(tokens, weights):  # roofline: FLOPs at the GEMM rate vs reading the weights once
        return max(2 * tokens * weights / (R["matmul_TFLOPs"] * 1e12), 2 * weights / (R["hbm_TBps"] * 1e12))

    kv_layer_bytes = 2 * Hkv * S * D * 2  # K and V of one layer, bf16
    out = {"predicted_rates": R, "predicted_num_tokens": S}
    for name in methods:
        cfg = method_config(name)
        sets = _query_sets(name, cfg, S, docs, doc_tokens, q_tokens, L)
        t = 0.0
        for layer, qpos in enumerate(sets):
            A = qpos.size
            ffn_tokens = A
            if cfg.sparse_ffn is not None and cfg.sparse_ffn.skipped == "freeze" and layer == cfg.sparse_ffn.dense_layers:
                ffn_tokens = sets[min(layer + 1, L - 1)].size
            t += gemm_s(A, attn_w) + gemm_s(ffn_tokens, ffn_w)
            if cfg.method == "cacheblend" and layer == cfg.cacheblend_layer:
                t += gemm_s(S, h * Hkv * D)  # the check layer's K projection for every token
            lay = layout if name.startswith("kvd") else HeadLayout.all_global(L, Hkv)
            dense = A == S
            programs = -(-A // (128 // G)) * Hkv  # SegPaged query tiles x rows
            occupancy = min(1.0, programs / R["num_sms"])
            for head in range(Hkv):
                w, sink = lay.window[layer][head], lay.sink[layer][head]
                reach = float("inf") if w == 0 else (-(-sink // N) * N if sink else 0) + w + N
                flops = 4 * D * G * _pairs(qpos, reach)
                rate = R["sdpa_causal_TFLOPs"] if (dense and w == 0) else R["segpaged_TFLOPs"] * occupancy
                t += flops / (rate * 1e12)
            if cfg.uses_cache or name.startswith("kvd"):  # K/V assembled over S, written to the pool
                t += 3 * kv_layer_bytes / (R["hbm_TBps"] * 1e12) + R["host_overhead_per_layer_ms"] / 1e3
        if cfg.uses_cache:  # chunk copies into the assembled context, RoPE shift of the keys
            t += (2 * L * kv_layer_bytes + L * kv_layer_bytes) / (R["hbm_TBps"] * 1e12)
        out[f"predicted_ttft_{name}_s"] = t
        out[f"predicted_active_fraction_{name}"] = sum(q.size for q in sets) / (S * L)
    base = out["predicted_ttft_recompute_s"]
    for name in methods:
        out[f"predicted_speedup_{name}"] = base / out[f"predicted_ttft_{name}_s"]
    return out


def plot(out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fid = json.loads((out / "pi_reuse_fidelity.json").read_text())
    spd = json.loads((out / "pi_reuse_speed.json").read_text())
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for m in BENCH_METHODS:
        if f"ttft_{m}_s" not in spd or f"acc_{m}" not in fid:
            continue
        x, y = spd[f"ttft_{m}_s"], 100 * fid[f"acc_{m}"]
        ax.scatter([x], [y], s=60, marker="*" if m.startswith("kvd") else "o", zorder=3)
        ax.annotate(f"{m}\n(top-1 {fid[f'top1_{m}']:.2f})", (x, y), textcoords="offset points", xytext=(6, 4),
                    fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel(f"TTFT, s (H200, Llama-3-8B shape, {spd['num_tokens']} tokens, log scale)")
    ax.set_ylabel("answer accuracy, % (SmolLM2-135M, CPU fp32)")
    ax.set_title("Chunk reuse: accuracy vs time to first token")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "pi_reuse.png", dpi=120)


if __name__ == "__main__":
    sys.exit(main())
