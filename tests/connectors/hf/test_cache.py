"""The transformers adapter on the real SmolLM2 (fp32, CPU): plain transformers when every head is
global, the masked reference with a head map, generate() unchanged, prefix entries through a real
daemon. Tolerance: max |Δlogit| ≤ 5e-4 (fp32 logits of magnitude ~20; measured 5e-5 to 9e-5 over
300 tokens: the page-pool path sums in another order than sdpa)."""

from __future__ import annotations

import pytest
import torch

from kvd.calibrate.masked_attention import apply_head_map
from kvd.connectors.hf import cache as hf
from kvd.core.headmap import HeadMap
from tests.daemon_proc import DaemonProc

pytestmark = pytest.mark.model
ATOL = 5e-4


def _ids(n: int, seed: int) -> torch.Tensor:
    return torch.randint(100, 20000, (1, n), generator=torch.Generator().manual_seed(seed))


def _small_window_map(seed: int = 0) -> HeadMap:
    """Mostly local heads with windows far shorter than the test prompts, so pages are dropped."""
    g = torch.Generator().manual_seed(seed)
    is_global = (torch.rand(30, 3, generator=g) < 0.2).tolist()
    windows = torch.randint(16, 48, (30, 3), generator=g).tolist()
    return HeadMap.from_classes("smollm2-test", is_global, sink=4, window=windows)


def test_all_global_equals_plain_transformers_in_two_chunks(model):
    ids = _ids(120, 1)
    with torch.no_grad():
        ref = model(ids).logits
        cache = hf.attach(model)
        a = model(ids[:, :70], past_key_values=cache).logits
        b = model(ids[:, 70:], past_key_values=cache).logits
    assert (torch.cat([a, b], 1) - ref).abs().max() <= ATOL
    assert cache.get_seq_length() == 120


def test_head_map_matches_masked_reference_and_keeps_only_sink_and_window(model):
    hm = _small_window_map()
    ids = _ids(140, 2)
    with torch.no_grad():
        cache = hf.attach(model, head_map=hm)
        out = torch.cat([model(ids[:, :100], past_key_values=cache).logits,
                         model(ids[:, 100:], past_key_values=cache).logits], 1)
        hf.detach(model)
        with apply_head_map(model, hm):
            ref = model(ids).logits
    assert (out - ref).abs().max() <= ATOL
    # local heads hold their sink page and the pages of their window only (page 16 tokens)
    pool = cache.pool
    for layer in (0, 15, 29):
        held = pool.held_tokens(layer).tolist()
        for h, spec in enumerate(hm.heads[layer]):
            assert held[h] == 144 if spec.is_global else held[h] <= 16 + spec.window + 32
    assert cache.kv_bytes() < 0.6 * 2 * 30 * 3 * 144 * 64 * 4


def test_generate_runs_unchanged(model):
    hm = _small_window_map(3)
    ids = _ids(60, 3)
    with torch.no_grad():
        cache = hf.attach(model, head_map=hm)
        out = model.generate(ids, past_key_values=cache, max_new_tokens=6, do_sample=False)
        hf.detach(model)
        with apply_head_map(model, hm):
            ref = model.generate(ids, max_new_tokens=6, do_sample=False)
    assert out.tolist() == ref.tolist()
    assert cache.get_seq_length() == 65


def test_prefix_stored_and_reloaded_through_the_daemon(model, tmp_path):
    """Request 1 stores its prompt's whole chunks; request 2 loads them bit for bit and computes only
    the rest, with the same logits."""
    d = DaemonProc(tmp_path, env_extra={"KVD_KEYS__CHUNK_TOKENS": "32"}).start()
    try:
        with d.client() as client:
            ids = _ids(100, 4)
            hm = _small_window_map(4)
            with torch.no_grad():
                first = hf.attach(model, head_map=hm, client=client)
                r1 = model.generate(ids, past_key_values=first, max_new_tokens=3, do_sample=False,
                                    output_scores=True, return_dict_in_generate=True)
                assert first.stored_chunks == 3  # 96 of 100 prompt tokens
                second = first.fresh()
                seen = []
                hook = model.register_forward_pre_hook(
                    lambda m, a, kw: seen.append(kw["input_ids"].shape[1]), with_kwargs=True)
                try:
                    r2 = model.generate(ids, past_key_values=second, max_new_tokens=3, do_sample=False,
                                        output_scores=True, return_dict_in_generate=True)
                finally:
                    hook.remove()
            assert seen[0] == 100 - 96  # the loaded 96 tokens were not computed again
            assert r1.sequences.tolist() == r2.sequences.tolist()
            for s1, s2 in zip(r1.scores, r2.scores):
                assert (s1 - s2).abs().max() <= 1e-4
            # the loaded KV is the stored KV, bit for bit (global rows keep every position)
            for layer in (0, 29):
                g = [h for h in range(3) if hm.heads[layer][h].is_global] or [None]
                if g[0] is None:
                    continue
                rows = torch.tensor(g)
                k1, v1 = first.pool.read(layer, torch.arange(96), rows)
                k2, v2 = second.pool.read(layer, torch.arange(96), rows)
                assert torch.equal(k1, k2) and torch.equal(v1, v2)
    finally:
        d.kill()
