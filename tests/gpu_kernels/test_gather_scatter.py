"""Gather / scatter between vLLM KV layouts and kvd segments: bit-exact against the torch reference.

Also checks each layout's meaning on a hand-built layer (K and V known per (block, head, token)).
"""

from __future__ import annotations

import pytest
import torch

from kvd.gpu_kernels import (
    LAYOUTS,
    gather_segments,
    gather_segments_ref,
    scatter_segments,
    scatter_segments_ref,
)


def _layer(layout, num_blocks, H, N, D, dtype, g):
    """A random layer KV as vLLM exposes it: the 4-D view [B, H, N, 2D] with the layout's strides."""
    if layout == "LBNHC":
        phys = torch.randn(num_blocks, N, H, 2 * D, generator=g).to(dtype)
        return phys.permute(0, 2, 1, 3)
    return torch.randn(num_blocks, H, N, 2 * D, generator=g).to(dtype)


def _bits(t):
    return t.view(torch.int16)


CASES = [
    # id, num_blocks, H, N, D, entries x blocks per entry, heads moved, num_tokens
    ("S2-nb3-H4-N16-D64-T40-partial", 20, 4, 16, 64, (2, 3), [3, 1], 40),
    ("S1-nb4-H2-N16-D128-T64-full", 9, 2, 16, 128, (1, 4), [1, 0], None),
    ("S3-nb2-H3-N8-D64-T9-one-head", 12, 3, 8, 64, (3, 2), [2], 9),
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_gather_then_scatter_bit_exact(case, layout, dtype):
    _, num_blocks, H, N, D, (S, nb), heads, T = case
    g = torch.Generator().manual_seed(7)
    kv = _layer(layout, num_blocks, H, N, D, dtype, g)
    block_ids = torch.randperm(num_blocks, generator=g)[: S * nb].reshape(S, nb).int()  # unsorted
    head_ids = torch.tensor(heads, dtype=torch.int32)
    t = T or nb * N
    seg = 2 * t * D
    slots = torch.randperm(S * len(heads) + 2, generator=g)[: S * len(heads)]  # segments anywhere
    offsets = (slots * seg + 3).reshape(S, len(heads)).long()
    size = int((S * len(heads) + 2) * seg + 3)
    buf = torch.full((size,), float("nan"), dtype=dtype)  # poisoned: only segments get written
    ref = buf.clone()
    gather_segments(kv, block_ids, head_ids, buf, offsets, layout=layout, num_tokens=T)
    gather_segments_ref(kv, block_ids, head_ids, ref, offsets, layout=layout, num_tokens=T)
    assert torch.equal(_bits(buf), _bits(ref)), "gather differs from the reference"
    written = torch.zeros(size, dtype=torch.bool)
    for o in offsets.reshape(-1).tolist():
        written[o:o + seg] = True
    assert not torch.isnan(buf[written]).any() and torch.isnan(buf[~written]).all()

    back = torch.full_like(kv, float("nan"))
    back_ref = back.clone()
    scatter_segments(back, block_ids, head_ids, buf, offsets, layout=layout, num_tokens=T)
    scatter_segments_ref(back_ref, block_ids, head_ids, buf, offsets, layout=layout, num_tokens=T)
    assert torch.equal(_bits(back), _bits(back_ref)), "scatter differs from the reference"
    moved = ~torch.isnan(back_ref)
    assert torch.equal(_bits(back[moved]), _bits(kv[moved])), "scatter(gather(kv)) != kv"


@pytest.mark.parametrize("layout", LAYOUTS)
def test_segment_holds_k_then_v_of_each_token(layout):
    """Build a layer from known K[t], V[t] per the layout's definition and read one segment back."""
    B, H, N, D = 3, 2, 4, 64
    k = torch.arange(B * H * N * D, dtype=torch.float32).reshape(B, H, N, D).to(torch.float16)
    v = -k
    if layout == "LBHNC_KT":  # each (block, head) run: K^T [D, N], then V [N, D]
        run = torch.cat([k.transpose(2, 3).reshape(B, H, N * D), v.reshape(B, H, N * D)], dim=2)
        kv = run.reshape(B, H, N, 2 * D)
    elif layout == "LBNHC":  # physically [B, N, H, 2D], C = K | V
        kv = torch.cat([k, v], dim=3).permute(0, 2, 1, 3).contiguous().permute(0, 2, 1, 3)
    else:
        kv = torch.cat([k, v], dim=3).contiguous()
    blocks = torch.tensor([2, 0], dtype=torch.int32)
    dst = torch.empty(2 * 2 * N * D, dtype=torch.float16)
    gather_segments(kv, blocks, torch.tensor([1], dtype=torch.int32), dst, torch.tensor([0]), layout=layout)
    expect_k = torch.cat([k[2, 1], k[0, 1]])
    expect_v = torch.cat([v[2, 1], v[0, 1]])
    assert torch.equal(dst, torch.cat([expect_k.reshape(-1), expect_v.reshape(-1)]))


def test_empty_moves_nothing():
    kv = torch.randn(4, 2, 16, 128).to(torch.bfloat16)
    dst = torch.full((10,), 1.0, dtype=torch.bfloat16)
    gather_segments(kv, torch.zeros((0, 2), dtype=torch.int32), torch.tensor([0], dtype=torch.int32), dst,
                    torch.zeros((0, 1), dtype=torch.long), layout="LBHNC")
    gather_segments(kv, torch.tensor([1], dtype=torch.int32), torch.tensor([0], dtype=torch.int32), dst,
                    torch.zeros(1, dtype=torch.long), layout="LBHNC", num_tokens=0)
    assert (dst == 1.0).all()


def test_rejects_wrong_layout_and_bad_offsets():
    kv = torch.randn(4, 16, 2, 128).to(torch.bfloat16).permute(0, 2, 1, 3)  # LBNHC strides
    dst = torch.empty(4096, dtype=torch.bfloat16)
    blocks, heads = torch.tensor([1], dtype=torch.int32), torch.tensor([0], dtype=torch.int32)
    with pytest.raises(ValueError, match="layout"):
        gather_segments(kv, blocks, heads, dst, torch.zeros(1, dtype=torch.long), layout="LBHNC")
    with pytest.raises(ValueError, match="offsets"):
        gather_segments(kv, blocks, heads, dst, torch.zeros(1, dtype=torch.int32), layout="LBNHC")
    with pytest.raises(ValueError, match="num_tokens"):
        gather_segments(kv, blocks, heads, dst, torch.zeros(1, dtype=torch.long), layout="LBNHC", num_tokens=17)


@pytest.mark.parametrize("layout", ["LBNHC", "LBHNC"])
def test_one_launch_for_many_layers_equals_one_launch_per_layer(layout):
    """``layer_ids``: the segments of several separately allocated layers in one launch (the kernel
    reaches each layer from the lowest-addressed one), bit for bit what per-layer launches move."""
    g = torch.Generator().manual_seed(11)
    L, num_blocks, H, N, D, S, nb = 3, 10, 3, 16, 64, 2, 2
    layers = [_layer(layout, num_blocks, H, N, D, torch.bfloat16, g) for _ in range(L)]
    block_ids = torch.randperm(num_blocks, generator=g)[: S * nb].reshape(S, nb).int()
    layer_ids = torch.tensor([2, 0, 0, 1, 2], dtype=torch.int64)  # any order, a layer twice
    head_ids = torch.tensor([1, 0, 2, 2, 0], dtype=torch.int64)
    seg = 2 * nb * N * D
    offsets = (torch.randperm(S * 5, generator=g).reshape(S, 5) * seg).long()
    buf = torch.full((S * 5 * seg,), float("nan"), dtype=torch.bfloat16)
    per_layer = buf.clone()
    gather_segments(layers, block_ids, head_ids, buf, offsets, layout=layout, layer_ids=layer_ids)
    for j in range(5):  # the same segments, one launch each
        gather_segments(layers[int(layer_ids[j])], block_ids, head_ids[j:j + 1], per_layer,
                        offsets[:, j:j + 1].contiguous(), layout=layout)
    assert torch.equal(_bits(buf), _bits(per_layer))
    ref = torch.full_like(buf, float("nan"))
    gather_segments_ref(layers, block_ids, head_ids, ref, offsets, layout=layout, layer_ids=layer_ids)
    assert torch.equal(_bits(buf), _bits(ref))

    back = [torch.full_like(t, float("nan")) for t in layers]
    back_ref = [t.clone() for t in back]
    scatter_segments(back, block_ids, head_ids, buf, offsets, layout=layout, layer_ids=layer_ids)
    scatter_segments_ref(back_ref, block_ids, head_ids, buf, offsets, layout=layout, layer_ids=layer_ids)
    for lay, b, r in zip(layers, back, back_ref):
        assert torch.equal(_bits(b), _bits(r))
        moved = ~torch.isnan(r)
        assert torch.equal(_bits(b[moved]), _bits(lay[moved]))
    assert (~torch.isnan(back_ref[1])).sum() == S * nb * N * 2 * D  # layer 1: one head moved


def test_many_layers_must_be_alike_and_named():
    g = torch.Generator().manual_seed(3)
    a = _layer("LBHNC", 4, 2, 8, 64, torch.float16, g)
    b = _layer("LBHNC", 5, 2, 8, 64, torch.float16, g)
    ids, heads = torch.zeros(1, 1, dtype=torch.int32), torch.zeros(1, dtype=torch.int32)
    buf, offs = torch.zeros(2 * 8 * 64, dtype=torch.float16), torch.zeros(1, 1, dtype=torch.int64)
    with pytest.raises(ValueError, match="layer 1 is"):
        gather_segments([a, b], ids, heads, buf, offs, layout="LBHNC", layer_ids=torch.tensor([1]))
    with pytest.raises(ValueError, match="pass layer_ids"):
        gather_segments([a, a], ids, heads, buf, offs, layout="LBHNC")
    with pytest.raises(ValueError, match=r"layer_ids must be in \[0, 2\)"):
        gather_segments([a, a.clone()], ids, heads, buf, offs, layout="LBHNC", layer_ids=torch.tensor([2]))
