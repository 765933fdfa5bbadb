"""Head-map masks: exact semantics on random tensors, and on the real model against plain sdpa."""

from __future__ import annotations

import pytest
import torch

from kvd.calibrate.masked_attention import apply_head_map, masked_sdpa, visibility_mask
from kvd.core.headmap import HeadMap


def test_visibility_mask_sink_and_window():
    # KV head 0: sink 2, window 3, query at position 9 sees keys 0, 1 and 7, 8, 9; head 1 is global.
    mask = visibility_mask([2, 0], [3, 0], torch.tensor([9]), 10, n_rep=1)
    assert mask[0, 0].nonzero().flatten().tolist() == [0, 1, 7, 8, 9]
    assert mask[1, 0].all()
    # Sink overlapping the window: query 3 sees everything up to itself.
    assert visibility_mask([2], [3], torch.tensor([3]), 10, 1)[0, 0].nonzero().flatten().tolist() == [0, 1, 2, 3]


def test_masked_sdpa_matches_explicit_softmax():
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 4, 12, 8), torch.randn(1, 2, 12, 8), torch.randn(1, 2, 12, 8)
    sink, window = [1, 0], [4, 0]  # query heads 0,1 -> local (sink 1, window 4); 2,3 -> global
    out = masked_sdpa(q, k, v, sink, window, scaling=0.3)  # [B, q, H, D]
    kk, vv = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    scores = (q @ kk.transpose(-1, -2)) * 0.3
    mask = visibility_mask(sink, window, torch.arange(12), 12, 2)
    ref = torch.softmax(scores.masked_fill(~mask[None], float("-inf")), -1) @ vv
    torch.testing.assert_close(out, ref.transpose(1, 2), atol=1e-5, rtol=1e-5)


@pytest.mark.model
def test_all_global_map_is_bit_identical_to_sdpa(smollm2_fp32):
    model, _ = smollm2_fp32
    ids = torch.randint(100, 20000, (1, 96), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(ids).logits
        with apply_head_map(model, HeadMap.all_global("m", 30, 3)):
            out = model(ids).logits
        # Every head local with a window longer than the text: same visibility, masked kernel path.
        with apply_head_map(model, HeadMap.from_classes("m", [[False] * 3] * 30, sink=4, window=4096)):
            wide = model(ids).logits
    assert torch.equal(out, ref)
    torch.testing.assert_close(wide, ref, atol=1e-4, rtol=1e-4)
    assert model.config._attn_implementation == "sdpa", "the implementation must be restored"


@pytest.mark.model
def test_local_heads_change_only_positions_past_the_window(smollm2_fp32):
    model, _ = smollm2_fp32
    ids = torch.randint(100, 20000, (1, 128), generator=torch.Generator().manual_seed(2))
    sink, window = 4, 32
    is_global = [[h == 0 for h in range(3)] for _ in range(30)]
    hm = HeadMap.from_classes("m", is_global, sink=sink, window=window)
    with torch.no_grad():
        ref = model(ids).logits[0]
        with apply_head_map(model, hm):
            out = model(ids).logits[0]
    early = slice(0, sink + window)  # these queries see all their keys either way
    torch.testing.assert_close(out[early], ref[early], atol=1e-4, rtol=1e-4)
    assert (out[sink + window + 8:] - ref[sink + window + 8:]).abs().max() > 0.1


@pytest.mark.model
def test_decode_over_cache_keeps_the_mask_offset(smollm2_fp32):
    """Regression guard for the mask trap: a 1-token step over a cache must use absolute positions."""
    model, _ = smollm2_fp32
    ids = torch.randint(100, 20000, (1, 80), generator=torch.Generator().manual_seed(3))
    hm = HeadMap.from_classes("m", [[h == 1 for h in range(3)] for _ in range(30)], sink=2, window=16)
    with torch.no_grad(), apply_head_map(model, hm):
        whole = model(ids).logits[0, -1]
        pre = model(ids[:, :-1], use_cache=True)
        step = model(ids[:, -1:], past_key_values=pre.past_key_values, use_cache=True).logits[0, -1]
    torch.testing.assert_close(step, whole, atol=1e-3, rtol=1e-3)
