"""SegPagedAttention, decode: one query token per request against per-(request, KV head) page lists.

Shapes (B requests, Hq query heads, Hkv KV heads, G = Hq / Hkv, D head dim, N tokens per page):

    q           [B, Hq, D]            bf16/fp16; any strides with a contiguous last dim
    k_pool      [P, N, D]             one layer's key pages; v_pool the same shape and dtype as k_pool
    page_table  [B * Hkv, max_pages]  int32; row r = b * Hkv + h lists the pages of (request b, KV head h)
                                      in token order; entries past the row's pages are never read
    seq_lens    [B * Hkv]             int32 tokens listed in row r, 0 <= seq_len <= max_pages * N:
                                      pages 0..n-2 are full, page n-1 holds the rest (n = ceil(seq_len / N))
    out         [B, Hq, D]            dtype of q
    lse         [B, Hq]               fp32, natural log of the sum of exp(scaled scores); only if asked

Semantics: query head j of request b attends to *every* token listed for KV head j // G (consecutive
query heads share a KV head, as SDPA ``enable_gqa`` and transformers ``repeat_kv`` do). There is no
mask: the page list is the sparsity. A local head's list holds only its sink and window pages, a global
head's the whole context. An empty list gives zeros (and lse = -inf).

Positions (optional; the transformers adapter's page pool, whose pages are whole columns of positions,
so a local head's first window page and its sink page also hold tokens the head must not see):

    page_pos      [B * Hkv, max_pages]  int32 position of token 0 of each listed page (as in segpaged_prefill)
    q_pos         [B]                   int32 position of each request's query
    sink_tokens   [Hkv], window_tokens [Hkv]   int32 per KV head; window 0 = global

With them a listed key at position p is seen iff p <= q_pos and (global, or p < sink, or
q_pos - window < p): the prefill kernel's rule for one query. Only the tiles at a list's edges hold
keys that fail it; a tile or an item whose keys all fail contributes nothing.

Kernel (flash-decoding): each row is cut into work items of ``split_tokens`` tokens; row r owns
ceil(seq_len_r / split_tokens) consecutive items. A persistent grid of ``programs_per_sm`` programs
per SM walks the items round-robin, so a batch mixing 128K-token global rows with 640-token local rows
costs only the listed tokens and launches no empty programs. Each item computes all G query heads of
its KV head from one read of its pages (the GQA group is the M side of the tile, padded to 16 for
``tl.dot``), and writes an fp32 partial output and its log2-sum-exp. A second kernel merges each row's
items with the stable log-sum-exp rule. Rows, items and the work map are computed on the device, so a
call needs no host sync and can be captured in a CUDA graph.
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
    num_sms,
)

LOG2E = 1.4426950408889634  # 1/ln(2): scores are kept in log2 units so the kernel can use exp2
LN2 = 0.6931471805599453

MAX_ROWS = 16384  # the work map holds one lane per row


@triton.jit
def _mma(a, b, INTERPRET: tl.constexpr):
    # the interpreter multiplies bf16 as raw bits: upcast there (exact products, fp32 sums)
    if INTERPRET:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b)


@triton.jit
def _tile_pages(table_row, k0, offs_n, mask_n, PAGE_TOKENS: tl.constexpr, BLOCK_N: tl.constexpr):
    # (page id, slot) of listed tokens k0 + offs_n. Tiles start at multiples of BLOCK_N, so when a
    # page holds whole tiles the tile's page is one scalar load and its rows are contiguous
    if PAGE_TOKENS % BLOCK_N == 0:
        page = tl.load(table_row + k0 // PAGE_TOKENS).to(tl.int64)
        slot = (k0 % PAGE_TOKENS + offs_n).to(tl.int64)
    else:
        kidx = k0 + offs_n
        page = tl.load(table_row + kidx // PAGE_TOKENS, mask=mask_n, other=0).to(tl.int64)
        slot = (kidx % PAGE_TOKENS).to(tl.int64)
    return page, slot


@triton.jit
def _tile_pos(pos_row, k0, offs_n, mask_n, PAGE_TOKENS: tl.constexpr, BLOCK_N: tl.constexpr):
    # positions of listed tokens k0 + offs_n (``page_pos`` of their page plus their slot)
    if PAGE_TOKENS % BLOCK_N == 0:
        return tl.load(pos_row + k0 // PAGE_TOKENS) + k0 % PAGE_TOKENS + offs_n
    kidx = k0 + offs_n
    return tl.load(pos_row + kidx // PAGE_TOKENS, mask=mask_n, other=0) + kidx % PAGE_TOKENS


@triton.jit
def _work_map(lens_ptr, num_rows, max_tokens, split_tokens, BLOCK_R: tl.constexpr):
    # row -> [first item, first item + n_items): items of one row are consecutive, rows in order
    offs_r = tl.arange(0, BLOCK_R)
    lens = tl.load(lens_ptr + offs_r, mask=offs_r < num_rows, other=0)
    # a bad length must not write past the partial buffers, nor (negative) shift later rows' items
    lens = tl.minimum(tl.maximum(lens, 0), max_tokens)
    n_items = (lens + split_tokens - 1) // split_tokens
    item_end = tl.cumsum(n_items, 0)
    return offs_r, lens, n_items, item_end


@triton.jit
def _segpaged_decode_kernel(
    # pointers
    q_ptr, k_ptr, v_ptr, table_ptr, lens_ptr, part_out_ptr, part_lse_ptr,
    pos_ptr, qpos_ptr, sink_ptr, window_ptr,  # read only with HAS_POS
    # sizes
    num_rows, num_kv_heads, max_tokens, split_tokens, qk_scale,
    # strides
    stride_qb, stride_qh,
    stride_kp, stride_kn,
    stride_vp, stride_vn,
    stride_tr, stride_pr,
    # meta-parameters
    GROUP: tl.constexpr, BLOCK_G: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    PAGE_TOKENS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, INTERPRET: tl.constexpr,
    HAS_POS: tl.constexpr,
):
    offs_r, lens, n_items, item_end = _work_map(lens_ptr, num_rows, max_tokens, split_tokens, BLOCK_R)
    total_items = tl.sum(n_items, 0)
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    mask_g = offs_g < GROUP  # the group is padded to BLOCK_G >= 16 rows for tl.dot
    mask_d = offs_d < HEAD_DIM

    for item in range(tl.program_id(0), total_items, tl.num_programs(0)):
        # -- which row and which tokens this item covers ------------------------------------
        row = tl.sum((item_end <= item).to(tl.int32), 0)
        at_row = offs_r == row
        first_item = tl.sum(tl.where(at_row, item_end - n_items, 0), 0)
        seq_len = tl.sum(tl.where(at_row, lens, 0), 0)
        start = (item - first_item) * split_tokens
        end = tl.minimum(start + split_tokens, seq_len)
        b = row // num_kv_heads
        h = row % num_kv_heads

        # -- the G query heads of KV head h -----------------------------------------------------
        q_offs = b.to(tl.int64) * stride_qb + (h * GROUP + offs_g)[:, None] * stride_qh + offs_d[None, :]
        q = tl.load(q_ptr + q_offs, mask=mask_g[:, None] & mask_d[None, :], other=0.0)

        # -- online softmax over the item's tokens (fp32 accumulation) -------------------------
        m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_G], tl.float32)
        acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
        table_row = table_ptr + row.to(tl.int64) * stride_tr
        if HAS_POS:
            pos_row = pos_ptr + row.to(tl.int64) * stride_pr
            q_at = tl.load(qpos_ptr + b)
            sink = tl.load(sink_ptr + h)
            window = tl.load(window_ptr + h)
        for tok0 in range(start, end, BLOCK_N):
            mask_t = tok0 + offs_n < end
            page, in_page = _tile_pages(table_row, tok0, offs_n, mask_t, PAGE_TOKENS, BLOCK_N)
            seen = mask_t
            if HAS_POS:  # listed keys are read either way; hidden ones get no weight
                kpos = _tile_pos(pos_row, tok0, offs_n, mask_t, PAGE_TOKENS, BLOCK_N)
                seen = seen & (kpos <= q_at) & ((kpos < sink) | (kpos > q_at - window) | (window <= 0))
            kv_mask = mask_t[:, None] & mask_d[None, :]
            k = tl.load(k_ptr + (page * stride_kp + in_page * stride_kn)[:, None] + offs_d[None, :],
                        mask=kv_mask, other=0.0)
            v = tl.load(v_ptr + (page * stride_vp + in_page * stride_vn)[:, None] + offs_d[None, :],
                        mask=kv_mask, other=0.0)
            qk = _mma(q, tl.trans(k), INTERPRET) * qk_scale
            qk = tl.where(seen[None, :], qk, float("-inf"))  # the item's last tile may be partial
            m_new = tl.maximum(m_i, tl.max(qk, 1))  # finite without positions: a tile lists >= 1 token
            m_ref = m_new
            if HAS_POS:  # every key of the tiles so far may be hidden: -inf - -inf must not give NaN
                m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m_i - m_ref)
            p = tl.exp2(qk - m_ref[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + _mma(p.to(v.dtype), v, INTERPRET)
            m_i = m_new

        # -- partial result of this item: normalised output and log2-sum-exp ------------------
        out_offs = (tl.cast(item, tl.int64) * GROUP + offs_g[:, None]) * HEAD_DIM + offs_d[None, :]
        seen = l_i > 0.0  # an item whose keys are all hidden: zeros and -inf, which the merge weighs 0
        tl.store(part_out_ptr + out_offs, acc / tl.where(seen, l_i, 1.0)[:, None],
                 mask=mask_g[:, None] & mask_d[None, :])
        tl.store(part_lse_ptr + tl.cast(item, tl.int64) * GROUP + offs_g,
                 tl.where(seen, m_i + tl.log2(tl.where(seen, l_i, 1.0)), float("-inf")), mask=mask_g)


@triton.jit
def _segpaged_decode_merge_kernel(
    # pointers
    part_out_ptr, part_lse_ptr, lens_ptr, out_ptr, lse_ptr,
    # sizes
    num_rows, num_kv_heads, max_tokens, split_tokens,
    # strides
    stride_ob, stride_oh, stride_lb, stride_lh,
    # meta-parameters
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_I: tl.constexpr, HAS_LSE: tl.constexpr, INTERPRET: tl.constexpr,
):
    # one program per (row, query head of the group); items are read BLOCK_I at a time so the loads
    # of a long row (hundreds of items) are in flight together, not one dependent load per item
    row = tl.program_id(0)
    g = tl.program_id(1)
    offs_r, lens, n_items, item_end = _work_map(lens_ptr, num_rows, max_tokens, split_tokens, BLOCK_R)
    at_row = offs_r == row
    last_item = tl.sum(tl.where(at_row, item_end, 0), 0)
    first_item = last_item - tl.sum(tl.where(at_row, n_items, 0), 0)
    offs_i = tl.arange(0, BLOCK_I)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM

    # pass 1: the largest log2-sum-exp of the row's items
    m = tl.full([BLOCK_I], float("-inf"), tl.float32)
    for i0 in range(first_item, last_item, BLOCK_I):
        items = (i0 + offs_i).to(tl.int64)
        m = tl.maximum(m, tl.load(part_lse_ptr + items * GROUP + g, mask=items < last_item, other=float("-inf")))
    m_max = tl.max(m, 0)
    m_safe = tl.where(m_max == float("-inf"), 0.0, m_max)  # empty list: no items

    # pass 2: out = sum_i 2^(lse_i - M) o_i / sum_i 2^(lse_i - M)
    den = tl.zeros([BLOCK_I], tl.float32)
    acc = tl.zeros([BLOCK_I, BLOCK_D], tl.float32)
    for i0 in range(first_item, last_item, BLOCK_I):
        items = (i0 + offs_i).to(tl.int64)
        in_row = items < last_item
        w = tl.exp2(tl.load(part_lse_ptr + items * GROUP + g, mask=in_row, other=float("-inf")) - m_safe)
        o = tl.load(part_out_ptr + (items * GROUP + g)[:, None] * HEAD_DIM + offs_d[None, :],
                    mask=in_row[:, None] & mask_d[None, :], other=0.0)
        den += w
        acc += w[:, None] * o
    den_all = tl.sum(den, 0)
    is_empty = den_all == 0.0  # empty page list: zeros, lse -inf
    out = tl.sum(acc, 0) / tl.where(is_empty, 1.0, den_all)

    b = row // num_kv_heads
    head = (row % num_kv_heads) * GROUP + g
    tl.store(out_ptr + b.to(tl.int64) * stride_ob + head * stride_oh + offs_d,
             cast_rtne(out, out_ptr.dtype.element_ty, INTERPRET), mask=mask_d)
    if HAS_LSE:
        lse = tl.where(is_empty, float("-inf"), (m_safe + tl.log2(den_all)) * 0.6931471805599453)  # ln(2)
        tl.store(lse_ptr + b.to(tl.int64) * stride_lb + head * stride_lh, lse)


def check_decode_args(q, k_pool, v_pool, page_table, seq_lens, num_kv_heads):
    check_ndim("q", q, 3, "[B, Hq, D]")
    check_ndim("k_pool", k_pool, 3, "[num_pages, page_tokens, D]")
    check_dtype("q", q, (torch.bfloat16, torch.float16))
    if k_pool.shape != v_pool.shape or k_pool.dtype != v_pool.dtype or k_pool.dtype != q.dtype:
        raise ValueError(
            f"k_pool {tuple(k_pool.shape)} {k_pool.dtype} and v_pool {tuple(v_pool.shape)} {v_pool.dtype} "
            f"must match each other and q's dtype {q.dtype}")
    B, Hq, D = q.shape
    if k_pool.shape[2] != D:
        raise ValueError(f"k_pool head dim {k_pool.shape[2]} != q head dim {D}")
    if num_kv_heads <= 0 or Hq % num_kv_heads:
        raise ValueError(f"q has {Hq} heads, not a multiple of num_kv_heads={num_kv_heads}")
    check_index("page_table", page_table, 2, "[B * num_kv_heads, max_pages]")
    check_index("seq_lens", seq_lens, 1, "[B * num_kv_heads]")
    rows = B * num_kv_heads
    if page_table.shape[0] != rows or seq_lens.shape[0] != rows:
        raise ValueError(f"page_table {tuple(page_table.shape)} and seq_lens {tuple(seq_lens.shape)} need "
                         f"{rows} rows (B={B} x num_kv_heads={num_kv_heads})")
    if rows > MAX_ROWS:
        raise ValueError(f"{rows} (request, KV head) rows exceed {MAX_ROWS}; split the batch")
    for name, t in (("q", q), ("k_pool", k_pool), ("v_pool", v_pool)):
        check_last_dim_contiguous(name, t)
    check_same_device(q=q, k_pool=k_pool, v_pool=v_pool, page_table=page_table, seq_lens=seq_lens)


def check_decode_positions(page_table, num_kv_heads, page_pos, q_pos, sink_tokens, window_tokens):
    """The four position tensors, checked, or None when none is given."""
    given = {"page_pos": page_pos, "q_pos": q_pos, "sink_tokens": sink_tokens, "window_tokens": window_tokens}
    if all(t is None for t in given.values()):
        return None
    if any(t is None for t in given.values()):
        raise ValueError(f"positions need all of {sorted(given)}; missing {[n for n, t in given.items() if t is None]}")
    want = {"page_pos": tuple(page_table.shape), "q_pos": (page_table.shape[0] // num_kv_heads,),
            "sink_tokens": (num_kv_heads,), "window_tokens": (num_kv_heads,)}
    for name, t in given.items():
        if t.dtype != torch.int32 or tuple(t.shape) != want[name]:
            raise ValueError(f"{name} must be int32 of shape {want[name]}, got {t.dtype} {tuple(t.shape)}")
        check_last_dim_contiguous(name, t)  # the kernel reads them with unit stride
        check_same_device(page_table=page_table, **{name: t})
    return page_pos, q_pos, sink_tokens, window_tokens


def default_split_tokens(head_dim: int, dtype_bytes: int = 2) -> int:
    """Tokens per work item: 512 KB of K+V (1024 tokens at D=128, bf16). On the H200 this beat 2048
    (fewer items than programs at 32K) and 256 / 512 (more partials to merge): see docs/kernels.md."""
    return max(64, (512 * 1024) // (2 * head_dim * dtype_bytes))


def decode_configs() -> list[dict]:
    """Tile candidates ``(BLOCK_N, num_warps, num_stages)``; the interpreter runs one small tile."""
    if is_interpreter():
        return [dict(BLOCK_N=16, num_warps=4, num_stages=1)]
    return [dict(BLOCK_N=bn, num_warps=w, num_stages=st)
            for bn, w, st in ((64, 4, 3), (64, 4, 4), (128, 4, 3), (128, 8, 3), (64, 8, 4), (128, 8, 2))]


def segpaged_decode(
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    page_table: torch.Tensor,
    seq_lens: torch.Tensor,
    *,
    scale: float,
    num_kv_heads: int,
    return_lse: bool = False,
    split_tokens: int | None = None,
    programs_per_sm: int = 3,
    config: dict | None = None,
    page_pos: torch.Tensor | None = None,
    q_pos: torch.Tensor | None = None,
    sink_tokens: torch.Tensor | None = None,
    window_tokens: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Decode attention of ``q`` over each (request, KV head)'s page list; see the module docstring.

    Args:
        scale: softmax scale (usually ``D ** -0.5``).
        num_kv_heads: KV heads per request (rows of ``page_table`` are ``b * num_kv_heads + h``).
        return_lse: also return ``lse [B, Hq]`` (fp32, natural log) for merging with other attention.
        split_tokens: tokens per work item (rounded up to the tile); default 512 KB of K+V.
        programs_per_sm: persistent programs per SM.
        config: ``dict(BLOCK_N, num_warps, num_stages)``; default the first of ``decode_configs()``.
        page_pos, q_pos, sink_tokens, window_tokens: positions and the head map's visibility, all four
            or none (module docstring).
    Returns:
        ``out [B, Hq, D]`` in q's dtype, or ``(out, lse)``.
    """
    check_decode_args(q, k_pool, v_pool, page_table, seq_lens, num_kv_heads)
    pos = check_decode_positions(page_table, num_kv_heads, page_pos, q_pos, sink_tokens, window_tokens)
    B, Hq, D = q.shape
    page_tokens = k_pool.shape[1]
    group = Hq // num_kv_heads
    rows = B * num_kv_heads
    config = config or decode_configs()[0]
    block_n = config["BLOCK_N"]
    split = split_tokens or default_split_tokens(D, q.element_size())
    split = max(block_n, triton.cdiv(split, block_n) * block_n)
    max_tokens = page_table.shape[1] * page_tokens
    max_items = rows * triton.cdiv(max(max_tokens, 1), split)

    out = torch.empty_like(q)
    lse = torch.empty((B, Hq), device=q.device, dtype=torch.float32) if return_lse else out
    part_out = torch.empty((max_items, group, D), device=q.device, dtype=torch.float32)
    part_lse = torch.empty((max_items, group), device=q.device, dtype=torch.float32)
    meta = dict(GROUP=group, BLOCK_G=max(16, next_pow2(group)), HEAD_DIM=D, BLOCK_D=next_pow2(D),
                BLOCK_R=max(16, next_pow2(rows)))
    grid = (max(1, min(max_items, programs_per_sm * num_sms(q.device))),)
    _segpaged_decode_kernel[grid](
        q, k_pool, v_pool, page_table, seq_lens, part_out, part_lse,
        *(pos or (page_table,) * 4),  # without positions: any int32 pointer, never read
        rows, num_kv_heads, max_tokens, split, scale * LOG2E,
        q.stride(0), q.stride(1),
        k_pool.stride(0), k_pool.stride(1),
        v_pool.stride(0), v_pool.stride(1),
        page_table.stride(0), pos[0].stride(0) if pos else 0,
        PAGE_TOKENS=page_tokens, BLOCK_N=block_n, INTERPRET=is_interpreter(), HAS_POS=pos is not None,
        num_warps=config["num_warps"], num_stages=config["num_stages"], **meta,
    )
    _segpaged_decode_merge_kernel[(rows, group)](
        part_out, part_lse, seq_lens, out, lse,
        rows, num_kv_heads, max_tokens, split,
        out.stride(0), out.stride(1), lse.stride(0), lse.stride(1),
        GROUP=group, HEAD_DIM=D, BLOCK_D=meta["BLOCK_D"], BLOCK_R=meta["BLOCK_R"], BLOCK_I=16,
        HAS_LSE=return_lse, INTERPRET=is_interpreter(), num_warps=4,
    )
    return (out, lse) if return_lse else out


__all__ = ["decode_configs", "default_split_tokens", "segpaged_decode"]
