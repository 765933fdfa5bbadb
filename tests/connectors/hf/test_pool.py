"""The page pool's bookkeeping decided on the host (appends and trims that never read the GPU, listings
kept between steps) holds exactly the pages the visibility rule keeps, step after step, against a
brute-force recount and a listing rebuilt from the table."""

from __future__ import annotations

import random

import torch

from kvd.connectors.hf.pool import PagePool
from kvd.core.headmap import HeadMap, HeadSpec


def _expected_columns(num_tokens: int, sink: int, window: int, n: int) -> set[int]:
    """Columns a head keeps once the next query is at ``num_tokens`` (brute force over positions)."""
    cols = -(-num_tokens // n)
    if window == 0:
        return set(range(cols))
    keep = set()
    for j in range(cols):
        positions = range(j * n, (j + 1) * n)  # a page also takes the tokens still to come
        if any(p < sink or p > num_tokens - window for p in positions):
            keep.add(j)
    return keep


def _same_listing(pool: PagePool) -> None:
    """The listing kept from an earlier step (lengths moved on) equals one built from the table now."""
    kept, fresh = pool.listing(0), pool._list(0)
    for name in ("page_table", "page_pos", "seq_lens"):
        assert torch.equal(getattr(kept, name), getattr(fresh, name)), name


def test_appends_and_trims_keep_exactly_the_visible_pages():
    rnd = random.Random(0)
    n = 8
    spec = [(0, 0), (3, 5), (8, 17), (0, 1), (12, 40)]  # (sink, window): global, tiny, page-aligned, ...
    heads = [[HeadSpec(head_class="global") if w == 0 else HeadSpec(head_class="local", sink=s, window=w)
              for s, w in spec]]
    pool = PagePool(HeadMap(model="pool-test", num_layers=1, num_kv_heads=len(spec), heads=heads), head_dim=4,
                    dtype=torch.float32, device="cpu", batch_size=2, page_tokens=n, initial_pages=2)
    for _ in range(40):
        t = rnd.choice([1, 1, 1, 3, 8, 13])
        k = torch.randn(pool.rows, t, 4)
        start = pool.append(0, k, k + 1)
        kk, vv = pool.read(0, torch.arange(start, start + t))  # read back through the pages the host allocated
        assert torch.equal(kk, k) and torch.equal(vv, k + 1)
        _same_listing(pool)
        pool.trim(0)
        _same_listing(pool)
        end = pool.num_tokens[0]
        assert start + t == end
        held = pool.tables[0] >= 0
        for r in range(pool.rows):
            sink, window = spec[r % len(spec)]
            got = {j for j in range(held.shape[1]) if held[r, j]}
            assert got == _expected_columns(end, sink, window, n), (r, end)
    assert pool.pages_in_use == int(held.sum())


def test_append_after_a_write_of_some_rows_only_allocates_what_is_missing():
    """A write that covers some rows leaves the others without the column's page; appends then take
    the general path, which finds and allocates the missing pages (the fast path would index -1)."""
    heads = [[HeadSpec(head_class="global"), HeadSpec(head_class="global")]]
    pool = PagePool(HeadMap(model="pool-test", num_layers=1, num_kv_heads=2, heads=heads), head_dim=4,
                    dtype=torch.float32, device="cpu", page_tokens=8)
    pool.write(0, torch.ones(1, 5, 4), torch.ones(1, 5, 4), torch.arange(5), rows=torch.tensor([0]))
    k = torch.randn(2, 1, 4)
    start = pool.append(0, k, k + 1)
    assert start == 5 and bool((pool.tables[0][:, 0] >= 0).all())
    kk, vv = pool.read(0, torch.tensor([5]))
    assert torch.equal(kk, k) and torch.equal(vv, k + 1)
