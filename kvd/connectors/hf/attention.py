"""Attention of the transformers adapter: SegPagedAttention over the page pool, registered as ``"kvd"``.

Which kernel: the Triton kernels of ``kvd.gpu_kernels`` on a CUDA device in bf16/fp16
(``segpaged_decode`` for one-token steps, ``segpaged_prefill`` otherwise), their plain-torch
references otherwise (the CPU; fp32). Visibility is decided by positions, exactly as the masked
reference (``kvd.calibrate.masked_attention``) defines a head map: global heads see every earlier key, local
heads ``[0, sink) ∪ (i - window, i]``. Pages a local head has dropped can only hold keys it could not
see, so reading page lists gives the same result as masking the whole KV.

How the function finds its cache: ``KvdCache`` writes each layer's new K/V into its pool in
``update`` and tags the returned key tensor with ``kvd_view = (pool, layer, first position)``;
transformers hands that tensor to the attention function unchanged. A key without the tag (the model
called with another cache) falls through to transformers' sdpa attention, with the masks that the
name's registration in ``AttentionMaskInterface`` provides (``attention_switch`` registers both;
ENGINES.md §3.3: without it a custom function gets ``attention_mask=None`` and loses the causal
offset of a second chunk).

Layout of one call: the B requests' new tokens are packed ``[B * q, Hq, D]`` (varlen, equal lengths),
row ``b * Hkv + h`` of the pool is (request b, KV head h); after the call the local heads' pages that
no later query can see are freed (prefix KV compression).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from kvd.connectors.hf.pool import PagePool

ATTN_NAME = "kvd"


def use_triton(t: torch.Tensor) -> bool:
    """Triton kernels on CUDA in bf16/fp16; the torch references elsewhere."""
    return t.is_cuda and t.dtype in (torch.bfloat16, torch.float16)


def paged_attention(pool: PagePool, layer: int, q: torch.Tensor, q_pos: torch.Tensor, cu_seqlens: torch.Tensor,
                    scale: float, *, heads: Sequence[int] | None = None, max_seqlen_q: int | None = None
                    ) -> torch.Tensor:
    """SegPagedAttention of ``q [T, Hq', D]`` over ``layer``'s pages; returns ``[T, Hq', D]``.

    ``q_pos [T]`` int32 positions (ascending per request), ``cu_seqlens [B + 1]`` int32. With ``heads``
    (one request only), only those KV heads' rows are read and ``q`` holds just their query heads.
    """
    from kvd.gpu_kernels import segpaged_prefill, segpaged_prefill_ref

    lst = pool.listing(layer)
    table, ppos, lens, sink, window = lst.page_table, lst.page_pos, lst.seq_lens, lst.sink, lst.window
    num_kv_heads = pool.num_kv_heads
    if heads is not None:
        if pool.batch_size != 1:
            raise ValueError("attention over a subset of heads needs a pool of one request")
        idx = torch.tensor(list(heads), dtype=torch.long, device=table.device)
        table, ppos, lens = table[idx].contiguous(), ppos[idx].contiguous(), lens[idx].contiguous()
        sink, window = sink[idx].contiguous(), window[idx].contiguous()
        num_kv_heads = len(heads)
    fn = segpaged_prefill if use_triton(q) else segpaged_prefill_ref
    return fn(q, pool.k, pool.v, table, ppos, lens, q_pos, cu_seqlens, sink, window, scale=scale,
              num_kv_heads=num_kv_heads, max_seqlen_q=max_seqlen_q)


def decode_attention(pool: PagePool, layer: int, q: torch.Tensor, pos: int, scale: float) -> torch.Tensor:
    """One decode step through ``segpaged_decode``: ``q [B, Hq, D]`` at position ``pos`` (every request)
    over the layer's page lists; returns ``[B, Hq, D]``. The flash-decoding kernel splits long global
    rows across the GPU, where the prefill kernel gives one program per (request, KV head) to a single
    query. The pool's pages are whole position columns, so the list's edge pages hold keys a local head
    must not see: the kernel is given the positions and applies the head's sink and window to them."""
    from kvd.gpu_kernels import segpaged_decode

    lst = pool.listing(layer)
    q_pos = torch.full((pool.batch_size,), pos, dtype=torch.int32, device=q.device)
    return segpaged_decode(q, pool.k, pool.v, lst.page_table, lst.seq_lens, scale=scale,
                           num_kv_heads=pool.num_kv_heads, page_pos=lst.page_pos, q_pos=q_pos,
                           sink_tokens=lst.sink, window_tokens=lst.window)


def decode_attention_cpu(pool: PagePool, layer: int, q: torch.Tensor, pos: int, scale: float) -> torch.Tensor:
    """One decode step without Triton: ``q [B, Hq, D]`` at position ``pos`` (every request) over the
    layer's pages; returns ``[B, Hq, D]``. Same visibility as ``segpaged_prefill_ref``, in a handful of
    batched ops over the page table instead of a loop over heads: the reference's ~10 small ops per KV
    head per layer made CPU decoding 2-3x slower (the Lil benchmark decodes tens of thousands of tokens).

    Every row's page columns are gathered (missing ones as page 0) and masked by position: row ``r``
    sees position ``p`` iff its page is held and the kernels' rule (``segpaged_ref.visible``) lets it.
    """
    from kvd.gpu_kernels.segpaged_ref import visible

    table = pool.tables[layer]
    rows, cols = table.shape
    n = pool.page_tokens
    group = q.shape[1] // pool.num_kv_heads
    sink, window = (t.long().repeat(pool.batch_size)[:, None] for t in pool._heads[layer])
    kpos = torch.arange(cols * n, device=q.device)[None, :]
    seen = (table >= 0).repeat_interleave(n, dim=1) & visible(kpos, pos, sink, window)  # [rows, cols * n]
    ids = table.clamp_min(0)
    k = pool.k[ids].view(rows, cols * n, -1).float()
    v = pool.v[ids].view(rows, cols * n, -1).float().masked_fill(~seen[..., None], 0.0)  # unwritten slots may hold NaN
    scores = torch.einsum("rgd,rkd->rgk", q.reshape(rows, group, -1).float(), k) * scale
    probs = torch.softmax(scores.masked_fill(~seen[:, None, :], float("-inf")), dim=-1)
    return torch.einsum("rgk,rkd->rgd", probs, v).reshape(q.shape).to(q.dtype)


def q_heads(kv_heads: Sequence[int], group: int, device) -> torch.Tensor:
    """Query-head indices of ``kv_heads`` under GQA (query head j uses KV head j // group)."""
    return torch.tensor([h * group + i for h in kv_heads for i in range(group)], dtype=torch.long, device=device)


def _by_window(sink: Sequence[int], window: Sequence[int]) -> dict[tuple[int, int], list[int]]:
    """KV heads grouped by their ``(sink, window)``: each group is attended with one mask."""
    groups: dict[tuple[int, int], list[int]] = {}
    for h, (s, w) in enumerate(zip(sink, window)):
        groups.setdefault((int(s), int(w)), []).append(h)
    return groups


def dense_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal attention of ``q [S, Hq', D]`` (positions 0..S-1) over ``k``/``v [Hkv', S, D]``; ``[S, Hq', D]``.

    Used for global heads when every token of the context is a query (full prefill, kvd's online
    forward): plain sdpa, which takes FlashAttention on a GPU. Query head j uses KV head j // G.
    """
    group = q.shape[1] // k.shape[0]
    kk = k.repeat_interleave(group, dim=0) if group > 1 else k
    vv = v.repeat_interleave(group, dim=0) if group > 1 else v
    out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], kk[None], vv[None], is_causal=True, scale=scale)
    return out[0].transpose(0, 1)


def windowed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sink: Sequence[int],
                       window: Sequence[int], scale: float, *, block: int = 1024) -> torch.Tensor:
    """Local heads without pages: ``q [S, Hl * G, D]`` (positions 0..S-1) over ``k``/``v [Hl, S, D]``,
    head h seeing ``[0, sink[h]) ∪ (i - window[h], i]``; returns ``[S, Hl * G, D]``.

    The fallback when the SegPaged kernel is not usable: per block of ``block`` queries, sdpa over
    the sink and the keys the block's windows reach, with a mask (cost ~ S x (block + window)).
    """
    S, group = q.shape[0], q.shape[1] // k.shape[0]
    out = torch.empty_like(q)
    for (s, w), heads in _by_window(sink, window).items():
        qh = q_heads(heads, group, q.device)
        kh = k[heads].repeat_interleave(group, dim=0)
        vh = v[heads].repeat_interleave(group, dim=0)
        for b0 in range(0, S, block):
            b1 = min(S, b0 + block)
            lo = max(s, b0 - w + 1)
            keys = torch.cat([torch.arange(min(s, lo), device=q.device), torch.arange(lo, b1, device=q.device)])
            qp = torch.arange(b0, b1, device=q.device)[:, None]
            mask = (keys[None, :] <= qp) & ((keys[None, :] < s) | (keys[None, :] > qp - w))
            o = F.scaled_dot_product_attention(q[b0:b1, qh].transpose(0, 1)[None], kh[:, keys][None],
                                               vh[:, keys][None], attn_mask=mask[None, None], scale=scale)
            out[b0:b1, qh] = o[0].transpose(0, 1)
    return out


def sparse_query_attention(q: torch.Tensor, q_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                           *, sink: Sequence[int] | None = None, window: Sequence[int] | None = None,
                           block: int = 2048) -> torch.Tensor:
    """Causal attention of queries at scattered positions without pages: ``q [A, Hq, D]`` at ``q_pos
    [A]`` (ascending) over ``k``/``v [Hkv, S, D]``, KV head h limited to ``[0, sink[h]) ∪ (i -
    window[h], i]`` where ``window[h] > 0`` (default: every head global); returns ``[A, Hq, D]``. The
    fallback of the some-token prefills."""
    num_kv_heads = k.shape[0]
    group = q.shape[1] // num_kv_heads
    sink = list(sink) if sink is not None else [0] * num_kv_heads
    window = list(window) if window is not None else [0] * num_kv_heads
    out = torch.empty_like(q)
    for (s, w), heads in _by_window(sink, window).items():
        qh = q_heads(heads, group, q.device)
        for b0 in range(0, q.shape[0], block):
            b1 = min(q.shape[0], b0 + block)
            end = int(q_pos[b1 - 1]) + 1
            kk = k[heads, :end].repeat_interleave(group, dim=0)
            vv = v[heads, :end].repeat_interleave(group, dim=0)
            kp, qp = torch.arange(end, device=q.device)[None, :], q_pos[b0:b1, None]
            mask = kp <= qp
            if w > 0:
                mask = mask & ((kp < s) | (kp > qp - w))
            o = F.scaled_dot_product_attention(q[b0:b1, qh].transpose(0, 1)[None], kk[None], vv[None],
                                               attn_mask=mask[None, None], scale=scale)
            out[b0:b1, qh] = o[0].transpose(0, 1)
    return out


def _check_no_padding(attention_mask: torch.Tensor | None, q_len: int) -> None:
    if attention_mask is None or attention_mask.dtype != torch.bool:
        return
    kv_len = attention_mask.shape[-1]
    rows = torch.arange(kv_len - q_len, kv_len, device=attention_mask.device)
    causal = torch.arange(kv_len, device=attention_mask.device)[None, :] <= rows[:, None]  # [q, kv]
    if bool((causal & ~attention_mask[:, 0, -q_len:, :]).any()):
        raise ValueError("kvd's transformers adapter does not take padded batches (the attention mask hides "
                         "tokens); run requests of equal length, or one at a time")


def kvd_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                  **kwargs):
    """The ``AttentionInterface`` function. ``query [B, Hq, q, D]``; returns ``(out [B, q, Hq, D], None)``."""
    view = getattr(key, "kvd_view", None)
    if view is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    pool, layer, start = view
    B, num_q_heads, q_len, head_dim = query.shape
    if layer == 0:  # one mask for every layer of a forward: checked once (the check reads it on the host)
        _check_no_padding(attention_mask, q_len)
    q = query.transpose(1, 2).reshape(B * q_len, num_q_heads, head_dim).contiguous()
    scale = scaling if scaling is not None else head_dim ** -0.5
    if q_len == 1:
        out = (decode_attention if use_triton(q) else decode_attention_cpu)(pool, layer, q, start, scale)
    else:
        q_pos = torch.arange(start, start + q_len, dtype=torch.int32, device=q.device).repeat(B)
        cu = torch.arange(B + 1, dtype=torch.int32, device=q.device) * q_len
        out = paged_attention(pool, layer, q, q_pos, cu, scale, max_seqlen_q=q_len)
    pool.trim(layer)
    return out.view(B, q_len, num_q_heads, head_dim), None


__all__ = ["ATTN_NAME", "decode_attention", "decode_attention_cpu", "dense_causal_attention", "kvd_attention", "paged_attention", "sparse_query_attention",
           "use_triton", "windowed_attention"]
