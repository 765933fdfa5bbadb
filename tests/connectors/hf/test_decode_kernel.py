"""The adapter's one-token steps through ``segpaged_decode`` (Triton's interpreter on the CPU) give what
its torch decode gives, over a page pool that local heads have trimmed: the kernel must hide the keys
of a local head's edge pages (its sink page past the sink, its first window page before the window),
which the pool keeps because pages are whole position columns."""

from __future__ import annotations

import torch

from kvd.connectors.hf.attention import decode_attention, decode_attention_cpu
from kvd.connectors.hf.pool import PagePool
from kvd.core.headmap import HeadMap, HeadSpec


def _pool(batch: int) -> tuple[PagePool, HeadMap]:
    # 2 layers x 3 KV heads: globals, and local heads whose sinks and windows end mid-page
    spec = [[(0, 0), (4, 20), (6, 37)], [(3, 24), (0, 0), (4, 9)]]  # (sink, window); window 0 = global
    heads = [[HeadSpec(head_class="global") if w == 0 else HeadSpec(head_class="local", sink=s, window=w)
              for s, w in layer] for layer in spec]
    hm = HeadMap(model="decode-test", num_layers=2, num_kv_heads=3, heads=heads)
    return PagePool(hm, head_dim=64, dtype=torch.bfloat16, device="cpu", batch_size=batch, page_tokens=16), hm


def test_decode_kernel_matches_torch_decode_over_trimmed_pages():
    g = torch.Generator().manual_seed(0)
    pool, _ = _pool(batch=2)
    rows = pool.rows
    for layer in range(2):
        pool.append(layer, *(torch.randn(2, rows, 150, 64, generator=g).to(torch.bfloat16)))
        pool.trim(layer)
    worst = 0.0
    for _step in range(3):  # a few steps: the window's first page changes from step to step
        for layer in range(2):
            pos = pool.append(layer, *(torch.randn(2, rows, 1, 64, generator=g).to(torch.bfloat16)))
            q = torch.randn(2, 9, 64, generator=g).to(torch.bfloat16)
            out = decode_attention(pool, layer, q, pos, 0.125)
            ref = decode_attention_cpu(pool, layer, q, pos, 0.125)
            assert out.shape == ref.shape and out.dtype == torch.bfloat16
            worst = max(worst, float((out.float() - ref.float()).abs().max()))
            pool.trim(layer)
    assert worst < 3e-2, worst  # one bf16 ulp of outputs |o| < 4


def test_decode_kernel_hides_keys_outside_sink_and_window():
    """The same pool without positions (every listed key seen) gives a different answer on the local
    heads: the test above would catch a kernel that ignores them."""
    from kvd.gpu_kernels import segpaged_decode

    g = torch.Generator().manual_seed(1)
    pool, _ = _pool(batch=1)
    pool.append(0, *(torch.randn(2, pool.rows, 101, 64, generator=g).to(torch.bfloat16)))
    pool.trim(0, next_pos=100)
    q = torch.randn(1, 9, 64, generator=g).to(torch.bfloat16)
    lst = pool.listing(0)
    seen_all = segpaged_decode(q, pool.k, pool.v, lst.page_table, lst.seq_lens, scale=0.125, num_kv_heads=3)
    exact = decode_attention(pool, 0, q, 100, 0.125)
    assert torch.equal(seen_all[:, :3], exact[:, :3])  # the global head: nothing hidden
    assert (seen_all[:, 3:].float() - exact[:, 3:].float()).abs().max() > 0.05
