"""Chunk reuse through the adapter on the real SmolLM2 (fp32, CPU): RoPE alignment of cached keys,
reuse at new positions with head-level recovery, and decoding after it with generate()."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from kvd.connectors.hf import cache as hf
from kvd.connectors.hf.prefill import model_inv_freq
from kvd.connectors.hf.reuse import assemble_cached, compute_chunk
from kvd.core.headmap import HeadMap
from kvd.reuse.plan import Segment, assemble

pytestmark = pytest.mark.model


def _ids(n: int, seed: int) -> list[int]:
    return torch.randint(100, 20000, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _kl(ref: torch.Tensor, got: torch.Tensor) -> float:
    p, q = ref.float().log_softmax(-1), got.float().log_softmax(-1)
    return float((p.exp() * (p - q)).sum())


def _shifted_and_computed(m, offset: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A 40-token chunk's KV computed at [0, 40) and shifted to ``offset`` (``assemble_cached``), and the
    model's own layer-0 keys of those tokens computed at [offset, offset + 40): ``(cached, kv, keys)``."""
    doc = Segment(_ids(40, 1), reusable=True)
    with torch.no_grad():
        kv = compute_chunk(m, doc)
        asm = assemble([Segment(_ids(offset, 2)), doc], [False, True])
        cached = assemble_cached(asm, [None, kv], model_inv_freq(m), num_layers=30, num_kv_heads=3,
                                 head_dim=64, dtype=torch.float32, device="cpu")
        dc = DynamicCache(config=m.config)
        m(torch.tensor([doc.token_ids]), position_ids=torch.arange(offset, offset + 40)[None], past_key_values=dc)
    return cached, kv, dc.layers[0].keys[0]  # keys: [3, 40, 64]


def test_rope_shift_of_layer0_keys_matches_keys_computed_at_new_positions(model):
    """Layer-0 keys depend on token and position only: the chunk's keys computed at [0, 40) and shifted
    by 300 equal the keys computed at [300, 340)."""
    cached, kv, want = _shifted_and_computed(model, 300)
    assert (cached[0, 0, :, 300:340] - want).abs().max() <= 1e-4
    assert torch.equal(cached[1, 0, :, 300:340], kv[0, 1])  # values are not rotated


def test_chunk_reuse_at_new_positions_recovers_and_decodes(model):
    """Documents cached by a first request come back in another order. kvd (default: every head's KV
    recomputed, local heads attending within sink + window) has under a tenth of naive reuse's KL to
    full recompute; the variants that read the chunks (cached local KV, Sparse FFN freezing tokens)
    load them at their new positions; generate() continues from the cache."""
    from kvd.reuse.plan import SPARSE_FFN

    hm = HeadMap.load("config/heads/smollm2-135m.json")
    head, docs, question = _ids(12, 3), [_ids(n, 10 + i) for i, n in enumerate((70, 90, 60))], _ids(20, 4)
    first = [Segment(head), *[Segment(d, reusable=True) for d in docs], Segment(question)]
    again = [Segment(head), *[Segment(docs[i], reusable=True) for i in (2, 0, 1)], Segment(question)]
    with torch.no_grad():
        kvd = hf.attach(model, head_map=hm)
        assert kvd.reuse(first, local_kv="cached").chunks_computed == 3
        full = hf.attach(model, chunk_store=kvd.att.chunk_store)
        ref = full.fresh().reuse(again, method="recompute")
        naive = full.fresh().reuse(again, method="naive")
        assert naive.chunks_hit == 3 and naive.num_cached_tokens == 220
        res = kvd.fresh().reuse(again)
        assert _kl(ref.logits, res.logits) < 0.1 * _kl(ref.logits, naive.logits)
        cached_local = kvd.fresh().reuse(again, local_kv="cached")
        sparse = kvd.fresh().reuse(again, sparse_ffn=SPARSE_FFN)
        assert cached_local.chunks_hit == 3 and sparse.chunks_hit == 3 and sparse.active_fraction < 1
        assert torch.isfinite(cached_local.logits).all() and torch.isfinite(sparse.logits).all()
        cache = kvd.fresh()
        left = cache.reuse(again, leave_last=True)
        out = model.generate(left.input_ids, past_key_values=cache, max_new_tokens=4, do_sample=False)
    assert out.shape[1] == left.input_ids.shape[1] + 4
    assert out[0, -4] == res.logits[0].argmax()


@pytest.mark.parametrize("method,settings", [("naive", {}), ("epic", {"epic_tokens": 0}),
                                             ("cacheblend", {"cacheblend_ratio": 0.0})])
def test_leave_last_when_every_token_left_to_prefill_is_cached(model, method, settings):
    """A cached document and a one-token question with ``leave_last``: a method that computes only
    uncached tokens has none to compute (from its first layer, or after CacheBlend's check layer); the
    cached KV still fills the cache and generate() computes the question token as the request would."""
    segs = [Segment(_ids(50, 5), reusable=True), Segment(_ids(1, 6))]
    with torch.no_grad():
        kvd = hf.attach(model)
        whole = kvd.reuse(segs, method=method, **settings)
        cache = kvd.fresh()
        left = cache.reuse(segs, method=method, leave_last=True, **settings)
        assert left.num_cached_tokens == 50 and cache.get_seq_length() == 50
        out = model.generate(left.input_ids, past_key_values=cache, max_new_tokens=1, do_sample=False)
    assert out[0, -1] == whole.logits[0].argmax()


def test_a_document_twice_in_a_request_is_computed_once_and_not_counted_a_hit(model):
    """The same reusable document twice in one request, with nothing stored: computed once, and its
    second occurrence uses that KV without being counted as found in the chunk store."""
    doc = _ids(30, 7)
    segs = [Segment(doc, reusable=True), Segment(_ids(5, 8)), Segment(doc, reusable=True), Segment(_ids(4, 9))]
    with torch.no_grad():
        kvd = hf.attach(model)
        first = kvd.reuse(segs, method="naive")
        again = kvd.fresh().reuse(segs, method="naive")
    assert (first.chunks_hit, first.chunks_computed, first.num_cached_tokens) == (0, 1, 60)
    assert (again.chunks_hit, again.chunks_computed) == (2, 0)
    assert torch.equal(first.logits, again.logits)


def test_rope_shift_uses_the_frequencies_of_a_model_cast_to_bf16(model):
    """``model.to(torch.bfloat16)`` rounds the rotary ``inv_freq`` buffer, and the model's RoPE uses the
    rounded values: a chunk's keys shifted by 2000 must match the cast model's own keys there (to bf16
    rounding), not be rotated by the unrounded frequencies (radians off at that offset)."""
    import copy

    m = copy.deepcopy(model).to(torch.bfloat16)
    assert m.model.rotary_emb.inv_freq.dtype == torch.bfloat16
    cached, _, want = _shifted_and_computed(m, 2000)
    assert (cached[0, 0, :, 2000:2040] - want.float()).abs().max() <= 0.1  # |k| up to about 7


def test_chunk_entries_in_the_daemon_are_shared_by_head_mapped_and_exact_caches(model, tmp_path):
    """A chunk entry is computed on its own with every head global (exact KV) whatever the map of the
    cache that stores it: the exact cache of a head-mapped attachment (the guard's rerun) finds the
    chunks the head-mapped cache stored in the daemon, and the other way round."""
    from kvd.connectors.hf import GuardConfig
    from tests.daemon_proc import DaemonProc

    hm = HeadMap.load("config/heads/smollm2-135m.json")
    docs = [_ids(n, 20 + i) for i, n in enumerate((30, 40))]
    segs = [*[Segment(d, reusable=True) for d in docs], Segment(_ids(6, 22))]
    other = [Segment(_ids(35, 23), reusable=True), Segment(_ids(6, 24))]
    d = DaemonProc(tmp_path).start()
    try:
        with d.client() as client, torch.no_grad():
            mapped = hf.attach(model, head_map=hm, client=client, guard=GuardConfig(action="rerun"))
            assert mapped.reuse(segs, local_kv="cached").chunks_computed == 2
            exact = mapped.exact()
            got = exact.reuse(segs, method="naive")
            assert (got.chunks_hit, got.chunks_computed) == (2, 0)
            assert exact.fresh().reuse(other, method="naive").chunks_computed == 1
            back = mapped.fresh().reuse(other, local_kv="cached")
            assert (back.chunks_hit, back.chunks_computed) == (1, 0)
    finally:
        hf.detach(model)
        d.kill()
