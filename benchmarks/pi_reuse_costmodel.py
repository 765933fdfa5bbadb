"""Cost model of issue 7's speed benchmark: predicted TTFT per method from exact FLOP and byte counts.

Used when no GPU run could be made (``benchmarks/pi_reuse_speed.py --predict``). Every term is a count
(FLOPs of each GEMM and attention, bytes of each copy) divided by a rate measured on this workplace's
H200 (``RATES``, with its source), a roofline per operation: GEMMs at the larger of their FLOP time
and their weight-read time; attention of global heads over all queries at SDPA's measured causal rate;
SegPaged attention at the measured SegPaged prefill rate, scaled down when a call has fewer query
tiles than the card has SMs. Selections are counted in expectation (uniform positions); the only
assumed, unmeasured term is a host overhead per layer for the engine's page tables and selections.
"""

from __future__ import annotations

import numpy as np

from kvd.core.headmap import HeadMap
from kvd.reuse.plan import method_config

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


def read_bytes(cfg, head_map: HeadMap, chunk_bytes: int) -> int:
    """Chunk-entry bytes a method copies from the host tier: the head classes it leases, of every chunk."""
    if not cfg.reads_cache:
        return 0
    if cfg.cache_classes == ["local"]:
        num_local = head_map.num_layers * head_map.num_kv_heads - head_map.num_global
        local = num_local / (head_map.num_layers * head_map.num_kv_heads)
        return int(chunk_bytes * local)
    return chunk_bytes


def _pairs(q_pos, reach: float) -> float:
    """Query-key pairs the attention computes for queries at ``q_pos`` (numpy int array), each seeing
    ``min(p + 1, reach)`` keys (reach = inf for a global head)."""
    return float(np.minimum(q_pos + 1, reach).sum())


def _query_sets(name: str, cfg, S: int, docs: int, doc_tokens: int, q_tokens: int, num_layers: int):
    """Per layer: positions whose hidden states the method computes (expected, selections uniform)."""
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


def predict(shape: dict, head_map: HeadMap, docs: int, doc_tokens: int, q_tokens: int, methods) -> dict:
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
            lay = head_map if name.startswith("kvd") else HeadMap.all_global("full", L, Hkv)
            dense = A == S
            programs = -(-A // (128 // G)) * Hkv  # SegPaged query tiles x rows
            occupancy = min(1.0, programs / R["num_sms"])
            for head in range(Hkv):
                w, sink = lay.windows[layer][head], lay.sinks[layer][head]
                reach = float("inf") if w == 0 else (-(-sink // N) * N if sink else 0) + w + N
                flops = 4 * D * G * _pairs(qpos, reach)
                rate = R["sdpa_causal_TFLOPs"] if (dense and w == 0) else R["segpaged_TFLOPs"] * occupancy
                t += flops / (rate * 1e12)
            if cfg.uses_cache:  # K/V assembled over S, written to the pool
                t += 3 * kv_layer_bytes / (R["hbm_TBps"] * 1e12) + R["host_overhead_per_layer_ms"] / 1e3
        if cfg.reads_cache:  # chunk copies into the assembled context, RoPE shift of the keys
            t += (2 * L * kv_layer_bytes + L * kv_layer_bytes) / (R["hbm_TBps"] * 1e12)
        out[f"predicted_ttft_{name}_s"] = t
        lay = head_map if name.startswith("kvd") else HeadMap.all_global("full", L, Hkv)
        host = read_bytes(cfg, lay, L * kv_layer_bytes)
        out[f"predicted_host_bytes_{name}"] = host
        out[f"predicted_ttft_host_{name}_s"] = t + host / (R["h2d_GBps"] * 1e9)
        out[f"predicted_active_fraction_{name}"] = sum(q.size for q in sets) / (S * L)
    base = out["predicted_ttft_recompute_s"]
    for name in methods:
        out[f"predicted_speedup_{name}"] = base / out[f"predicted_ttft_{name}_s"]
    return out


__all__ = ["RATES", "predict", "read_bytes"]
