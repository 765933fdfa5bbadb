"""Where vLLM puts each K/V element inside a KV-cache block, found by asking the engine itself.

vLLM hands each layer's KV as ``kv_layer[num_blocks, H, N, 2D]`` whose bytes inside a block depend on
the attention backend: the GPU backends use plain strided layouts (``LBNHC``, ``LBHNC``), the CPU backend
packs each (block, head) by ISA (``vec``: K transposed ``[D, N]`` then V ``[N, D]``; ``amx``: VNNI tiles;
others may differ). Rather than trusting a name, ``probe_block_layout`` asks the engine's own write
kernel: it writes keys and values that encode (head, token, dim) into a two-block scratch tensor with
the real layer's strides and reads back where each element landed. The result, a ``BlockLayout``, is a
permutation of one block, checked to be a bijection: exact on any ISA. It is computed once per worker
at ``register_kv_caches``; ``kvd.connectors.vllm.copy`` builds the copiers on it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from kvd.core.errors import ConfigError

# write(key [N, H, D], value [N, H, D], kv [2, H, N, 2D], slot_mapping [N]): the engine's cache write.
WriteFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], None]
_DIGIT = 128  # probe values are ±(digit + 1) ≤ 128: exact in bf16, fp16 and fp32


@dataclass(frozen=True)
class BlockLayout:
    """Where canonical element ``[h, kv, n, d]`` of one block lies inside the block's dense region."""

    name: str  # "LBHNC_KT", "LBHNC", "LBNHC" when it matches one, else "probed"
    num_heads: int
    block_tokens: int
    head_dim: int
    to_canon: torch.Tensor  # [H*2*N*D] int64: block position of canonical index i
    from_canon: torch.Tensor  # inverse: canonical index held at block position p

    @property
    def block_elems(self) -> int:
        return self.num_heads * 2 * self.block_tokens * self.head_dim

    def to(self, device) -> BlockLayout:
        return BlockLayout(self.name, self.num_heads, self.block_tokens, self.head_dim,
                           self.to_canon.to(device), self.from_canon.to(device))


def known_layout(name: str, H: int, N: int, D: int) -> torch.Tensor:
    """``to_canon`` of a named layout (``[H, 2, N, D]`` canonical index -> block position)."""
    h, kv, n, d = torch.meshgrid(torch.arange(H), torch.arange(2), torch.arange(N), torch.arange(D), indexing="ij")
    if name == "LBHNC_KT":  # run of a head: K^T [D, N], then V [N, D]
        pos = h * 2 * N * D + torch.where(kv == 0, d * N + n, N * D + n * D + d)
    elif name == "LBHNC":  # [H, N, 2D]
        pos = (h * N + n) * 2 * D + kv * D + d
    elif name == "LBNHC":  # [N, H, 2D]
        pos = (n * H + h) * 2 * D + kv * D + d
    else:
        raise ValueError(f"unknown layout {name!r}")
    return pos.reshape(-1)


def _dense_inner_strides(kv_layer: torch.Tensor) -> tuple[int, int, int]:
    """Strides of dims 1..3 if a block's elements are one dense run (any order), else raise."""
    _, H, N, C = kv_layer.shape
    st = kv_layer.stride()[1:]
    order = sorted(range(3), key=lambda i: -st[i])
    sizes = (H, N, C)
    expect, dense = 1, [0, 0, 0]
    for i in reversed(order):
        dense[i] = expect
        expect *= sizes[i]
    if tuple(dense) != tuple(st) and H > 1 and N > 1:
        raise ConfigError(f"vLLM KV layer of shape {tuple(kv_layer.shape)} has strides {kv_layer.stride()}: a "
                          "block's KV is not one dense run, which kvd's copies need; report this layout")
    return tuple(dense)  # type: ignore[return-value]


def probe_block_layout(write: WriteFn, kv_layer: torch.Tensor) -> BlockLayout:
    """Find where the engine's write kernel puts each (head, K/V, token, dim) inside a block."""
    _, H, N, C = kv_layer.shape
    D = C // 2
    inner = _dense_inner_strides(kv_layer)
    elems = H * N * C
    dev, dtype = kv_layer.device, kv_layer.dtype
    scratch = torch.empty_strided((2, H, N, C), (elems, *inner), dtype=dtype, device=dev)
    slots = torch.arange(N, 2 * N, device=dev, dtype=torch.int64)  # block 1: block index math is exercised
    grids = torch.meshgrid(torch.arange(N), torch.arange(H), torch.arange(D), indexing="ij")  # [N, H, D]
    coords = []  # per quantity (token, head, dim): its value at every block position
    kind = None
    for size, grid in zip((N, H, D), grids):
        value_at = torch.zeros(elems, dtype=torch.int64)
        scale = 1
        while True:
            digit = (grid // scale) % _DIGIT
            scratch.zero_()
            write((digit + 1).to(dtype).to(dev), (-(digit + 1)).to(dtype).to(dev), scratch, slots)
            got = torch.as_strided(scratch, (elems,), (1,), elems).float().cpu()
            if bool((got == 0).any()):
                raise ConfigError("the engine's KV write left part of a block untouched: this attention "
                                  "backend pads or packs blocks in a way kvd cannot copy exactly")
            kind_now = (got < 0).long()
            if kind is not None and not torch.equal(kind, kind_now):
                raise ConfigError("the engine's KV write is not deterministic; kvd cannot map its layout")
            kind = kind_now
            value_at += (got.abs().long() - 1) * scale
            scale *= _DIGIT
            if scale >= size:
                break
        coords.append(value_at)
    t, h, d = coords
    canon = ((h * 2 + kind) * N + t) * D + d
    to_canon = torch.full((elems,), -1, dtype=torch.int64)
    to_canon[canon] = torch.arange(elems)
    if bool((to_canon < 0).any()) or bool((canon < 0).any()) or bool((canon >= elems).any()):
        raise ConfigError("the engine's KV write does not map (head, token, dim) one to one onto a block; "
                          "kvd cannot copy this layout exactly")
    from_canon = torch.empty_like(to_canon)
    from_canon[to_canon] = torch.arange(elems)
    name = next((n for n in ("LBHNC_KT", "LBHNC", "LBNHC") if torch.equal(to_canon, known_layout(n, H, N, D))),
                "probed")
    return BlockLayout(name, H, N, D, to_canon.to(dev), from_canon.to(dev))
