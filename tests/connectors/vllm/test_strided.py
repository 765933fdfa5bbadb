"""``StridedCopier``'s partial blocks: a load that ends inside a block (right before the prompt's last
token) writes exactly the loaded tokens of that block and leaves the rest as vLLM wrote it, on every
strided layout, including a tiled one whose token index splits into two digits (as ``amx``'s)."""

from __future__ import annotations

import pytest
import torch

from kvd.connectors.vllm.copy import Piece, make_copier
from kvd.connectors.vllm.layout import BlockLayout, known_layout
from kvd.connectors.vllm.strided import StridedCopier
from kvd.core.extents import plan_extents
from kvd.core.headmap import HeadMap
from kvd.core.keys import ModelSpec

H, N, D, L = 2, 32, 16, 3
CHUNK = 2 * N


def tiled(Hn: int, Nn: int, Dn: int) -> torch.Tensor:
    """``to_canon`` of an ``amx``-like packing: per (block, head) K as tiles of 16 tokens x 2 dims
    (token digits (N/16, 16) with strides (16 D, 2); dim digits (D/2, 2) with strides (32, 1)), then V
    plain ``[N, D]``."""
    h, kv, n, d = torch.meshgrid(torch.arange(Hn), torch.arange(2), torch.arange(Nn), torch.arange(Dn), indexing="ij")
    k_pos = (n // 16) * 16 * Dn + (n % 16) * 2 + (d // 2) * 32 + d % 2
    return (h * 2 * Nn * Dn + torch.where(kv == 0, k_pos, Nn * Dn + n * Dn + d)).reshape(-1)


def layout(name: str) -> BlockLayout:
    to = tiled(H, N, D) if name == "tiled" else known_layout(name, H, N, D)
    fr = torch.empty_like(to)
    fr[to] = torch.arange(to.numel())
    return BlockLayout(name, H, N, D, to, fr)


def layer(name: str, blocks: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(blocks, N, H, 2 * D, generator=g).bfloat16()
    return t.permute(0, 2, 1, 3) if name == "LBNHC" else t.reshape(blocks, H, N, 2 * D)


def canonical(kv: torch.Tensor, lay: BlockLayout, block: int) -> torch.Tensor:
    """Block ``block`` as ``[H, 2, N, D]`` canonical."""
    flat = torch.as_strided(kv, (kv.shape[0], lay.block_elems), (kv.stride(0), 1))
    return flat[block][lay.to_canon].view(H, 2, N, D)


@pytest.mark.parametrize("r", [1, 5, 16, 17, 31])
@pytest.mark.parametrize("name", ["LBHNC_KT", "LBHNC", "LBNHC", "tiled"])
def test_a_load_ending_inside_a_block_writes_only_its_loaded_tokens(name, r):
    lay = layout(name)
    src = [layer(name, 8, seed=i) for i in range(L)]
    cp = make_copier(lay, src[0])
    assert isinstance(cp, StridedCopier) and cp.partial_blocks
    hm = HeadMap.from_classes("m", [[h == i % H for h in range(H)] for i in range(L)], sink=4, window=16)
    spec = ModelSpec("m", num_layers=L, num_kv_heads=H, head_dim=D, kv_dtype="bfloat16")
    ext = [(p, torch.zeros(p.num_segments, 2, CHUNK, D, dtype=torch.bfloat16))
           for p in plan_extents(spec, hm, CHUNK).values()]
    for i in range(L):
        cp.save_layer(src[i], i, [Piece([2, 3], 0, CHUNK, ext)])
    dst = [layer(name, 8, seed=10 + i) for i in range(L)]
    before = [t.clone() for t in dst]
    for i in range(L):  # blocks 5 (whole) and 6 (r tokens): the chunk's tokens [0, N + r)
        cp.load_layer(dst[i], i, [Piece([5, 6], 0, N + r, ext)])
    for i in range(L):
        assert torch.equal(canonical(dst[i], lay, 5), canonical(src[i], lay, 2))
        got, want, old = canonical(dst[i], lay, 6), canonical(src[i], lay, 3), canonical(before[i], lay, 6)
        assert torch.equal(got[:, :, :r], want[:, :, :r]), "the loaded tokens"
        assert torch.equal(got[:, :, r:], old[:, :, r:]), "tokens vLLM computes must stay as they were"
        for b in (0, 1, 4, 7):
            assert torch.equal(dst[i][b], before[i][b])


def test_stores_never_move_part_of_a_block():
    lay = layout("LBHNC_KT")
    kv = layer("LBHNC_KT", 4, seed=0)
    spec = ModelSpec("m", num_layers=1, num_kv_heads=H, head_dim=D, kv_dtype="bfloat16")
    (plan,) = plan_extents(spec, None, CHUNK).values()
    with pytest.raises(ValueError, match="whole blocks"):
        make_copier(lay, kv).save_layer(kv, 0, [Piece([0, 1], 0, N + 3, [(plan, torch.zeros(H, 2, CHUNK, D))])])
