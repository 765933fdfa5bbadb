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
torch references on random inputs; the engine's full recompute against ``model.forward`` (a gate: its
last-token logits must agree in argmax and to cosine ``RECOMPUTE_MIN_COS``, else nothing is timed and
the run exits non-zero); kvd's forward with the Triton kernels against the sdpa fallback. If the
kernels fail, every method runs with the sdpa fallbacks (``attention_backend`` says which).

Run on the device: ``python benchmarks/pi_reuse_speed.py --out $OUT``; locally: ``--smoke`` (a tiny
model on the CPU, to check the script). ``--plot`` draws accuracy (from pi_reuse_fidelity.json)
against TTFT into pi_reuse.png.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from pi_reuse_costmodel import predict, read_bytes  # noqa: E402

from kvd.connectors.hf.pool import PagePool  # noqa: E402
from kvd.connectors.hf.reuse import chunk_key, compute_chunk, reuse_request  # noqa: E402
from kvd.core.headmap import HeadMap  # noqa: E402
from kvd.reuse.chunks import LocalChunkStore  # noqa: E402
from kvd.reuse.plan import BENCH_METHODS, Segment, method_config  # noqa: E402
from kvd.testing.models import random_llama  # noqa: E402

FULL = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
            num_attention_heads=32, num_key_value_heads=8, head_dim=128)
SMOKE = dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
             num_attention_heads=8, num_key_value_heads=4, head_dim=16)
NAMESPACE, FINGERPRINT = "bench", "0" * 32
RECOMPUTE_MIN_COS = 0.999  # the engine's recompute vs model.forward, last-token logits (1.0000 on the H200)


class GateFailed(RuntimeError):
    """A correctness check before timing failed: nothing is timed."""


def recompute_gate(checks: dict) -> str | None:
    """Why the engine's full recompute disagrees with ``model.forward`` (None: it agrees). The engine
    path (page pool, chunk store, ``reuse_request``) is what every method is timed through, so a
    recompute that gives other logits than the model means every TTFT below times a wrong computation."""
    cos, top1 = checks.get("recompute_vs_model_cos"), checks.get("recompute_vs_model_top1")
    if cos is None or top1 is None:
        return "the recompute check did not run"
    if not top1 or not cos >= RECOMPUTE_MIN_COS:
        return f"the engine's recompute differs from model.forward: cos {cos:.6f}, same top-1 {top1}"
    return None


def split_methods(text: str) -> list[str]:
    """``--methods`` list; commas inside ``[...]`` (Sparse FFN overrides) do not split."""
    return [m for m in re.split(r",(?![^\[]*\])", text) if m]


def build_model(shape: dict, device: str, dtype):
    return random_llama(device, dtype=dtype, **shape, max_position_embeddings=65536, rope_theta=500000.0,
                        tie_word_embeddings=False)


def stretched_map(num_layers: int, num_kv_heads: int) -> HeadMap:
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
    return HeadMap.from_classes("smollm2-135m-stretched", is_global, sink=sink, window=window)


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


def run_checks(model, segs, store, head_map, device: str, dtype, res: dict) -> str:
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
    glob = HeadMap.all_global("full", num_layers, num_kv)
    pool = PagePool(glob, head_dim=model.config.head_dim, dtype=dtype, device=device, page_tokens=64)
    mine = reuse_request(model, segs, method_config("recompute"), pool, store, namespace=NAMESPACE,
                         fingerprint=FINGERPRINT, attention=backend).logits[0]
    out = {"recompute_vs_model_cos": float(torch.nn.functional.cosine_similarity(mine, ref, dim=0)),
           "recompute_vs_model_top1": bool(mine.argmax() == ref.argmax())}
    if backend == "paged":
        cfg = method_config("kvd")
        a = reuse_request(model, segs, cfg, PagePool(head_map, head_dim=model.config.head_dim, dtype=dtype,
                          device=device, page_tokens=64), store, namespace=NAMESPACE, fingerprint=FINGERPRINT,
                          attention="paged").logits[0]
        b = reuse_request(model, segs, cfg, PagePool(head_map, head_dim=model.config.head_dim, dtype=dtype,
                          device=device, page_tokens=64), store, namespace=NAMESPACE, fingerprint=FINGERPRINT,
                          attention="dense").logits[0]
        out["kvd_paged_vs_dense_cos"] = float(torch.nn.functional.cosine_similarity(a, b, dim=0))
        if out["kvd_paged_vs_dense_cos"] < 0.99:
            backend = "dense"
    res.setdefault("checks", {}).update(out)
    res["attention_backend"] = backend
    why = recompute_gate(out)
    res["gate_passed"] = why is None
    if why is not None:
        res["gate_failure"] = why
        raise GateFailed(why)
    return backend


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results"))
    ap.add_argument("--smoke", action="store_true", help="tiny model on the CPU (checks the script)")
    ap.add_argument("--plot", action="store_true", help="only draw the plot from the two result files")
    ap.add_argument("--predict", action="store_true",
                    help="no GPU run: write the cost model's predicted TTFTs (predicted_* keys) and plot them")
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
    if args.predict:
        write_prediction(out, args)
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
    head_map = stretched_map(shape["num_hidden_layers"], shape["num_key_value_heads"])
    res["global_head_share"] = head_map.global_ratio
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
        try:
            backend = run_checks(model, segs, store, head_map, device, dtype, res)
        except GateFailed as e:
            save()
            print(f"correctness gate failed, nothing timed: {e}", file=sys.stderr)
            return 1
        save()
        time_methods(model, segs, store, head_map, device, dtype, backend, args, res, save)
    save()
    print(json.dumps({k: v for k, v in res.items() if k.startswith(("ttft", "speedup", "checks", "attention"))},
                     indent=1))
    return 0


def write_prediction(out: Path, args) -> None:
    """``--predict``: the cost model's TTFTs into pi_reuse_speed.json (``predicted_*`` keys), and the plot."""
    head_map = stretched_map(FULL["num_hidden_layers"], FULL["num_key_value_heads"])
    pred = predict(FULL, head_map, args.docs, args.doc_tokens, args.question_tokens, BENCH_METHODS)
    path = out / "pi_reuse_speed.json"
    doc = json.loads(path.read_text()) if path.exists() else {}
    doc.update(pred, status=doc.get("status", "predicted only: no H200 run was made (see docs/chunk_reuse.md)"),
               date_predicted=time.strftime("%Y-%m-%d"), shape=FULL, docs=args.docs, doc_tokens=args.doc_tokens,
               question_tokens=args.question_tokens,
               global_head_share=head_map.global_ratio)
    path.write_text(json.dumps(doc, indent=1) + "\n")
    plot(out)
    print(json.dumps({k: round(v, 3) for k, v in pred.items() if k.startswith("predicted_ttft")}, indent=1))


def time_methods(model, segs, store, head_map, device, dtype, backend, args, res, save) -> None:
    cfgm = model.config
    glob = HeadMap.all_global("full", cfgm.num_hidden_layers, cfgm.num_key_value_heads)
    pools = {}
    for name in ("kvd", "full"):
        lay = head_map if name == "kvd" else glob
        pools[name] = PagePool(lay, head_dim=cfgm.head_dim, dtype=dtype, device=device, page_tokens=64)
        pools[name].reserve(res["num_tokens"])
    ids = torch.tensor([t for s in segs for t in s.token_ids], device=device)[None]
    try:
        res["ttft_recompute_model_s"], _ = timed(lambda: model(ids, logits_to_keep=1).logits, device, args.reps)
    except Exception:
        res["error_recompute_model"] = traceback.format_exc()[-2000:]
    chunk_bytes = sum(kv.numel() * kv.element_size() for kv in store._entries.values())
    for method in split_methods(args.methods):
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
        res[f"host_bytes_{method}"] = read_bytes(cfg, head_map, chunk_bytes)
        res[f"ttft_host_{method}_s"] = dt + h2d_s(res[f"host_bytes_{method}"], device)
        print(f"{method}: ttft {dt:.3f} s (with host load {res[f'ttft_host_{method}_s']:.3f} s)", flush=True)
        save()
    if "ttft_recompute_s" in res and "ttft_recompute_model_s" in res:
        res["ttft_recompute_engine_s"] = res["ttft_recompute_s"]
        res["ttft_recompute_s"] = min(res["ttft_recompute_s"], res["ttft_recompute_model_s"])
    for m in split_methods(args.methods):
        if f"ttft_{m}_s" in res and "ttft_recompute_s" in res:
            res[f"speedup_{m}"] = res["ttft_recompute_s"] / res[f"ttft_{m}_s"]


LABEL_OFFSETS = {"kvd_sparse_ffn": (-8, -20, "right"), "kvd": (6, -10, "left")}  # method -> (dx, dy, ha)


def plot(out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not (out / "pi_reuse_fidelity.json").exists():
        print(f"no {out / 'pi_reuse_fidelity.json'}: run benchmarks/pi_reuse_fidelity.py first; no plot")
        return
    fid = json.loads((out / "pi_reuse_fidelity.json").read_text())
    spd = json.loads((out / "pi_reuse_speed.json").read_text())
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    measured = all(f"ttft_{m}_s" in spd for m in BENCH_METHODS)
    key = "ttft_{}_s" if measured else "predicted_ttft_{}_s"
    for m in BENCH_METHODS:
        if key.format(m) not in spd or f"acc_{m}" not in fid:
            continue
        x, y = spd[key.format(m)], 100 * fid[f"acc_{m}"]
        ax.scatter([x], [y], s=60, marker="*" if m.startswith("kvd") else "o", zorder=3)
        dx, dy, ha = LABEL_OFFSETS.get(m, (6, 4, "left"))
        ax.annotate(f"{m}\n(top-1 {fid[f'top1_{m}']:.2f})", (x, y), textcoords="offset points", xytext=(dx, dy),
                    fontsize=8, ha=ha)
    ax.set_xscale("log")
    what = "measured" if measured else "PREDICTED by the cost model, not measured"
    n = spd.get("num_tokens", spd.get("predicted_num_tokens"))
    ax.set_xlabel(f"TTFT, s (H200, Llama-3-8B shape, {n} tokens; {what}; log scale)", fontsize=8)
    ax.set_ylabel("answer accuracy, % (SmolLM2-135M, CPU fp32)")
    ax.set_title("Chunk reuse: accuracy vs time to first token" + ("" if measured else " (TTFT predicted)"),
                 fontsize=10)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "pi_reuse.png", dpi=120)


if __name__ == "__main__":
    sys.exit(main())
