"""Decode throughput of the transformers adapter (issue 17): SegPagedAttention decode over kvd's page pool
under the shipped head map, against transformers' own dense sdpa path, at 8K and 32K tokens of context.

Run on the GPU machine: ``python3 benchmarks/hf_decode.py --out DIR`` (hf_decode.json + .png in DIR;
copied to benchmarks/results/). Without a GPU, ``--cpu-dry-run`` runs every path on tiny shapes (the
adapter then decodes with its torch path, not the kernel); its numbers mean nothing.

Model: SmolLM2-135M's shape (30 layers, 9 query / 3 KV heads, head_dim 64), random bf16 weights (decode
speed does not depend on the weights; the head map is the one shipped for SmolLM2,
``kvd/data/heads/smollm2-135m.json``: 27 of 90 KV heads global, local windows 64-1536 tokens).

What is timed, each as users run it (eager: the adapter reads page lists on the host every layer and
cannot be captured in a CUDA graph; transformers' paths are run the same way), ``B`` requests of ``L``
tokens each (``--batches``, default 1, 16, 64: the step is host-bound at small batches, where the KV
read is short against a 30-layer model's launches; the headline keys are B = 16; at 32K x 64 the
DynamicCache path runs out of an 80 GB H100's memory and the faster sdpa path is StaticCache), greedy
steps of one token,
``--steps`` timed after 3 untimed:

- ``kvd``: ``attach(model, head_map=shipped)``; the pool holds the context as the adapter leaves it after
  a prefill (every head written, then the local heads' pages that no later query sees freed); each step
  runs the model with the ``KvdCache``: one ``segpaged_decode`` launch per layer (``decode_attention``);
- ``kvd_all_global``: the same with every head global (the same kernel reading everything: what the
  head map saves, apart from the kernel);
- ``sdpa_static``: transformers' sdpa attention over a ``StaticCache`` (preallocated, the fast dense
  path transformers offers for decoding); ``sdpa_dynamic``: over the default ``DynamicCache``.
  The headline ``decode_tokens_per_s_sdpa_*`` is the faster of the two.

The caches are filled with random KV (the same for every path) instead of a 32K prefill: what is
measured is the step, not how the context got there. Correctness first, on a real prefill of
``GATE_TOKENS`` and four teacher-forced decode steps through the adapter (the same model in fp16):

- the steps through ``segpaged_decode`` (the product path; each layer's call counted) against the same
  steps through ``segpaged_prefill`` with one query (the same pool, the other kernel): relative error of
  the logits <= ``GATE_BOUND``;
- the negative control: the steps with the positions not passed to the decode kernel (every listed
  key seen, also the edge pages' keys a local head must not see) must exceed that bound, else the gate
  could not tell wrong KV from right;
- end to end, against the masked reference (``kvd.calibrate.masked_attention``: dense sdpa with the
  head map as masks, computing its own KV): relative error <= ``MASKED_BOUND``.

Nothing is timed unless all hold.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from datetime import date
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kvd.connectors.hf import attention as hf_attention  # noqa: E402
from kvd.connectors.hf import cache as hf  # noqa: E402
from kvd.core.headmap import HeadMap  # noqa: E402
from kvd.testing.models import random_llama  # noqa: E402

HEAD_MAP = ROOT / "kvd/data/heads/smollm2-135m.json"
GATE_TOKENS, GATE_STEPS = 2048, 4
GATE_BOUND = 5e-3  # decode kernel vs prefill kernel, same pool: bf16 rounding only
MASKED_BOUND = 1e-2  # vs the masked reference (its own KV, sdpa), fp16 both ways


def log(msg: str) -> None:
    print(f"[hf_decode {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def build_model(device, max_pos: int, dtype=torch.bfloat16):
    return random_llama(device, dtype=dtype, seed=0, vocab_size=49152, hidden_size=576, intermediate_size=1536,
                        num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, head_dim=64,
                        rope_theta=100000.0, max_position_embeddings=max_pos, tie_word_embeddings=True)


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def free(device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


# ---- correctness --------------------------------------------------------------------------------


def adapter_logits(model, hm: HeadMap, ids: torch.Tensor, decode) -> torch.Tensor:
    """Logits of the last prompt token and of GATE_STEPS teacher-forced steps through the adapter, its
    one-token steps taken by ``decode`` (in place of ``decode_attention``; on the CPU dry run also of
    its torch path, so that the kernel runs there through Triton's interpreter)."""
    n = ids.shape[1] - GATE_STEPS
    saved = hf_attention.decode_attention, hf_attention.decode_attention_cpu
    hf_attention.decode_attention = decode
    if ids.device.type == "cpu":
        hf_attention.decode_attention_cpu = decode
    cache = hf.attach(model, head_map=hm, model_id=hm.model)
    try:
        out = [model(ids[:, :n], past_key_values=cache).logits[:, -1]]
        for t in range(GATE_STEPS):
            out.append(model(ids[:, n + t:n + t + 1], past_key_values=cache).logits[:, -1])
    finally:
        hf.detach(model)
        hf_attention.decode_attention, hf_attention.decode_attention_cpu = saved
    return torch.stack(out, 1)


def gate(model, hm: HeadMap, device, tokens: int) -> dict:
    """Three runs of one prompt and GATE_STEPS steps, each checked against a reference with its own KV
    or its own kernel (see the module docstring)."""
    from kvd.calibrate.masked_attention import apply_head_map
    from kvd.gpu_kernels import segpaged_decode

    ids = torch.randint(100, 40000, (1, tokens + GATE_STEPS), generator=torch.Generator().manual_seed(1)).to(device)
    calls = {"decode_attention": 0}
    real = hf_attention.decode_attention

    def kernel(*a):  # the product path, counted
        calls["decode_attention"] += 1
        return real(*a)

    def prefill_kernel(pool, layer, q, pos, scale):  # the same step through segpaged_prefill (q_len 1)
        b = pool.batch_size
        return hf_attention.paged_attention(
            pool, layer, q, torch.full((b,), pos, dtype=torch.int32, device=q.device),
            torch.arange(b + 1, dtype=torch.int32, device=q.device), scale, max_seqlen_q=1)

    def no_positions(pool, layer, q, pos, scale):  # the negative control: every listed key seen
        lst = pool.listing(layer)
        return segpaged_decode(q, pool.k, pool.v, lst.page_table, lst.seq_lens, scale=scale,
                               num_kv_heads=pool.num_kv_heads)

    with torch.no_grad():
        with apply_head_map(model, hm):
            masked = model(ids).logits[:, tokens - 1:]
        ours = adapter_logits(model, hm, ids, kernel)
        other = adapter_logits(model, hm, ids, prefill_kernel)
        wrong = adapter_logits(model, hm, ids, no_positions)
    steps = range(1, GATE_STEPS + 1)
    r = {"gate_tokens": tokens, "gate_decode_kernel_calls": calls["decode_attention"],
         "gate_bound_vs_prefill_kernel": GATE_BOUND, "gate_bound_vs_masked_reference": MASKED_BOUND,
         "gate_rel_err_vs_prefill_kernel": max(rel_err(ours[:, i], other[:, i]) for i in steps),
         "gate_rel_err_vs_masked_reference": max(rel_err(ours[:, i], masked[:, i]) for i in range(GATE_STEPS + 1)),
         "gate_top1_agree_masked_reference": float((ours.argmax(-1) == masked.argmax(-1)).float().mean()),
         "gate_negative_control_rel_err": max(rel_err(wrong[:, i], other[:, i]) for i in steps)}
    r["gate_negative_control_caught"] = r["gate_negative_control_rel_err"] > GATE_BOUND
    r["gate_passed"] = (r["gate_rel_err_vs_prefill_kernel"] <= GATE_BOUND and r["gate_negative_control_caught"]
                        and r["gate_rel_err_vs_masked_reference"] <= MASKED_BOUND
                        and r["gate_decode_kernel_calls"] == GATE_STEPS * model.config.num_hidden_layers)
    return r


# ---- timed paths --------------------------------------------------------------------------------


def random_kv(cfg, B: int, L: int, device, layer: int):
    g = torch.Generator(device=device).manual_seed(100 + layer)
    shape = (B, cfg.num_key_value_heads, L, cfg.head_dim)
    return (torch.randn(shape, generator=g, device=device, dtype=torch.bfloat16),
            torch.randn(shape, generator=g, device=device, dtype=torch.bfloat16))


def timed_steps(model, cache, B: int, L: int, steps: int, device, *, static: bool = False) -> float:
    """Seconds per step of ``steps`` greedy decode steps (after 3 untimed ones)."""
    ids = torch.randint(100, 40000, (B, 1), generator=torch.Generator().manual_seed(2)).to(device)
    pos = L

    def step():
        nonlocal ids, pos
        kw = {}
        if static:
            kw = dict(cache_position=torch.tensor([pos], device=device),
                      position_ids=torch.full((B, 1), pos, device=device))
        ids = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1, **kw).logits.argmax(-1)
        pos += 1

    with torch.no_grad():
        for _ in range(3):
            step()
        sync(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        sync(device)
    return (time.perf_counter() - t0) / steps


def kvd_case(model, hm: HeadMap, B: int, L: int, steps: int, device) -> dict:
    cfg = model.config
    cache = hf.attach(model, head_map=hm, model_id=hm.model)
    try:
        pool = cache.ensure_pool(batch_size=B, dtype=torch.bfloat16, device=device)
        pool.reserve(L + steps + 8)
        for layer in range(cfg.num_hidden_layers):
            k, v = random_kv(cfg, B, L, device, layer)
            pool.append(layer, k.reshape(B * cfg.num_key_value_heads, L, -1), v.reshape(B * cfg.num_key_value_heads, L, -1))
            pool.trim(layer)
            del k, v
        held = pool.kv_bytes()
        s = timed_steps(model, cache, B, L, steps, device)
    finally:
        hf.detach(model)
        cache.pool = pool = None  # the pool's pages go now, not when the collector finds the cache
        free(device)
    dense = 2 * B * L * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * 2
    return {"step_s": s, "tokens_per_s": B / s, "kv_bytes_held": held, "kv_fraction_held": held / dense}


def sdpa_case(model, B: int, L: int, steps: int, device, kind: str) -> dict:
    from transformers import DynamicCache, StaticCache

    cfg = model.config
    try:
        if kind == "static":
            cache = StaticCache(config=cfg, max_cache_len=L + steps + 8)
            for layer in range(cfg.num_hidden_layers):
                k, v = random_kv(cfg, B, L, device, layer)
                cache.update(k, v, layer, {"cache_position": torch.arange(L, device=device)})
        else:
            cache = DynamicCache(ddp_cache_data=[random_kv(cfg, B, L, device, i) for i in range(cfg.num_hidden_layers)],
                                 config=cfg)
        s = timed_steps(model, cache, B, L, steps, device, static=kind == "static")
        return {"step_s": s, "tokens_per_s": B / s}
    except Exception as e:  # a transformers API this version lacks: recorded, not fatal
        return {"error": f"{type(e).__name__}: {e}"}
    finally:
        cache = None
        free(device)


def plot(r: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib is not installed: no plot")
        return
    names = ["kvd", "kvd_all_global", "sdpa_static", "sdpa_dynamic"]
    cases = list(r["cases"])
    fig, ax = plt.subplots(figsize=(max(7, 1.6 * len(cases)), 3.8))
    w = 0.8 / len(names)
    for j, n in enumerate(names):
        vals = [r["cases"][c].get(n, {}).get("tokens_per_s", 0.0) for c in cases]
        ax.bar([i + j * w for i in range(len(cases))], vals, width=w, label=n)
    ax.set_xticks([i + 0.4 - w / 2 for i in range(len(cases))], cases)
    ax.set_yscale("log")
    ax.set_ylabel("decode tokens/s (all requests)")
    ax.set_title(f"transformers adapter decode, SmolLM2 shape, eager, {r['device']}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results"))
    ap.add_argument("--cpu-dry-run", action="store_true", help="every path on tiny shapes; numbers mean nothing")
    ap.add_argument("--batches", default="1,16,64", help="requests per step, comma-separated; the first "
                    "of 16 (else the first) gives the headline keys")
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args()
    dry = args.cpu_dry_run
    if not dry and not torch.cuda.is_available():
        print("no GPU: run with --cpu-dry-run", file=sys.stderr)
        return 2
    device = torch.device("cpu" if dry else "cuda")
    if dry:  # the kernels through Triton's interpreter (read when kvd.gpu_kernels is first imported)
        os.environ["TRITON_INTERPRET"] = "1"
    contexts = {"1k": 1024, "2k": 2048} if dry else {"8k": 8192, "32k": 32768}
    batches = [2] if dry else [int(b) for b in args.batches.split(",")]
    head_b = 16 if 16 in batches else batches[0]
    steps = 2 if dry else args.steps
    import transformers

    hm = HeadMap.load(HEAD_MAP)
    model = build_model(device, max_pos=max(contexts.values()) + 64)
    r: dict = {"date": date.today().isoformat(), "mode": "cpu-dry-run" if dry else "gpu",
               "device": "cpu (dry run)" if dry else torch.cuda.get_device_name(0), "torch": torch.__version__,
               "transformers": transformers.__version__, "model": "SmolLM2-135M shape, random bf16 weights",
               "head_map": str(HEAD_MAP.relative_to(ROOT)), "batches": batches, "headline_batch": head_b, "steps": steps, "timing": "eager",
               "contexts": list(contexts), "cases": {}}
    # the gate in fp16 (3 more mantissa bits than bf16): rounding alone moves the logits ~8x less, so
    # a bound tight enough for the negative control to cross (bf16: 1.4e-2 noise vs 2.9e-2 on the CPU)
    r.update(gate(build_model(device, max_pos=GATE_TOKENS + 64, dtype=torch.float16), hm, device,
                  256 if dry else GATE_TOKENS))
    log(f"gate: {json.dumps({k: v for k, v in r.items() if k.startswith('gate')})}")
    if not r["gate_passed"]:
        log("correctness gate failed: nothing timed")
        r["error"] = "correctness gate failed"
    else:
        everything = HeadMap.all_global(hm.model, hm.num_layers, hm.num_kv_heads)
        for tag, L in contexts.items():
            for B in batches:
                c = r["cases"][f"{tag}_b{B}"] = {"context": L, "batch": B}
                c["kvd"] = kvd_case(model, hm, B, L, steps, device)
                c["kvd_all_global"] = kvd_case(model, everything, B, L, steps, device)
                c["sdpa_static"] = sdpa_case(model, B, L, steps, device, "static")
                c["sdpa_dynamic"] = sdpa_case(model, B, L, steps, device, "dynamic")
                sdpa = max(c[k].get("tokens_per_s", 0.0) for k in ("sdpa_static", "sdpa_dynamic"))
                c["speedup_vs_sdpa"] = c["kvd"]["tokens_per_s"] / sdpa if sdpa else None
                log(f"{tag} B={B}: {json.dumps(c)}")
                if B == head_b:
                    r[f"decode_tokens_per_s_kvd_{tag}"] = c["kvd"]["tokens_per_s"]
                    r[f"decode_tokens_per_s_sdpa_{tag}"] = sdpa
                    r[f"decode_speedup_vs_sdpa_{tag}"] = c["speedup_vs_sdpa"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = "hf_decode.dry_run" if dry else "hf_decode"
    (out / f"{name}.json").write_text(json.dumps(r, indent=2) + "\n")
    if r["cases"]:
        plot(r, out / f"{name}.png")
    return 0 if "error" not in r else 1


if __name__ == "__main__":
    sys.exit(main())
