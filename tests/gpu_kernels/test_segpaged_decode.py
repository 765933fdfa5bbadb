"""SegPagedAttention decode against its torch reference (Triton interpreter on the CPU).

Tolerances: outputs are bf16/fp16 of values |o| < ~4, so one output ulp is up to 1.6e-2 (bf16) or
2e-3 (fp16); the kernel also rounds the probabilities to the KV dtype before the PV product, as every
flash kernel does. lse is fp32 from exact bf16 products: 1e-4.
"""

from __future__ import annotations

import pytest
import torch

from kvd.gpu_kernels import segpaged_decode, segpaged_decode_ref, segpaged_prefill_ref

TOL = {torch.bfloat16: dict(atol=3e-2, rtol=2e-2, max_rel_norm=1e-2),
       torch.float16: dict(atol=4e-3, rtol=4e-3, max_rel_norm=2e-3)}


def _case(B, Hkv, G, D, N, lens, dtype, seed, max_pages=None):
    """Random pools; each row's pages are distinct, shuffled (not contiguous, not sorted)."""
    g = torch.Generator().manual_seed(seed)
    lens = torch.tensor(lens, dtype=torch.int32)
    assert lens.numel() == B * Hkv
    pages_needed = [(int(n) + N - 1) // N for n in lens]
    max_pages = max_pages or max(1, max(pages_needed))
    num_pages = sum(pages_needed) + 3
    perm = torch.randperm(num_pages, generator=g)
    table = torch.full((B * Hkv, max_pages), -1, dtype=torch.int32)  # -1: never read past the list
    used = 0
    for r, n in enumerate(pages_needed):
        table[r, :n] = perm[used:used + n].int()
        used += n
    q = torch.randn(B, Hkv * G, D, generator=g).to(dtype)
    k_pool = torch.randn(num_pages, N, D, generator=g).to(dtype)
    v_pool = torch.randn(num_pages, N, D, generator=g).to(dtype)
    return q, k_pool, v_pool, table, lens


CASES = [
    # id, B, Hkv, G, D, N, lens (one per (request, KV head) row), split_tokens
    ("B2-Hkv2-G4-D64-N16-ragged", 2, 2, 4, 64, 16, [37, 128, 5, 64], 32),
    ("B2-Hkv2-G4-D128-N16-empty", 2, 2, 4, 128, 16, [0, 70, 16, 1], 32),
    ("B1-Hkv3-G3-D64-N16-smollm", 1, 3, 3, 64, 16, [200, 20, 33], 64),
    ("B3-Hkv1-G1-D64-N32-mha", 3, 1, 1, 64, 32, [96, 31, 0], 32),
    ("B1-Hkv2-G8-D128-N16-all-empty", 1, 2, 8, 128, 16, [0, 0], 32),
    ("B2-Hkv2-G4-D64-N8-tile-spans-pages", 2, 2, 4, 64, 8, [45, 8, 0, 17], 32),
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_decode_matches_reference(case, dtype, poison, close):
    _, B, Hkv, G, D, N, lens, split = case
    q, k_pool, v_pool, table, seq_lens = _case(B, Hkv, G, D, N, lens, dtype, seed=hash(case[0]) % 1000)
    kw = dict(scale=D ** -0.5, num_kv_heads=Hkv, return_lse=True, split_tokens=split)
    out, lse = segpaged_decode(q, k_pool, v_pool, table, seq_lens, **kw)
    ref, ref_lse = segpaged_decode_ref(q, k_pool, v_pool, table, seq_lens, **kw)
    assert out.dtype == dtype and out.shape == q.shape
    close("out", out, ref, **TOL[dtype])
    close("lse", lse, ref_lse, atol=1e-4, rtol=1e-5)


def test_decode_empty_list_gives_zeros_and_minus_inf_lse(poison):
    q, k_pool, v_pool, table, seq_lens = _case(1, 2, 4, 64, 16, [0, 40], torch.bfloat16, seed=1)
    out, lse = segpaged_decode(q, k_pool, v_pool, table, seq_lens, scale=0.125, num_kv_heads=2, return_lse=True)
    assert torch.equal(out[0, :4].float(), torch.zeros(4, 64))
    assert torch.isinf(lse[0, :4]).all() and (lse[0, :4] < 0).all()


def test_decode_split_size_does_not_change_result(close):
    """Merging items with the log-sum-exp rule must give the same answer as one item per row."""
    q, k_pool, v_pool, table, seq_lens = _case(1, 2, 4, 64, 16, [300, 150], torch.float16, seed=2)
    kw = dict(scale=0.125, num_kv_heads=2)
    one = segpaged_decode(q, k_pool, v_pool, table, seq_lens, split_tokens=512, **kw)
    many = segpaged_decode(q, k_pool, v_pool, table, seq_lens, split_tokens=16, **kw)
    close("out split 16 vs 512", many, one, atol=2e-3, rtol=2e-3)


def test_decode_reads_only_listed_pages():
    """Pages of other rows and table entries past the list are never read: NaN there changes nothing."""
    q, k_pool, v_pool, table, seq_lens = _case(1, 2, 4, 64, 16, [20, 0], torch.bfloat16, seed=3)
    listed = table[0, :2].long()
    mask = torch.ones(k_pool.shape[0], dtype=torch.bool)
    mask[listed] = False
    k_pool[mask] = float("nan")
    v_pool[mask] = float("nan")
    k_pool[listed[1], 4:] = float("nan")  # past the 20th token of the partial last page
    v_pool[listed[1], 4:] = float("nan")
    out = segpaged_decode(q, k_pool, v_pool, table, seq_lens, scale=0.125, num_kv_heads=2)
    assert not torch.isnan(out).any()


def test_decode_rejects_bad_shapes():
    q, k_pool, v_pool, table, seq_lens = _case(1, 2, 4, 64, 16, [20, 10], torch.bfloat16, seed=4)
    with pytest.raises(ValueError, match="num_kv_heads"):
        segpaged_decode(q, k_pool, v_pool, table, seq_lens, scale=0.1, num_kv_heads=3)
    with pytest.raises(ValueError, match="rows"):
        segpaged_decode(q, k_pool, v_pool, table[:1], seq_lens, scale=0.1, num_kv_heads=2)
    with pytest.raises(ValueError, match="k_pool"):
        segpaged_decode(q, k_pool.float(), v_pool, table, seq_lens, scale=0.1, num_kv_heads=2)


# ---- positions: the page pool's lists, whose edge pages hold keys a local head must not see ----------

def _positioned(dtype, seed):
    """B=2, Hkv=3, N=16: head 0 global (whole context), head 1 local (sink 4, window 20), head 2 local
    with sink 0 whose listed column-0 page is wholly hidden (an item with no visible key). Each row
    lists page columns as the pool does after trimming: column 0, then the window's columns."""
    N, D, Hkv, G, B = 16, 64, 3, 3, 2
    q_pos = torch.tensor([190, 100], dtype=torch.int32)
    cols = {0: lambda at: list(range(at // N + 1)),
            1: lambda at: [0, *range((at - 20 + 1) // N, at // N + 1)],
            2: lambda at: [0, *range((at - 20 + 1) // N, at // N + 1)]}
    lists = [[c * N for c in cols[h](int(q_pos[b]))] for b in range(B) for h in range(Hkv)]
    width = max(len(x) for x in lists)
    g = torch.Generator().manual_seed(seed)
    num_pages = sum(len(x) for x in lists) + 2
    ids = torch.randperm(num_pages, generator=g).int()
    table = torch.zeros(B * Hkv, width, dtype=torch.int32)
    page_pos = torch.zeros(B * Hkv, width, dtype=torch.int32)
    lens = torch.zeros(B * Hkv, dtype=torch.int32)
    used = 0
    for r, starts in enumerate(lists):
        table[r, :len(starts)] = ids[used:used + len(starts)]
        page_pos[r, :len(starts)] = torch.tensor(starts, dtype=torch.int32)
        lens[r] = (len(starts) - 1) * N + int(q_pos[r // Hkv]) % N + 1  # the last page ends at the query
        used += len(starts)
    q = torch.randn(B, Hkv * G, D, generator=g).to(dtype)
    k_pool = torch.randn(num_pages, N, D, generator=g).to(dtype)
    v_pool = torch.randn(num_pages, N, D, generator=g).to(dtype)
    pos = dict(page_pos=page_pos, q_pos=q_pos, sink_tokens=torch.tensor([0, 4, 0], dtype=torch.int32),
               window_tokens=torch.tensor([0, 20, 20], dtype=torch.int32))
    return q, k_pool, v_pool, table, lens, pos


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("split", [16, 64])
def test_decode_with_positions_matches_reference_and_prefill_rule(dtype, split, poison, close):
    q, k_pool, v_pool, table, lens, pos = _positioned(dtype, seed=5)
    kw = dict(scale=0.125, num_kv_heads=3, return_lse=True)
    out, lse = segpaged_decode(q, k_pool, v_pool, table, lens, split_tokens=split, **kw, **pos)
    ref, ref_lse = segpaged_decode_ref(q, k_pool, v_pool, table, lens, **kw, **pos)
    close("out", out, ref, **TOL[dtype])
    close("lse", lse, ref_lse, atol=1e-4, rtol=1e-5)
    # the decode reference's rule is the prefill reference's for one query per request
    cu = torch.arange(3, dtype=torch.int32)
    pre, pre_lse = segpaged_prefill_ref(q, k_pool, v_pool, table, pos["page_pos"], lens, pos["q_pos"], cu,
                                        pos["sink_tokens"], pos["window_tokens"], **kw)
    close("ref vs prefill rule", ref, pre, **TOL[dtype])
    close("ref lse vs prefill rule", ref_lse, pre_lse, atol=1e-4, rtol=1e-5)
    # and the hidden keys matter: without positions the answer differs on the local heads only
    plain = segpaged_decode_ref(q, k_pool, v_pool, table, lens, scale=0.125, num_kv_heads=3)
    assert torch.equal(plain[:, :3], ref[:, :3])
    assert (plain[:, 3:] - ref[:, 3:]).abs().max() > 0.1


def test_decode_with_positions_needs_all_four():
    q, k_pool, v_pool, table, lens, pos = _positioned(torch.bfloat16, seed=6)
    with pytest.raises(ValueError, match="missing.*window_tokens"):
        segpaged_decode(q, k_pool, v_pool, table, lens, scale=0.1, num_kv_heads=3,
                        **{k: v for k, v in pos.items() if k != "window_tokens"})
    with pytest.raises(ValueError, match="q_pos must be int32 of shape"):
        segpaged_decode(q, k_pool, v_pool, table, lens, scale=0.1, num_kv_heads=3, **{**pos, "q_pos": pos["q_pos"][:1]})


def test_decode_rejects_strided_positions():
    """The kernel reads page_pos rows, q_pos, sink and window with unit stride (as prefill's checks
    require): a strided view must be refused, not read as if contiguous (it gave wrong outputs)."""
    q, k_pool, v_pool, table, lens, pos = _positioned(torch.bfloat16, seed=7)
    strided = {"page_pos": pos["page_pos"].t().contiguous().t(),
               **{n: torch.stack([pos[n], pos[n]], 1)[:, 0] for n in ("q_pos", "sink_tokens", "window_tokens")}}
    for name, t in strided.items():
        assert torch.equal(t, pos[name]) and t.stride(-1) != 1
        with pytest.raises(ValueError, match=f"{name}.*contiguous"):
            segpaged_decode(q, k_pool, v_pool, table, lens, scale=0.1, num_kv_heads=3, **{**pos, name: t})


def test_decode_negative_length_lists_nothing_and_spares_other_rows(poison, close):
    """A negative seq_len is an empty list (as the reference reads it): it made a negative item count
    in the work map, which shifted every later row's items (inf outputs there)."""
    q, k_pool, v_pool, table, seq_lens = _case(1, 3, 2, 64, 16, [40, 40, 40], torch.float16, seed=8)
    seq_lens[0] = -100
    kw = dict(scale=0.125, num_kv_heads=3, return_lse=True, split_tokens=16)
    out, lse = segpaged_decode(q, k_pool, v_pool, table, seq_lens, **kw)
    ref, ref_lse = segpaged_decode_ref(q, k_pool, v_pool, table, seq_lens, **kw)
    close("out", out, ref, **TOL[torch.float16])
    close("lse", lse, ref_lse, atol=1e-4, rtol=1e-5)
