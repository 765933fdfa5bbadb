"""The reuse forward for Llama-family transformers models: one pass over an assembled context (issue 7).

``prefill`` walks the decoder layers itself instead of calling ``model.forward``, because the reuse
methods (``kvd.reuse.plan``) differ inside a layer: which tokens' hidden states are computed (all
for ``recompute``/``kvd``, subsets for the baselines and for kvd once Sparse FFN has frozen tokens),
which heads keep the recomputed KV (kvd: every head by default; with ``ReuseConfig.local_kv="cached"``
only the global heads) and which tokens run the FFN (Sparse FFN). It uses the model's own modules
(norms, projections, MLP, rotary embedding), so ``recompute`` matches ``model.forward`` (a test holds
it to that).

Attention per layer: when every token is a query (``recompute``, ``kvd``), global heads run plain
causal sdpa over the layer's KV (FlashAttention on a GPU) and local heads SegPagedAttention over their
page lists with their sink + window; when only some tokens are queries (the baselines, and kvd once
Sparse FFN has frozen tokens), every head runs SegPagedAttention at those tokens' positions. The
layer's KV (cached where the method keeps it, recomputed elsewhere) is written into the pool before
attention; afterwards the local heads' pages outside sink + window are freed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kvd.connectors.hf.attention import (
    dense_causal_attention,
    paged_attention,
    q_heads,
    sparse_query_attention,
    windowed_attention,
)
from kvd.connectors.hf.pool import PagePool
from kvd.connectors.hf.spec import ATTN_PROJECTIONS
from kvd.core.errors import ConfigError
from kvd.core.headmap import HeadMap
from kvd.reuse.plan import Assembly, ReuseConfig
from kvd.reuse.select import cacheblend_tokens, epic_tokens, received_attention, sparse_ffn_tokens


@dataclass(slots=True)
class PrefillResult:
    logits: torch.Tensor | None  # [vocab] of the last token, fp32
    kv: torch.Tensor | None = None  # [L, 2, Hkv, S, D] fresh KV (collect_kv=True)
    active_tokens: list[int] = field(default_factory=list)  # per layer: hidden states computed
    ffn_tokens: list[int] = field(default_factory=list)  # per layer: tokens that ran the FFN


# ---- model pieces -----------------------------------------------------------------------------


def model_inv_freq(model) -> torch.Tensor:
    """The rotary ``inv_freq`` the model's RoPE uses, in fp32. A dtype cast after loading
    (``model.to(torch.bfloat16)``) rounds the buffer, and transformers' rotary embedding (hence every
    key the model and ``prefill`` compute) uses the rounded values as they are: so does the shift, or a
    shifted key would be off by ``delta * (exact - rounded)`` radians."""
    return model.model.rotary_emb.inv_freq.float()


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE as transformers applies it (NeoX halves): ``x [A, H, D]``, ``cos``/``sin [A, D]``."""
    half = x.shape[-1] // 2
    rot = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None] + rot * sin[:, None]


_LAYER_PARTS = {"self_attn", "mlp", "input_layernorm", "post_attention_layernorm"}
_ATTN_PARTS = set(ATTN_PROJECTIONS)


def _check_layout(core) -> None:
    """``ConfigError`` unless every decoder layer has only the parts ``_layer`` computes: any other
    (Qwen3's ``q_norm``/``k_norm``) would be skipped, silently giving other KV and logits."""
    for i, mod in enumerate(core.layers):
        extra = sorted({n for n, _ in mod.named_children()} - _LAYER_PARTS)
        extra += sorted({n for n, _ in mod.self_attn.named_children()} - _ATTN_PARTS)
        if extra:
            raise ConfigError(f"layer {i} has {', '.join(extra)}, which chunk reuse's prefill does not compute "
                              "(it computes Llama layers: q/k/v/o_proj, RoPE, two RMSNorms, MLP)")


# ---- the forward ------------------------------------------------------------------------------------


def _initial_tokens(asm: Assembly, cfg: ReuseConfig) -> torch.Tensor:
    """``[S]`` bool: tokens whose hidden states layer 0 computes."""
    if cfg.method == "naive":
        return ~asm.reused
    if cfg.method == "epic":
        return epic_tokens(asm.first_tokens(cfg.epic_tokens), asm.reused)
    return torch.ones(asm.num_tokens, dtype=torch.bool)


@dataclass(slots=True)
class _Ctx:
    """What every layer of one prefill shares."""

    cfg: ReuseConfig
    head_map: HeadMap
    pool: PagePool | None
    cached: torch.Tensor | None  # [2, L, Hkv, S, D]
    reused: torch.Tensor  # [S] bool, on the model's device
    local_cached: torch.Tensor  # [S] bool: kvd's local heads keep the cached KV of these tokens
    must_run: torch.Tensor  # [S] bool: never frozen by Sparse FFN (uncached, chunk boundaries)
    cos: torch.Tensor  # [S, D]
    sin: torch.Tensor
    num_tokens: int
    collect: list | None
    attention: str = "paged"  # "paged": SegPagedAttention over the pool; "dense": sdpa fallbacks


def _layer_kv(ctx: _Ctx, layer: int, act: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """The layer's KV over all S tokens ``[Hkv, S, D]``: cached where the method keeps it, else new."""
    if ctx.cached is None:  # every token is computed (recompute)
        return k.transpose(0, 1), v.transpose(0, 1)
    K, V = ctx.cached[0, layer].clone(), ctx.cached[1, layer].clone()
    k_t, v_t = k.transpose(0, 1), v.transpose(0, 1)  # [Hkv, A, D]
    if ctx.cfg.method == "kvd":
        is_global = torch.tensor([w == 0 for w in ctx.head_map.windows[layer]], device=K.device)
        take = is_global[:, None] | ~ctx.local_cached[act][None, :]  # [Hkv, A]
        k_t = torch.where(take[..., None], k_t, K[:, act])
        v_t = torch.where(take[..., None], v_t, V[:, act])
    K[:, act] = k_t
    V[:, act] = v_t
    return K, V


def _attend(ctx: _Ctx, layer: int, q: torch.Tensor, act: torch.Tensor, K, V, scale: float) -> torch.Tensor:
    S, A = ctx.num_tokens, act.numel()
    num_kv_heads = K.shape[0]
    group = q.shape[1] // num_kv_heads
    if ctx.pool is not None:
        ctx.pool.write(layer, K, V, torch.arange(S, device=K.device))
    paged = ctx.attention == "paged"
    if A == S:  # every token a query: dense sdpa for global heads, SegPaged for local heads
        out = torch.empty_like(q)
        glob, loc = ctx.head_map.global_heads(layer), ctx.head_map.local_heads(layer)
        if glob:
            qh = q_heads(glob, group, q.device)
            out[:, qh] = dense_causal_attention(q[:, qh], K[glob], V[glob], scale)
        if loc and not paged:
            qh = q_heads(loc, group, q.device)
            out[:, qh] = windowed_attention(q[:, qh], K[loc], V[loc], [ctx.head_map.sinks[layer][h] for h in loc],
                                            [ctx.head_map.windows[layer][h] for h in loc], scale)
        elif loc:
            qh = q_heads(loc, group, q.device)
            pos = torch.arange(S, dtype=torch.int32, device=q.device)
            cu = torch.tensor([0, S], dtype=torch.int32, device=q.device)
            out[:, qh] = paged_attention(ctx.pool, layer, q[:, qh].contiguous(), pos, cu, scale, heads=loc,
                                         max_seqlen_q=S)
        return out
    if not paged:
        return sparse_query_attention(q, act, K, V, scale, sink=ctx.head_map.sinks[layer],
                                      window=ctx.head_map.windows[layer])
    if ctx.pool is None:
        raise ValueError("a prefill that computes only some tokens needs a page pool")
    cu = torch.tensor([0, A], dtype=torch.int32, device=q.device)
    return paged_attention(ctx.pool, layer, q.contiguous(), act.to(torch.int32), cu, scale, max_seqlen_q=A)


def _cacheblend_check(ctx: _Ctx, layer_idx: int, mod, x, act):
    """CacheBlend's selection at the check layer: recompute K for every token, keep the ratio of cached
    tokens whose K deviates most from the cached K (plus uncached tokens)."""
    attn = mod.self_attn
    h = mod.input_layernorm(x)
    k = _rotate(attn.k_proj(h).view(x.shape[0], -1, attn.head_dim), ctx.cos[act], ctx.sin[act])
    dev = torch.zeros(ctx.num_tokens, dtype=torch.float32, device=x.device)
    dev[act] = (k.float() - ctx.cached[0, layer_idx][:, act].transpose(0, 1).float()).pow(2).sum((1, 2))
    keep_all = cacheblend_tokens(dev, ctx.reused, ctx.cfg.cacheblend_ratio)
    keep = keep_all[act]
    return x[keep], act[keep]


def _importance(ctx: _Ctx, layer: int, sf, q, act, K, out, scale) -> torch.Tensor:
    """Sparse FFN's per-token importance ``[A]`` (see ``SparseFfn.importance``)."""
    if sf.importance == "output_norm":
        return out.norm(dim=-1)
    heads = ctx.head_map.global_heads(layer) or list(range(K.shape[0]))
    if sf.importance == "kv_deviation":
        if ctx.cached is None:
            return out.norm(dim=-1)
        dev = (K[heads][:, act].float() - ctx.cached[0, layer][heads][:, act].float()).pow(2).sum((0, 2))
        return torch.where(ctx.reused[act], dev, dev.max())
    group = q.shape[1] // K.shape[0]
    recent = torch.nonzero(act >= ctx.num_tokens - max(1, sf.recent_tokens)).reshape(-1)
    qh = q_heads(heads, group, q.device)
    got = received_attention(q[recent][:, qh], K[heads], act[recent], scale)
    return got[act]


def _layer(ctx: _Ctx, layer_idx: int, mod, x: torch.Tensor, act: torch.Tensor, stats: PrefillResult):
    cfg = ctx.cfg
    if cfg.method == "cacheblend" and layer_idx == cfg.cacheblend_layer and ctx.cached is not None:
        x, act = _cacheblend_check(ctx, layer_idx, mod, x, act)
    attn = mod.self_attn
    A, D = act.numel(), attn.head_dim
    stats.active_tokens.append(A)
    h = mod.input_layernorm(x)
    # unflatten, not view(A, -1, D): A may be 0 (every token left to prefill is cached)
    q = _rotate(attn.q_proj(h).unflatten(-1, (-1, D)), ctx.cos[act], ctx.sin[act])
    k = _rotate(attn.k_proj(h).unflatten(-1, (-1, D)), ctx.cos[act], ctx.sin[act])
    v = attn.v_proj(h).unflatten(-1, (-1, D))
    if ctx.collect is not None:
        ctx.collect.append(torch.stack((k.transpose(0, 1), v.transpose(0, 1))))
    K, V = _layer_kv(ctx, layer_idx, act, k, v)
    out = _attend(ctx, layer_idx, q, act, K, V, attn.scaling).flatten(1)
    x = x + attn.o_proj(out)
    sf = cfg.sparse_ffn
    sel = None
    freeze = cfg.freezes and ctx.cached is not None
    # identity: every layer from dense_layers on selects; freeze: one selection at dense_layers (the
    # survivors then run whole layers, so selecting again would shrink the set layer after layer)
    selects = sf is not None and (layer_idx == sf.dense_layers if freeze else layer_idx >= sf.dense_layers)
    if selects and A > 0 and not sf.is_dense:
        sel = sparse_ffn_tokens(_importance(ctx, layer_idx, sf, q, act, K, out, attn.scaling), act,
                                ctx.num_tokens, sf, force=ctx.must_run[act] if freeze else None)
        if sel.numel() == A:
            sel = None  # every token runs: take the dense path (bit-identical to the model)
    if sel is None:
        x = x + mod.mlp(mod.post_attention_layernorm(x))
        stats.ffn_tokens.append(A)
    else:
        xs = x.index_select(0, sel)
        stats.ffn_tokens.append(int(sel.numel()))
        if freeze:  # the skipped tokens leave the forward
            x, act = xs + mod.mlp(mod.post_attention_layernorm(xs)), act[sel]
        else:
            x = x.index_add(0, sel, mod.mlp(mod.post_attention_layernorm(xs)))
    if ctx.pool is not None and not ctx.head_map.is_all_global:
        ctx.pool.trim(layer_idx)
    return x, act


@torch.no_grad()
def prefill(model, asm: Assembly, cached: torch.Tensor | None, cfg: ReuseConfig, head_map: HeadMap,
            pool: PagePool | None, *, compute_logits: bool = True, collect_kv: bool = False,
            attention: str = "paged") -> PrefillResult:
    """One forward of the assembled context under ``cfg``; KV goes into ``pool`` (if given).

    ``cached [2, L, Hkv, S, D]`` (from ``assemble_cached``) is required unless the method is
    ``recompute``. The last token must be computed by the method (it is uncached, or the method
    computes every token) when ``compute_logits``. ``attention="dense"`` replaces SegPagedAttention by
    sdpa-based fallbacks (blockwise windows, masked blocks): for machines where the Triton kernels
    do not run; the pool is still written. Raises ``HeadMapError`` if ``head_map`` does not fit,
    ``ConfigError`` if a layer has parts this forward does not compute (Qwen3's q/k norms).
    """
    core = model.model
    device = core.embed_tokens.weight.device
    S = asm.num_tokens
    if cfg.reads_cache and cached is None:
        raise ValueError(f"method {cfg.method!r} needs the cached KV (assemble_cached)")
    head_map.check_fits(len(core.layers), model.config.num_key_value_heads)
    _check_layout(core)
    ids = asm.token_ids.to(device)
    positions = torch.arange(S, device=device)
    act = torch.nonzero(_initial_tokens(asm, cfg).to(device)).reshape(-1) if cfg.uses_cache else positions
    x = core.embed_tokens(ids[act])
    cos, sin = core.rotary_emb(x, positions[None])
    must_run = ~asm.reused | asm.first_tokens(cfg.boundary_tokens)
    local_cached = ~must_run if cfg.local_kv == "cached" else torch.zeros_like(must_run)
    ctx = _Ctx(cfg, head_map, pool, cached if cfg.reads_cache else None, asm.reused.to(device), local_cached.to(device),
               must_run.to(device), cos[0], sin[0], S, [] if collect_kv else None, attention)
    result = PrefillResult(logits=None)
    for i, mod in enumerate(core.layers):
        x, act = _layer(ctx, i, mod, x, act, result)
    if collect_kv:
        result.kv = torch.stack(ctx.collect)  # [L, 2, Hkv, S, D]
    if compute_logits:
        last = torch.nonzero(act == S - 1).reshape(-1)
        if last.numel() != 1:
            raise ValueError(f"method {cfg.method!r} did not compute the last token (it is cached); end the "
                             "request with a segment that is not reusable")
        result.logits = model.lm_head(core.norm(x[last]))[0].float()
    return result


__all__ = ["PrefillResult", "model_inv_freq", "prefill"]
