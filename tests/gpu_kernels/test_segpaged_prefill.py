"""SegPagedAttention prefill / extend against its torch reference (Triton interpreter on the CPU).

Tolerances as in test_segpaged_decode: one bf16 output ulp (|o| < ~4) is up to 1.6e-2; lse 1e-4.
"""

from __future__ import annotations

import pytest
import torch

from kvd.gpu_kernels import segpaged_prefill, segpaged_prefill_ref

pytestmark = pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning")

TOL = {torch.bfloat16: dict(atol=3e-2, rtol=2e-2, max_rel_norm=1e-2),
       torch.float16: dict(atol=4e-3, rtol=4e-3, max_rel_norm=2e-3)}


def _case(ctx_lens, new_lens, Hkv, G, D, N, dtype, seed, keep=None):
    """Requests with ``ctx_lens`` tokens in all, the last ``new_lens`` of them new (queries).

    Every (request, head) lists its whole context in shuffled pages, unless ``keep(b, h, page_pos)``
    says which pages a trimmed (local) list keeps.
    """
    g = torch.Generator().manual_seed(seed)
    B = len(ctx_lens)
    rows = []
    for b, L in enumerate(ctx_lens):
        for h in range(Hkv):
            starts = list(range(0, L, N))
            if keep is not None:
                starts = [p for p in starts if keep(b, h, p, L)]
            rows.append((starts, L))
    num_pages = sum(len(s) for s, _ in rows) + 2
    perm = torch.randperm(num_pages, generator=g).tolist()
    max_pages = max(1, max(len(s) for s, _ in rows))
    table = torch.full((B * Hkv, max_pages), -1, dtype=torch.int32)
    page_pos = torch.full((B * Hkv, max_pages), -1, dtype=torch.int32)
    seq_lens = torch.zeros(B * Hkv, dtype=torch.int32)
    for r, (starts, L) in enumerate(rows):
        for i, p in enumerate(starts):
            table[r, i] = perm.pop()
            page_pos[r, i] = p
        # every page is full but the last one, which ends at the context end (if listed)
        seq_lens[r] = 0 if not starts else (len(starts) - 1) * N + min(N, L - starts[-1])
    q_pos = torch.cat([torch.arange(L - n, L) for L, n in zip(ctx_lens, new_lens, strict=True)]).int()
    cu = torch.tensor([0] + torch.tensor(new_lens).cumsum(0).tolist(), dtype=torch.int32)
    q = torch.randn(int(cu[-1]), Hkv * G, D, generator=g).to(dtype)
    k_pool = torch.randn(num_pages, N, D, generator=g).to(dtype)
    v_pool = torch.randn(num_pages, N, D, generator=g).to(dtype)
    return q, k_pool, v_pool, table, page_pos, seq_lens, q_pos, cu


CASES = [
    # id, ctx lens, new lens, Hkv, G, D, N, sink per head, window per head (0 = global)
    ("B2-Hkv2-G4-D64-N16-extend", [70, 40], [20, 40], 2, 4, 64, 16, [0, 4], [0, 24]),
    ("B1-Hkv3-G3-D64-N16-smollm", [90], [90], 3, 3, 64, 16, [0, 4, 2], [0, 16, 40]),
    ("B2-Hkv2-G4-D128-N16-sink-overlaps-window", [30, 9], [30, 9], 2, 4, 128, 16, [4, 4], [0, 64]),
    ("B3-Hkv1-G2-D64-N32-one-empty-request", [50, 33, 10], [17, 0, 10], 1, 2, 64, 32, [4], [20]),
    ("B2-Hkv2-G4-D64-N8-tile-spans-pages", [75, 40], [25, 40], 2, 4, 64, 8, [0, 4], [0, 24]),
]


def _run(case, dtype, keep=None, seed=0):
    _, ctx, new, Hkv, G, D, N, sink, window = case
    q, k_pool, v_pool, table, page_pos, seq_lens, q_pos, cu = _case(ctx, new, Hkv, G, D, N, dtype, seed, keep)
    args = (q, k_pool, v_pool, table, page_pos, seq_lens, q_pos, cu,
            torch.tensor(sink, dtype=torch.int32), torch.tensor(window, dtype=torch.int32))
    kw = dict(scale=D ** -0.5, num_kv_heads=Hkv, return_lse=True)
    return segpaged_prefill(*args, **kw), segpaged_prefill_ref(*args, **kw)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_prefill_matches_reference(case, dtype, poison, close):
    (out, lse), (ref, ref_lse) = _run(case, dtype, seed=len(case[0]))
    close("out", out, ref, **TOL[dtype])
    close("lse", lse, ref_lse, atol=1e-4, rtol=1e-5)


PATHS = {  # K/V tiles by pointer loads, or by one descriptor load per tile
    "pointers": dict(BLOCK_M=32, BLOCK_N=16, num_warps=4, num_stages=1, tma=False),
    "descriptor": dict(BLOCK_M=32, BLOCK_N=16, num_warps=4, num_stages=1, tma=True),
}


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("case", [CASES[0], CASES[1]], ids=[CASES[0][0], CASES[1][0]])
def test_prefill_load_paths_match_reference(case, path, poison, close):
    """Each way of loading K/V tiles gives the reference's result."""
    _, ctx, new, Hkv, G, D, N, sink, window = case
    q, k_pool, v_pool, table, page_pos, seq_lens, q_pos, cu = _case(ctx, new, Hkv, G, D, N, torch.float16, 3)
    args = (q, k_pool, v_pool, table, page_pos, seq_lens, q_pos, cu,
            torch.tensor(sink, dtype=torch.int32), torch.tensor(window, dtype=torch.int32))
    kw = dict(scale=D ** -0.5, num_kv_heads=Hkv, return_lse=True)
    out, lse = segpaged_prefill(*args, config=PATHS[path], **kw)
    ref, ref_lse = segpaged_prefill_ref(*args, **kw)
    close("out", out, ref, **TOL[torch.float16])
    close("lse", lse, ref_lse, atol=1e-4, rtol=1e-5)


def test_prefill_trimmed_local_list_equals_full_list(poison, close):
    """A local head listing only its sink page and the pages of the last queries' window gives the
    same result for those queries as listing the whole context (visibility is by position)."""
    N, sink, window = 16, 4, 20
    q, k_pool, v_pool, table, page_pos, seq_lens, q_pos, cu = _case([100], [8], 2, 4, 64, N, torch.float16, 5)
    heads = (torch.tensor([0, sink], dtype=torch.int32), torch.tensor([0, window], dtype=torch.int32))
    kw = dict(scale=0.125, num_kv_heads=2, return_lse=True)
    full, full_lse = segpaged_prefill(q, k_pool, v_pool, table, page_pos, seq_lens, q_pos, cu, *heads, **kw)
    # row 1 (local) keeps page 0 (the sink) and the pages reaching the earliest query's window
    earliest = int(q_pos[0])
    kept = [i for i in range(7) if i == 0 or int(page_pos[1, i]) + N > earliest - window + 1]
    assert len(kept) < 7
    t_table, t_pos = table.clone(), page_pos.clone()
    t_table[1, :len(kept)], t_pos[1, :len(kept)] = table[1, kept], page_pos[1, kept]
    t_table[1, len(kept):] = -1
    t_lens = seq_lens.clone()
    t_lens[1] = (len(kept) - 1) * N + 100 - int(page_pos[1, 6])
    args = (q, k_pool, v_pool, t_table, t_pos, t_lens, q_pos, cu, *heads)
    trim, trim_lse = segpaged_prefill(*args, **kw)
    ref, _ = segpaged_prefill_ref(*args, **kw)
    close("trimmed vs reference", trim, ref, **TOL[torch.float16])
    close("trimmed vs full list", trim, full, atol=2e-3, rtol=2e-3)
    close("lse trimmed vs full", trim_lse, full_lse, atol=1e-4, rtol=1e-5)


def test_prefill_query_without_visible_keys_gives_zeros(poison):
    """An empty page list: every query of that row sees nothing; output zeros, lse -inf."""
    case = ("empty", [20], [5], 2, 2, 64, 16, [0, 0], [0, 0])
    (out, lse), _ = _run(case, torch.bfloat16, keep=lambda b, h, p, L: h == 0)
    assert torch.equal(out[:, 2:].float(), torch.zeros(5, 2, 64))
    assert torch.isinf(lse[:, 2:]).all()
    assert not torch.isnan(out).any()


def test_prefill_rejects_unsorted_dtype_and_shape_errors():
    case = ("bad", [20], [5], 2, 2, 64, 16, [0, 4], [0, 8])
    _, ctx, new, Hkv, G, D, N, sink, window = case
    q, k_pool, v_pool, table, page_pos, seq_lens, q_pos, cu = _case(ctx, new, Hkv, G, D, N, torch.bfloat16, 0)
    s, w = torch.tensor(sink, dtype=torch.int32), torch.tensor(window, dtype=torch.int32)
    with pytest.raises(ValueError, match="int32"):
        segpaged_prefill(q, k_pool, v_pool, table, page_pos.long(), seq_lens, q_pos, cu, s, w,
                         scale=0.1, num_kv_heads=Hkv)
    with pytest.raises(ValueError, match="num_kv_heads"):
        segpaged_prefill(q, k_pool, v_pool, table, page_pos, seq_lens, q_pos, cu, s[:1], w[:1],
                         scale=0.1, num_kv_heads=Hkv)
    with pytest.raises(ValueError, match="q_pos"):
        segpaged_prefill(q, k_pool, v_pool, table, page_pos, seq_lens, q_pos[:2], cu, s, w,
                         scale=0.1, num_kv_heads=Hkv)


def test_prefill_length_past_the_table_reads_only_the_table(poison, close):
    """A seq_len longer than the row's max_pages * N lists no more than the row's entries (as in the
    decode kernel and both references): the kernel read on into the next row's pages and disagreed
    with the reference (the last row would read past the table's end)."""
    case = ("long", [40], [8], 2, 2, 64, 16, [0, 4], [0, 8])
    _, ctx, new, Hkv, G, D, N, sink, window = case
    q, k_pool, v_pool, table, page_pos, seq_lens, q_pos, cu = _case(ctx, new, Hkv, G, D, N, torch.float16, 9)
    seq_lens[0] = 2 * table.shape[1] * N  # row 0 "lists" row 1's pages too
    args = (q, k_pool, v_pool, table, page_pos, seq_lens, q_pos, cu,
            torch.tensor(sink, dtype=torch.int32), torch.tensor(window, dtype=torch.int32))
    kw = dict(scale=D ** -0.5, num_kv_heads=Hkv, return_lse=True)
    (out, lse), (ref, ref_lse) = segpaged_prefill(*args, **kw), segpaged_prefill_ref(*args, **kw)
    close("out", out, ref, **TOL[torch.float16])
    close("lse", lse, ref_lse, atol=1e-4, rtol=1e-5)


def test_prefill_negative_length_lists_nothing(poison, close):
    """A negative seq_len is an empty list in the kernel and in the decode reference; the prefill
    reference sliced the table with a negative page count and attended to most of the row."""
    case = ("neg", [40], [8], 2, 2, 64, 8, [0, 4], [0, 8])
    _, ctx, new, Hkv, G, D, N, sink, window = case
    q, k_pool, v_pool, table, page_pos, seq_lens, q_pos, cu = _case(ctx, new, Hkv, G, D, N, torch.float16, 10)
    seq_lens[0] = -12  # -(12 // 8) = -1 pages: table[0, :-1]
    args = (q, k_pool, v_pool, table, page_pos, seq_lens, q_pos, cu,
            torch.tensor(sink, dtype=torch.int32), torch.tensor(window, dtype=torch.int32))
    kw = dict(scale=D ** -0.5, num_kv_heads=Hkv, return_lse=True)
    (out, lse), (ref, ref_lse) = segpaged_prefill(*args, **kw), segpaged_prefill_ref(*args, **kw)
    assert torch.equal(ref[:, :G].float(), torch.zeros(8, G, D)) and torch.isinf(ref_lse[:, :G]).all()
    close("out", out, ref, **TOL[torch.float16])
    close("lse", lse, ref_lse, atol=1e-4, rtol=1e-5)


def test_negative_window_is_global_everywhere(close):
    """window <= 0 is a global head in the prefill kernel and in calibrate's visibility_mask; the
    references and the decode kernel read a negative window as local (only the sink seen)."""
    from kvd.calibrate.masked_attention import visibility_mask
    from kvd.gpu_kernels import segpaged_decode, segpaged_decode_ref

    case = ("negw", [40], [8], 2, 2, 64, 16, [4, 4], [-3, 0])
    _, ctx, new, Hkv, G, D, N, sink, window = case
    q, k_pool, v_pool, table, page_pos, seq_lens, q_pos, cu = _case(ctx, new, Hkv, G, D, N, torch.float16, 11)
    s, w = torch.tensor(sink, dtype=torch.int32), torch.tensor(window, dtype=torch.int32)
    args = (q, k_pool, v_pool, table, page_pos, seq_lens, q_pos, cu, s, w)
    kw = dict(scale=D ** -0.5, num_kv_heads=Hkv)
    out, ref = segpaged_prefill(*args, **kw), segpaged_prefill_ref(*args, **kw)
    mask = visibility_mask(sink, window, q_pos.long(), 40, G)
    assert torch.equal(mask[0], mask[-1])  # calibration: the negative window's head sees what the global one does
    close("kernel vs ref", out, ref, **TOL[torch.float16])
    last = q[-1:].contiguous()
    pos = dict(page_pos=page_pos, q_pos=q_pos[-1:].contiguous(), sink_tokens=s, window_tokens=w)
    dec, dec_ref = segpaged_decode(last, k_pool, v_pool, table, seq_lens, **kw, **pos), \
        segpaged_decode_ref(last, k_pool, v_pool, table, seq_lens, **kw, **pos)
    close("decode vs prefill", dec, out[-1:], **TOL[torch.float16])
    close("decode ref vs prefill", dec_ref, out[-1:], **TOL[torch.float16])
