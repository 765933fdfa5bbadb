"""Chunk reuse without the real model: token selection, the page pool, chunk stores, the reuse forward
on a tiny random Llama (every method, the sdpa fallbacks against SegPaged), and chunk entries through
a real daemon."""

from __future__ import annotations

import pytest
import torch

from kvd.connectors.hf.pool import PagePool
from kvd.connectors.hf.prefill import model_inv_freq, prefill
from kvd.connectors.hf.reuse import assemble_cached, load_chunks
from kvd.core.headmap import HeadMap
from kvd.reuse.chunks import LocalChunkStore
from kvd.reuse.plan import ReuseConfig, Segment, SparseFfn, assemble, method_config
from kvd.reuse.select import cacheblend_tokens, epic_tokens, sparse_ffn_tokens

# ---- selection ----------------------------------------------------------------------------------


def test_sparse_ffn_keeps_the_mass_then_recent_tokens():
    imp, pos = torch.tensor([4.0, 1.0, 3.0, 2.0]), torch.arange(4)
    # 4 + 3 = 7 reaches 0.7 of 10: tokens 0 and 2
    assert sparse_ffn_tokens(imp, pos, 4, SparseFfn(mass=0.7, recent_tokens=0)).tolist() == [0, 2]
    # the last token always runs when recent_tokens = 1
    assert sparse_ffn_tokens(imp, pos, 4, SparseFfn(mass=0.7, recent_tokens=1)).tolist() == [0, 2, 3]
    # mass 1.0 runs every token; a budget keeps the largest
    assert sparse_ffn_tokens(imp, pos, 4, SparseFfn(mass=1.0)).tolist() == [0, 1, 2, 3]
    assert sparse_ffn_tokens(imp, pos, 4, SparseFfn(keep_fraction=0.5, recent_tokens=0)).tolist() == [0, 2]


def test_sparse_ffn_budget_counts_only_unforced_tokens():
    imp, pos = torch.tensor([9.0, 1.0, 3.0, 2.0, 5.0]), torch.arange(5)
    force = torch.tensor([True, False, False, False, False])
    # token 0 runs anyway; half of the other 4 by importance: tokens 4 and 2
    got = sparse_ffn_tokens(imp, pos, 5, SparseFfn(keep_fraction=0.5, recent_tokens=0), force=force)
    assert got.tolist() == [0, 2, 4]


def test_cacheblend_and_epic_selections():
    reused = torch.tensor([False, True, True, True, True, False])
    dev = torch.tensor([0.0, 5.0, 1.0, 7.0, 2.0, 0.0])
    assert cacheblend_tokens(dev, reused, 0.5).nonzero().flatten().tolist() == [0, 1, 3, 5]
    asm = assemble([Segment([1, 2]), Segment([3, 4, 5], True), Segment([6, 7], True), Segment([8])],
                   [False, True, True, False])
    assert epic_tokens(asm.first_tokens(2), asm.reused).nonzero().flatten().tolist() == [0, 1, 2, 3, 5, 6, 7]


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="unknown reuse method"):
        ReuseConfig(method="magic")
    with pytest.raises(ValueError, match="at least one token"):
        Segment([])
    with pytest.raises(ValueError, match="Sparse FFN"):
        SparseFfn(keep_fraction=1.5)


# ---- page pool ----------------------------------------------------------------------------------


def test_pool_trims_local_pages_outside_sink_and_window():
    """N 16, sink 4, window 32: with the next query at 100, columns 1..3 are dead (module docstring)."""
    head_map = HeadMap.from_classes("toy", [[True, False]], sink=4, window=32)
    pool = PagePool(head_map, head_dim=8, dtype=torch.float32, device="cpu", page_tokens=16, initial_pages=4)
    k = torch.randn(2, 100, 8)
    pool.append(0, k, k + 1)  # grows past the 4 initial pages
    assert pool.trim(0) == 3
    assert pool.held_tokens(0).tolist() == [112, 64]  # global: 7 pages; local: columns 0, 4, 5, 6
    lst = pool.listing(0)
    assert lst.page_pos[1, :4].tolist() == [0, 64, 80, 96]
    assert lst.seq_lens.tolist() == [100, 16 * 3 + 4]
    kk, vv = pool.read(0, torch.tensor([0, 70, 99]))
    assert torch.equal(kk, k[:, [0, 70, 99]]) and torch.equal(vv, k[:, [0, 70, 99]] + 1)
    with pytest.raises(ValueError, match="not held"):
        pool.read(0, torch.tensor([20]))
    pool.clear()
    assert pool.pages_in_use == 0 and pool.num_tokens == [0]


def test_local_chunk_store_is_lru_within_its_budget():
    store = LocalChunkStore(max_bytes=2 * 4 * 10)
    a, b, c = (torch.zeros(10) for _ in range(3))
    assert store.put("a", a) and store.put("b", b)
    store.get(["a"])  # a is now the most recent
    store.put("c", c)
    assert set(store.get(["a", "b", "c"])) == {"a", "c"}
    assert not store.put("big", torch.zeros(100))


# ---- the forward on a tiny random model ---------------------------------------------------------


@pytest.fixture(scope="module")
def tiny():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2)
    model = LlamaForCausalLM(cfg).eval()
    g = torch.Generator().manual_seed(1)
    segs = [Segment(torch.randint(0, 100, (6,), generator=g))]
    segs += [Segment(torch.randint(0, 100, (n,), generator=g), reusable=True) for n in (90, 70, 120)]
    segs += [Segment(torch.randint(0, 100, (10,), generator=g))]
    kvs, hits, computed = load_chunks(model, segs, LocalChunkStore(), namespace="t", fingerprint="0" * 32)
    assert (hits, computed) == (0, 3)
    asm = assemble(segs, [kv is not None for kv in kvs])
    cached = assemble_cached(asm, kvs, model_inv_freq(model), num_layers=3, num_kv_heads=2, head_dim=16,
                             dtype=torch.float32, device="cpu")
    head_map = HeadMap.from_classes("tiny", [[True, False]] * 3, sink=4, window=[[0, 40], [0, 24], [0, 64]])
    return model, segs, asm, cached, head_map


def _run(tiny, cfg, head_map, attention="paged"):
    model, _, asm, cached, _ = tiny
    pool = PagePool(head_map, head_dim=16, dtype=torch.float32, device="cpu")
    with torch.no_grad():
        return prefill(model, asm, cached, cfg, head_map, pool, attention=attention)


def test_recompute_equals_model_forward_and_all_global_kvd_equals_recompute(tiny):
    model, _, asm, _, _ = tiny
    glob = HeadMap.all_global("tiny", 3, 2)
    with torch.no_grad():
        ref = model(asm.token_ids[None]).logits[0, -1]
    rec = _run(tiny, ReuseConfig("recompute"), glob).logits
    torch.testing.assert_close(rec, ref, atol=1e-5, rtol=1e-5)
    # kvd with every head global recomputes every head: the cache is not used
    assert torch.equal(_run(tiny, ReuseConfig("kvd"), glob).logits, rec)


# The tiny model has 3 layers: SPARSE_FFN selects at layer 4, so the sparse paths need an earlier layer.
@pytest.mark.parametrize("name", ["kvd", "kvd_sparse_ffn[dense_layers=1]", "kvd_sparse_ffn[dense_layers=1,importance=output_norm]",
                                  "kvd_cached_local", "naive", "cacheblend", "epic"])
def test_sdpa_fallbacks_match_segpaged(tiny, name):
    cfg = method_config(name)
    head_map = tiny[4] if name.startswith("kvd") else HeadMap.all_global("tiny", 3, 2)
    a = _run(tiny, cfg, head_map).logits
    b = _run(tiny, cfg, head_map, attention="dense").logits
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_sparse_ffn_with_mass_one_is_exact(tiny):
    head_map = tiny[4]
    base = _run(tiny, ReuseConfig("kvd"), head_map)
    dense = _run(tiny, ReuseConfig("kvd", sparse_ffn=SparseFfn(mass=1.0, dense_layers=0)), head_map)
    assert torch.equal(base.logits, dense.logits)
    sparse = _run(tiny, ReuseConfig("kvd", sparse_ffn=SparseFfn(mass=0.5, dense_layers=1, recent_tokens=8)), head_map)
    assert sum(sparse.ffn_tokens) < sum(dense.ffn_tokens)


def test_methods_compute_what_they_say(tiny):
    _, _, asm, _, _ = tiny
    S = asm.num_tokens
    glob = HeadMap.all_global("tiny", 3, 2)
    naive = _run(tiny, ReuseConfig("naive"), glob)
    assert naive.active_tokens == [16] * 3  # header + question
    epic = _run(tiny, ReuseConfig("epic", epic_tokens=8), glob)
    assert epic.active_tokens == [16 + 3 * 8] * 3
    blend = _run(tiny, ReuseConfig("cacheblend", cacheblend_ratio=0.1), glob)
    assert blend.active_tokens == [S, 16 + 28, 16 + 28]  # 10% of 280 cached tokens from layer 1


# ---- chunk entries in a real daemon ---------------------------------------------------------------


def test_chunk_entries_round_trip_through_the_daemon(tiny, tmp_path):
    """Through ``attach(client=...)``: a request stores its chunks in the daemon, a later request with
    the chunks in another order loads them (kvd with cached local KV leases only the local-head
    extents) and gets the logits a local chunk store gives."""
    from kvd.connectors.hf import cache as hf
    from tests.daemon_proc import DaemonProc

    model, segs, _, _, _ = tiny
    hm = HeadMap.from_classes("tiny", [[True, False]] * 3, sink=4, window=[[0, 40], [0, 24], [0, 64]])
    reordered = [segs[0], segs[3], segs[1], segs[2], segs[4]]
    d = DaemonProc(tmp_path).start()
    try:
        with d.client() as client, torch.no_grad():
            cache = hf.attach(model, head_map=hm, client=client)
            assert cache.reuse(segs).chunks_hit == 0  # kvd's default recomputes all KV: no chunk lookup
            assert client.entries().entries == []
            first = cache.fresh().reuse(segs, local_kv="cached")
            assert (first.chunks_hit, first.chunks_computed) == (0, 3)
            assert len(client.entries().entries) == 3
            second = cache.fresh().reuse(reordered, local_kv="cached")
            assert (second.chunks_hit, second.chunks_computed) == (3, 0)
            local = hf.attach(model, head_map=hm).reuse(reordered, local_kv="cached")
            hf.detach(model)
        torch.testing.assert_close(second.logits, local.logits, atol=1e-5, rtol=1e-5)
    finally:
        d.kill()


# ---- the Triton kernels driven by the pool (interpreter on the CPU) -----------------------------


def test_pool_listing_and_assembled_keys_drive_the_triton_kernels():
    """The exact calls the GPU path makes: SegPaged prefill over a trimmed pool's listing (all rows, and
    a subset of heads), and the RoPE shift of an assembled ``[S, L*H, D]`` key view with per-token
    deltas, through the Triton kernels (interpreted) against their torch references."""
    from kvd.connectors.hf.attention import paged_attention
    from kvd.gpu_kernels import rope_shift, rope_shift_ref, segpaged_prefill, segpaged_prefill_ref

    g = torch.Generator().manual_seed(0)
    head_map = HeadMap.from_classes("toy", [[True, False, False]], sink=4, window=[[0, 24, 40]])
    pool = PagePool(head_map, head_dim=16, dtype=torch.bfloat16, device="cpu", page_tokens=16)
    kv = torch.randn(3, 90, 16, generator=g).bfloat16()
    pool.append(0, kv, -kv)
    pool.trim(0, next_pos=70)
    lst = pool.listing(0)
    q = torch.randn(20, 6, 16, generator=g).bfloat16()
    q_pos = torch.arange(70, 90, dtype=torch.int32)
    cu = torch.tensor([0, 20], dtype=torch.int32)
    args = (q, pool.k, pool.v, lst.page_table, lst.page_pos, lst.seq_lens, q_pos, cu, lst.sink, lst.window)
    out = segpaged_prefill(*args, scale=0.25, num_kv_heads=3).float()
    ref = segpaged_prefill_ref(*args, scale=0.25, num_kv_heads=3).float()
    assert (out - ref).abs().max() <= 2e-2
    sub = paged_attention(pool, 0, q[:, 2:].contiguous(), q_pos, cu, 0.25, heads=[1, 2]).float()
    assert (sub - ref[:, 2:]).abs().max() <= 2e-2

    keys = torch.randn(2, 3, 4, 50, 16, generator=g).bfloat16()[0]  # [L, H, S, D] inside a bigger buffer
    view = keys.reshape(12, 50, 16).transpose(0, 1)  # [S, L*H, D], strided like assemble_cached's
    delta = torch.randint(0, 5000, (50,), generator=g).to(torch.int32)
    inv = 1.0 / 100000.0 ** (torch.arange(0, 16, 2, dtype=torch.float32) / 16)
    a = rope_shift(view.clone(), inv, delta).float()
    b = rope_shift_ref(view.clone(), inv, delta).float()
    assert (a - b).abs().max() <= 2e-2


def test_method_names_override_sparse_ffn_fields():
    from kvd.reuse.plan import SPARSE_FFN

    cfg = method_config("kvd_sparse_ffn[keep_fraction=0.3,dense_layers=1,importance=output_norm]")
    assert cfg.method == "kvd" and cfg.sparse_ffn.keep_fraction == 0.3 and cfg.sparse_ffn.dense_layers == 1
    assert cfg.sparse_ffn.importance == "output_norm" and cfg.sparse_ffn.recent_tokens == SPARSE_FFN.recent_tokens
    assert method_config("kvd_sparse_ffn").sparse_ffn == SPARSE_FFN
    with pytest.raises(ValueError, match="not a SparseFfn field"):
        method_config("kvd_sparse_ffn[keep=0.3]")
    with pytest.raises(ValueError, match="bad Sparse FFN settings"):
        method_config("kvd_sparse_ffn[keep_fraction=2]")
    with pytest.raises(ValueError, match="unknown benchmark method"):
        method_config("kvd_sparse")
