"""SegPagedAttention, prefill / extend: new tokens of many requests against per-(request, KV head) page lists.

Shapes (B requests, T new tokens in all, Hq / Hkv heads, G = Hq / Hkv, D head dim, N tokens per page):

    q             [T, Hq, D]            bf16/fp16, the new tokens of all requests packed (varlen)
    k_pool        [P, N, D]             one layer's key pages; v_pool the same (as in segpaged_decode)
    page_table    [B * Hkv, max_pages]  int32; row r = b * Hkv + h lists (request b, KV head h)'s pages
    page_pos      [B * Hkv, max_pages]  int32 absolute position of token 0 of each listed page; a page
                                        holds consecutive positions; ascending along the row
    seq_lens      [B * Hkv]             int32 tokens listed in row r (every page full but the last; <= max_pages * N)
    q_pos         [T]                   int32 absolute position of each new token; ascending per request
    cu_seqlens_q  [B + 1]               int32; request b's tokens are q[cu[b]:cu[b+1]]
    sink_tokens   [Hkv]                 int32 per KV head of this layer (from the head map)
    window_tokens [Hkv]                 int32 per KV head; 0 = global head
    out           [T, Hq, D]            dtype of q; a query that sees no key gives zeros
    lse           [T, Hq]               fp32 natural-log sum of exp of its scores (-inf if none); if asked

Visibility of a listed key at position p to a query at position s of KV head h (causal in positions):
global (window 0): p <= s; local: p <= s and (p < sink or s - window < p). The new tokens' K and V must
already be in the pools and listed. Because visibility is decided by positions, a local head's list may
hold the whole context (during a long prefill) or only its sink and window pages (afterwards) and the
result is the same. Query heads j of KV head j // G are folded into one tile: its rows are
(token, group member) pairs, so one read of each key tile serves the whole GQA group.

Kernel: grid (query tiles, B * Hkv), the latest (longest) tiles first. Each program first counts the
row's pages by position (one vector pass over ``page_pos``) and splits them into four ranges: sink
pages, the window's edge, pages every query of the tile sees whole, and the diagonal (plus a ragged
end). It visits only those; the mask is computed only in the three masked ranges, as in
FlashAttention's split of the causal loop, so the long middle range runs without it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvd.gpu_kernels._launch import (
    cast_rtne,
    check_dtype,
    check_index,
    check_last_dim_contiguous,
    check_ndim,
    check_same_device,
    is_interpreter,
    next_pow2,
)
from kvd.gpu_kernels.segpaged_decode import LOG2E, _mma, _tile_pages

INT32_MAX = tl.constexpr(2**31 - 1)  # "no page": larger than any position


@triton.jit
def _mma_acc(a, b, acc, INTERPRET: tl.constexpr):
    # acc + a @ b with the accumulator fed to the MMA (wgmma accumulates in place)
    if INTERPRET:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc)


@triton.jit
def _attend_range(
    acc, m_i, l_i, q, qpos, kidx_start, kidx_end, sink, window,
    k_ptr, v_ptr, k_desc, v_desc, table_row, ppos_row, qk_scale,
    stride_kp, stride_kn, stride_vp, stride_vn,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, PAGE_TOKENS: tl.constexpr, BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr, USE_DESC: tl.constexpr, INTERPRET: tl.constexpr,
):
    # listed tokens [kidx_start, kidx_end); unmasked ranges hold only whole, fully visible tiles.
    # USE_DESC (a tile inside one page): one descriptor load of the page's rows, where the rows past
    # the range are the page's other bytes: their scores are masked and their values zeroed
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    for k0 in range(kidx_start, kidx_end, BLOCK_N):
        # -- listed tokens k0.. -> page, slot ----------------------------------------------------
        kidx = k0 + offs_n
        page_idx = kidx // PAGE_TOKENS
        in_range = kidx < kidx_end
        if USE_DESC:
            page = tl.load(table_row + k0 // PAGE_TOKENS)
            k = k_desc.load([page, k0 % PAGE_TOKENS, 0]).reshape(BLOCK_N, BLOCK_D)
            v = v_desc.load([page, k0 % PAGE_TOKENS, 0]).reshape(BLOCK_N, BLOCK_D)
            v = tl.where(in_range[:, None], v, 0.0)
        else:
            page, in_page = _tile_pages(table_row, k0, offs_n, in_range, PAGE_TOKENS, BLOCK_N)
            if MASKED:
                kv_mask = in_range[:, None] & mask_d[None, :]
            else:
                kv_mask = mask_d[None, :]
            k = tl.load(k_ptr + (page * stride_kp + in_page * stride_kn)[:, None] + offs_d[None, :],
                        mask=kv_mask, other=0.0)
            v = tl.load(v_ptr + (page * stride_vp + in_page * stride_vn)[:, None] + offs_d[None, :],
                        mask=kv_mask, other=0.0)
        qk = _mma(q, tl.trans(k), INTERPRET) * qk_scale
        if MASKED:
            # causal in positions; a local head also needs p < sink or p > s - window
            kpos = tl.load(ppos_row + page_idx, mask=in_range, other=0) + kidx % PAGE_TOKENS
            visible = in_range[None, :] & (kpos[None, :] <= qpos[:, None])
            in_window = (kpos[None, :] < sink) | (kpos[None, :] > qpos[:, None] - window)
            visible = visible & (in_window | (window <= 0))
            qk = tl.where(visible, qk, float("-inf"))

        # -- online softmax; a row with nothing visible yet keeps m = -inf and p = 0 ------------
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(qk - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = _mma_acc(p.to(v.dtype), v, acc * alpha[:, None], INTERPRET)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _attend_pages(
    acc, m_i, l_i, q, kidx_start, kidx_end, k_desc, v_desc, table_row, qk_scale,
    BLOCK_D: tl.constexpr, PAGE_TOKENS: tl.constexpr, BLOCK_N: tl.constexpr, INTERPRET: tl.constexpr,
):
    # the unmasked middle range through tensor descriptors (TMA on Hopper): every query sees every key,
    # so no mask and m stays finite. A tile is rows [slot, slot + BLOCK_N) of one page
    for k0 in range(kidx_start, kidx_end, BLOCK_N):
        page = tl.load(table_row + k0 // PAGE_TOKENS)
        k = k_desc.load([page, k0 % PAGE_TOKENS, 0]).reshape(BLOCK_N, BLOCK_D)
        v = v_desc.load([page, k0 % PAGE_TOKENS, 0]).reshape(BLOCK_N, BLOCK_D)
        qk = _mma(q, tl.trans(k), INTERPRET)
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        # scores stay unscaled: scale and shift are one fused multiply-add per score
        p = tl.exp2(qk * qk_scale - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = _mma_acc(p.to(v.dtype), v, acc * alpha[:, None], INTERPRET)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _count_pages(ppos_row, n_pages, sink, skip_below, window_full_above, causal_full_below, qmax,
                 BLOCK_P: tl.constexpr):
    # pages ascend by position, so each count is the length of a prefix of the row:
    #   n_sink: pages starting below the sink; n_skip: pages wholly before every query's window;
    #   n_win: pages not wholly inside every query's window; n_causal: pages wholly at or before the
    #   earliest query; n_end: pages starting at or before the latest query
    n_sink = 0
    n_skip = 0
    n_win = 0
    n_causal = 0
    n_end = 0
    for p0 in range(0, n_pages, BLOCK_P):
        offs_p = p0 + tl.arange(0, BLOCK_P)
        pos = tl.load(ppos_row + offs_p, mask=offs_p < n_pages, other=INT32_MAX)
        n_sink += tl.sum((pos < sink).to(tl.int32), 0)
        n_skip += tl.sum((pos <= skip_below).to(tl.int32), 0)
        n_win += tl.sum((pos <= window_full_above).to(tl.int32), 0)
        n_causal += tl.sum((pos <= causal_full_below).to(tl.int32), 0)
        n_end += tl.sum((pos <= qmax).to(tl.int32), 0)
    return n_sink, n_skip, n_win, n_causal, n_end


@triton.jit
def _segpaged_prefill_kernel(
    # pointers
    q_ptr, k_ptr, v_ptr, k_desc, v_desc, out_ptr, lse_ptr, table_ptr, ppos_ptr, lens_ptr, qpos_ptr,
    cu_q_ptr, sink_ptr, window_ptr,
    # sizes
    num_kv_heads, max_tokens, qk_scale,
    # strides
    stride_qt, stride_qh, stride_kp, stride_kn, stride_vp, stride_vn, stride_tr, stride_pr,
    stride_ot, stride_oh, stride_lt, stride_lh,
    # meta-parameters
    GROUP: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, PAGE_TOKENS: tl.constexpr, BLOCK_P: tl.constexpr,
    HAS_LSE: tl.constexpr, USE_DESC: tl.constexpr, INTERPRET: tl.constexpr,
):
    BLOCK_TOK: tl.constexpr = BLOCK_M // BLOCK_G  # tile rows are (token, group member) pairs
    row = tl.program_id(1)
    b = row // num_kv_heads
    h = row % num_kv_heads
    q_start = tl.load(cu_q_ptr + b)
    q_len = tl.load(cu_q_ptr + b + 1) - q_start
    tile = tl.cdiv(q_len, BLOCK_TOK) - 1 - tl.program_id(0)  # latest tiles see the most keys: first
    if tile >= 0:
        # -- the tile's queries ------------------------------------------------------------------
        offs_m = tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        tok = tile * BLOCK_TOK + offs_m // BLOCK_G
        g = offs_m % BLOCK_G
        mask_m = (tok < q_len) & (g < GROUP)
        mask_md = mask_m[:, None] & (offs_d < HEAD_DIM)[None, :]
        tok64 = (q_start + tok).to(tl.int64)
        qpos = tl.load(qpos_ptr + tok64, mask=tok < q_len, other=0)
        q = tl.load(q_ptr + (tok64 * stride_qt + (h * GROUP + g) * stride_qh)[:, None] + offs_d[None, :],
                    mask=mask_md, other=0.0)
        qmin = tl.load(qpos_ptr + q_start + tile * BLOCK_TOK)
        qmax = tl.load(qpos_ptr + q_start + tl.minimum(tile * BLOCK_TOK + BLOCK_TOK, q_len) - 1)

        # -- which pages this tile needs, and which of them need the mask ---------------------------
        sink = tl.load(sink_ptr + h)
        window = tl.load(window_ptr + h)
        is_local = window > 0
        sink = tl.where(is_local, sink, 0)
        seq_len = tl.minimum(tl.load(lens_ptr + row), max_tokens)  # never past the row's table entries
        table_row = table_ptr + row.to(tl.int64) * stride_tr
        ppos_row = ppos_ptr + row.to(tl.int64) * stride_pr
        n_sink, n_skip, n_win, n_causal, n_end = _count_pages(
            ppos_row, tl.cdiv(seq_len, PAGE_TOKENS), sink,
            tl.where(is_local, qmin - window - PAGE_TOKENS, -1),  # page ends before qmin's window
            tl.where(is_local, qmax - window, -1),  # page may reach below qmax's window
            qmin - PAGE_TOKENS + 1, qmax, BLOCK_P)
        # ranges of pages: [0, sink) masked | [w0, w1) window edge, masked | [w1, c) visible to every
        # query of the tile, unmasked, whole tiles only | [c, end) diagonal and ragged end, masked
        n_sink = tl.minimum(n_sink, n_end)
        w0 = tl.maximum(n_sink, n_skip)
        w1 = tl.maximum(w0, tl.minimum(n_win, n_end))
        c = tl.maximum(w1, tl.minimum(tl.minimum(n_causal, n_end), seq_len // PAGE_TOKENS))
        free_start = w1 * PAGE_TOKENS
        free_end = free_start + (c * PAGE_TOKENS - free_start) // BLOCK_N * BLOCK_N
        end = tl.minimum(n_end * PAGE_TOKENS, seq_len)

        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        acc, m_i, l_i = _attend_range(
            acc, m_i, l_i, q, qpos, 0, tl.minimum(n_sink * PAGE_TOKENS, seq_len), sink, window,
            k_ptr, v_ptr, k_desc, v_desc, table_row, ppos_row, qk_scale, stride_kp, stride_kn, stride_vp,
            stride_vn, HEAD_DIM, BLOCK_D, PAGE_TOKENS, BLOCK_N, True, USE_DESC,
            INTERPRET)
        acc, m_i, l_i = _attend_range(
            acc, m_i, l_i, q, qpos, w0 * PAGE_TOKENS, tl.minimum(free_start, seq_len), sink, window,
            k_ptr, v_ptr, k_desc, v_desc, table_row, ppos_row, qk_scale, stride_kp, stride_kn, stride_vp,
            stride_vn, HEAD_DIM, BLOCK_D, PAGE_TOKENS, BLOCK_N, True, USE_DESC,
            INTERPRET)
        if USE_DESC:
            acc, m_i, l_i = _attend_pages(
                acc, m_i, l_i, q, free_start, free_end, k_desc, v_desc, table_row, qk_scale,
                BLOCK_D, PAGE_TOKENS, BLOCK_N, INTERPRET)
        else:
            acc, m_i, l_i = _attend_range(
                acc, m_i, l_i, q, qpos, free_start, free_end, sink, window,
                k_ptr, v_ptr, k_desc, v_desc, table_row, ppos_row, qk_scale, stride_kp, stride_kn,
                stride_vp, stride_vn, HEAD_DIM, BLOCK_D, PAGE_TOKENS, BLOCK_N, False, False, INTERPRET)
        acc, m_i, l_i = _attend_range(
            acc, m_i, l_i, q, qpos, free_end, end, sink, window,
            k_ptr, v_ptr, k_desc, v_desc, table_row, ppos_row, qk_scale, stride_kp, stride_kn, stride_vp,
            stride_vn, HEAD_DIM, BLOCK_D, PAGE_TOKENS, BLOCK_N, True, USE_DESC,
            INTERPRET)

        # -- write: queries that saw nothing get zeros ------------------------------------------
        is_empty = l_i == 0.0
        out = acc / tl.where(is_empty, 1.0, l_i)[:, None]
        heads = h * GROUP + g
        o_offs = (tok64 * stride_ot + heads * stride_oh)[:, None] + offs_d[None, :]
        tl.store(out_ptr + o_offs, cast_rtne(out, out_ptr.dtype.element_ty, INTERPRET), mask=mask_md)
        if HAS_LSE:
            lse = tl.where(is_empty, float("-inf"), (m_i + tl.log2(l_i)) * 0.6931471805599453)  # ln(2)
            tl.store(lse_ptr + tok64 * stride_lt + heads * stride_lh, lse, mask=mask_m)


def _configs() -> list[dict]:
    """(BLOCK_M, BLOCK_N, warps, stages, tma) candidates, best first in the 32K prefill of
    ``benchmarks/kernels.py`` on an H100 (``kernels.h100.json`` lists every config's time); the
    interpreter runs one small fixed config, with the descriptor path.

    ``tma``: each K/V tile (inside one page) is one tensor-descriptor load (TMA on Hopper) where the
    pool allows it (``_descriptors``); otherwise, and with ``tma`` off, pointer loads. Tried on the
    H100 in throwaway sweeps and dropped: 128 x 64 tiles over 8 warps with descriptors, 128-key tiles
    from two pages per tile (both slower), and a warp-specialised loop (Triton 3.6 does not compile it
    for Hopper)."""
    if is_interpreter():
        return [dict(BLOCK_M=32, BLOCK_N=16, num_warps=4, num_stages=1, tma=True)]
    return [dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=w, num_stages=s, tma=tma)
            for bm, bn, w, s, tma in ((128, 64, 4, 3, True), (128, 64, 4, 4, True), (128, 64, 4, 2, True),
                                      (256, 64, 16, 3, True), (128, 64, 8, 2, False))]


def _descriptors(k_pool: torch.Tensor, v_pool: torch.Tensor, block_n: int, block_d: int):
    """Tensor descriptors over the pools, boxes of ``[1, block_n, D]`` (rows of one page), or ``None``
    where a descriptor cannot serve the tile: a tile must lie inside one page, the head dim must be the
    tile's, and TMA needs 16-byte aligned bases and strides."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    _, page_tokens, d = k_pool.shape
    if d != block_d or page_tokens % block_n:
        return None
    for t in (k_pool, v_pool):
        size = t.element_size()
        if t.data_ptr() % 16 or any(st * size % 16 for st in t.stride()[:-1]):
            return None
    return tuple(TensorDescriptor(t, list(t.shape), list(t.stride()), [1, block_n, d]) for t in (k_pool, v_pool))


def check_prefill_args(q, k_pool, v_pool, page_table, page_pos, seq_lens, q_pos, cu_seqlens_q, sink_tokens,
                       window_tokens, num_kv_heads, dtypes=(torch.bfloat16, torch.float16)):
    check_ndim("q", q, 3, "[T, Hq, D]")
    check_ndim("k_pool", k_pool, 3, "[num_pages, page_tokens, D]")
    check_dtype("q", q, dtypes)
    if k_pool.shape != v_pool.shape or k_pool.dtype != v_pool.dtype or k_pool.dtype != q.dtype:
        raise ValueError(f"k_pool {tuple(k_pool.shape)} {k_pool.dtype} and v_pool {tuple(v_pool.shape)} "
                         f"{v_pool.dtype} must match each other and q's dtype {q.dtype}")
    T, Hq, D = q.shape
    if k_pool.shape[2] != D:
        raise ValueError(f"k_pool head dim {k_pool.shape[2]} != q head dim {D}")
    if num_kv_heads <= 0 or Hq % num_kv_heads:
        raise ValueError(f"q has {Hq} heads, not a multiple of num_kv_heads={num_kv_heads}")
    check_index("cu_seqlens_q", cu_seqlens_q, 1, "[B + 1]")
    rows = (cu_seqlens_q.shape[0] - 1) * num_kv_heads
    check_index("page_table", page_table, 2, "[B * num_kv_heads, max_pages]")
    check_index("page_pos", page_pos, 2, "[B * num_kv_heads, max_pages]")
    check_index("seq_lens", seq_lens, 1, "[B * num_kv_heads]")
    check_index("q_pos", q_pos, 1, "[T]")
    if page_table.shape[0] != rows or page_pos.shape != page_table.shape or seq_lens.shape[0] != rows:
        raise ValueError(f"page_table {tuple(page_table.shape)}, page_pos {tuple(page_pos.shape)}, seq_lens "
                         f"{tuple(seq_lens.shape)} need {rows} rows (B x num_kv_heads={num_kv_heads})")
    if q_pos.shape[0] != T:
        raise ValueError(f"q_pos has {q_pos.shape[0]} entries, q has {T} tokens")
    for name, t in (("sink_tokens", sink_tokens), ("window_tokens", window_tokens)):
        check_index(name, t, 1, "[num_kv_heads]")
        if t.shape[0] != num_kv_heads:
            raise ValueError(f"{name} has {t.shape[0]} entries, expected num_kv_heads={num_kv_heads}")
    for name, t in (("q", q), ("k_pool", k_pool), ("v_pool", v_pool)):
        check_last_dim_contiguous(name, t)
    for name, t in (("page_table", page_table), ("page_pos", page_pos), ("seq_lens", seq_lens),
                    ("q_pos", q_pos), ("cu_seqlens_q", cu_seqlens_q), ("sink_tokens", sink_tokens),
                    ("window_tokens", window_tokens)):
        if t.dtype != torch.int32:
            raise ValueError(f"{name} must be int32, got {t.dtype}")
    check_same_device(q=q, k_pool=k_pool, page_table=page_table, q_pos=q_pos, sink_tokens=sink_tokens)


def _launch(args, grid_rows, max_seqlen_q, block_g, config, **meta):
    bm, bn = config["BLOCK_M"], config["BLOCK_N"]
    q, k_pool, v_pool, *rest = args
    descs = _descriptors(k_pool, v_pool, bn, meta["BLOCK_D"]) if config.get("tma") else None
    use_desc = descs is not None
    k_desc, v_desc = descs if use_desc else (k_pool, v_pool)  # unused by the pointer path
    grid = (triton.cdiv(max_seqlen_q, max(1, bm // block_g)), grid_rows)
    _segpaged_prefill_kernel[grid](q, k_pool, v_pool, k_desc, v_desc, *rest, BLOCK_M=bm, BLOCK_N=bn,
                                   num_warps=config["num_warps"], num_stages=config["num_stages"],
                                   USE_DESC=use_desc, **meta)


def segpaged_prefill(
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    page_table: torch.Tensor,
    page_pos: torch.Tensor,
    seq_lens: torch.Tensor,
    q_pos: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    sink_tokens: torch.Tensor,
    window_tokens: torch.Tensor,
    *,
    scale: float,
    num_kv_heads: int,
    max_seqlen_q: int | None = None,
    return_lse: bool = False,
    config: dict | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Varlen causal attention of the new tokens over per-(request, KV head) page lists (module docstring).

    Args:
        scale: softmax scale.  num_kv_heads: KV heads per request.
        max_seqlen_q: longest request in ``cu_seqlens_q``; pass it to avoid a device-to-host sync.
        return_lse: also return ``lse [T, Hq]`` (fp32, natural log).
        config: ``dict(BLOCK_M, BLOCK_N, num_warps, num_stages[, tma])``; default the first of
            ``_configs()`` the pools allow (a descriptor config only where ``_descriptors`` can serve it).
    Returns:
        ``out [T, Hq, D]`` in q's dtype, or ``(out, lse)``.
    """
    check_prefill_args(q, k_pool, v_pool, page_table, page_pos, seq_lens, q_pos, cu_seqlens_q, sink_tokens,
                       window_tokens, num_kv_heads)
    T, Hq, D = q.shape
    group = Hq // num_kv_heads
    rows = page_table.shape[0]
    if max_seqlen_q is None:
        max_seqlen_q = int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max().item()) if rows else 0
    out = torch.empty_like(q)
    lse = torch.empty((T, Hq), device=q.device, dtype=torch.float32) if return_lse else out
    if T == 0 or rows == 0 or max_seqlen_q == 0:
        lse.fill_(float("-inf"))
        return (out, lse) if return_lse else out
    if config is None:  # the best config this pool can use: descriptor configs need a describable pool
        configs = _configs()
        config = next((c for c in configs if not c["tma"] or _descriptors(k_pool, v_pool, c["BLOCK_N"], next_pow2(D))),
                      configs[-1])
    block_g = next_pow2(group)
    if config["BLOCK_M"] < block_g:
        raise ValueError(f"BLOCK_M={config['BLOCK_M']} must hold a GQA group of {group} (padded {block_g})")
    args = (q, k_pool, v_pool, out, lse, page_table, page_pos, seq_lens, q_pos, cu_seqlens_q,
            sink_tokens, window_tokens, num_kv_heads, page_table.shape[1] * k_pool.shape[1], scale * LOG2E,
            q.stride(0), q.stride(1), k_pool.stride(0), k_pool.stride(1), v_pool.stride(0), v_pool.stride(1),
            page_table.stride(0), page_pos.stride(0), out.stride(0), out.stride(1), lse.stride(0), lse.stride(1))
    _launch(args, rows, max_seqlen_q, block_g, config, GROUP=group, BLOCK_G=block_g, HEAD_DIM=D,
            BLOCK_D=next_pow2(D), PAGE_TOKENS=k_pool.shape[1], BLOCK_P=64 if is_interpreter() else 256,
            HAS_LSE=return_lse, INTERPRET=is_interpreter())
    return (out, lse) if return_lse else out


__all__ = ["segpaged_prefill"]
