"""Copies between vLLM's per-layer paged KV views and kvd's canonical segments (views of the arena).

vLLM hands each layer's KV as ``kv_layer[num_blocks, H, N, 2D]`` whose bytes inside a block depend on
the attention backend: the GPU backends use plain strided layouts (``LBNHC``, ``LBHNC``), the CPU backend
packs each (block, head) by ISA (``vec``: K transposed ``[D, N]`` then V ``[N, D]``; ``amx``: VNNI tiles;
others may differ). kvd stores every segment canonically, ``K[T, D]`` then ``V[T, D]``, so stored KV is
portable across engines, layouts and ISAs, and the head map's codecs can read it.

``kvd.connectors.vllm.layout`` finds, by probing the engine's own cache-write kernel, where each
(head, K/V, token, dim) of a block lies (a ``BlockLayout``). Copiers built on it (``make_copier`` picks):

- ``StridedCopier`` (``kvd.connectors.vllm.strided``; any layout that is a strided view of a block,
  which every CPU ISA and GPU layout seen is): per layer, contiguous copies between the arena and a
  token-ordered canonical staging buffer, then one strided copy per run of consecutive blocks that
  does the ISA's packing. On the CPU through numpy (one thread; ``kvd.client.views.copy_block``).
- ``PermCopier`` (a layout that is no strided view): the same with a gather by the permutation.
- ``KernelCopier`` (CUDA, layouts ``LBNHC``/``LBHNC``): ``kvd.gpu_kernels`` gather/scatter, reading or
  writing the (pinned) arena directly; ``use_triton=False`` runs their torch references (tests).

A ``Piece`` (``kvd.connectors.vllm.pieces``) is tokens ``[t0, t1)`` of one chunk entry: the kernel
blocks holding them (in token order) and the entry's extents. Loads may start inside a chunk (vLLM's own
prefix hit ends on a block boundary that is not a chunk boundary) and may end inside a block (right
before the prompt's last token, when its chunk is stored; copiers with ``partial_blocks`` write only
the loaded tokens of that block, the others load whole blocks and the worker recomputes the rest);
stores always move whole chunks.

The stored form is always canonical, whatever the engine's packing: an entry records no packing, and
every reader (another ISA, SGLang, the transformers adapter, the codecs) reads the same bytes. What a
reader with the same packing as the writer could gain from a raw copy is what the conversion costs
over a memcpy; measured per 4K load (docs/vllm.md), that is what ``StridedCopier`` keeps small.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kvd.connectors.vllm.layout import BlockLayout
from kvd.connectors.vllm.pieces import LayerRows, Piece
from kvd.connectors.vllm.strided import StridedCopier, half_models
from kvd.core.extents import ExtentPlan
from kvd.gpu_kernels import gather_segments, gather_segments_ref, scatter_segments, scatter_segments_ref


class PermCopier:
    """Moves whole blocks through the probed permutation (any layout with dense blocks)."""

    partial_blocks = False  # whole blocks only: a load ending inside a block stops before it (recomputed)

    def __init__(self, layout: BlockLayout) -> None:
        self.layout = layout
        self.rows = LayerRows()

    def _blocks(self, kv_layer: torch.Tensor) -> torch.Tensor:
        return torch.as_strided(kv_layer, (kv_layer.shape[0], self.layout.block_elems), (kv_layer.stride(0), 1))

    def _ids(self, pieces: Sequence[Piece], device) -> torch.Tensor:
        return torch.tensor([b for p in pieces for b in p.block_ids], dtype=torch.int64, device=device)

    def load_layer(self, kv_layer: torch.Tensor, layer: int, pieces: Sequence[Piece]) -> None:
        L = self.layout
        N, D = L.block_tokens, L.head_dim
        ids = self._ids(pieces, kv_layer.device)
        canon = torch.empty((len(ids), L.num_heads, 2, N, D), dtype=kv_layer.dtype, device=kv_layer.device)
        o = 0
        for p in pieces:
            k, j0 = len(p.block_ids), p.t0 // N
            for plan, view, *_ in p.extents:
                s0, s1, heads = self.rows(plan, layer)
                if s1 > s0:
                    src = view[s0:s1].view(s1 - s0, 2, -1, N, D)[:, :, j0 : j0 + k]
                    canon[o : o + k, heads] = src.permute(2, 0, 1, 3, 4)
            o += k
        blocks = self._blocks(kv_layer)
        blocks.index_copy_(0, ids, canon.view(len(ids), -1).index_select(1, L.from_canon))

    def save_layer(self, kv_layer: torch.Tensor, layer: int, pieces: Sequence[Piece]) -> None:
        L = self.layout
        N, D = L.block_tokens, L.head_dim
        ids = self._ids(pieces, kv_layer.device)
        full = self._blocks(kv_layer).index_select(0, ids)
        canon = full.index_select(1, L.to_canon).view(len(ids), L.num_heads, 2, N, D)
        o = 0
        for p in pieces:
            k, j0 = len(p.block_ids), p.t0 // N
            for plan, view, *_ in p.extents:
                s0, s1, heads = self.rows(plan, layer)
                if s1 > s0:
                    dst = view[s0:s1].view(s1 - s0, 2, -1, N, D)[:, :, j0 : j0 + k]
                    dst.copy_(canon[o : o + k, heads].permute(1, 2, 0, 3, 4))
            o += k


def _flat(view: torch.Tensor) -> torch.Tensor:
    """The whole storage behind ``view`` as a 1-D tensor of its dtype (the arena, for the kernels)."""
    st = view.untyped_storage()
    return torch.empty(0, dtype=view.dtype, device=view.device).set_(st, 0, (st.nbytes() // view.element_size(),))


class KernelCopier:
    """``kvd.gpu_kernels`` gather/scatter over named layouts; segments stay in the arena (zero copy)."""

    partial_blocks = True  # the kernels write per token: a load may end inside a block

    def __init__(self, layout: str, *, block_tokens: int, head_dim: int, use_triton: bool) -> None:
        self.layout = layout
        self.N, self.D = block_tokens, head_dim
        self.rows = LayerRows()
        self.gather = gather_segments if use_triton else gather_segments_ref
        self.scatter = scatter_segments if use_triton else scatter_segments_ref

    def _calls(self, kv_layer, layer: int, pieces: Sequence[Piece]):
        """Yield ``(block_ids [S, nb], head_ids, buf, offsets [S, nh], T)``: per head class, entry size
        and buffer, one call for the whole-entry pieces (segments read in place) and one per partial
        piece (staged). A call's offsets index one buffer with one segment size: entries of a class
        differ in size (a tail entry) and may lie in different buffers."""
        dev = kv_layer.device
        by_class: dict[tuple[str, int, int], list[tuple[Piece, ExtentPlan, torch.Tensor]]] = {}
        for p in pieces:
            for plan, view, *_ in p.extents:
                key = (plan.head_class, plan.num_tokens, view.untyped_storage().data_ptr())
                by_class.setdefault(key, []).append((p, plan, view))
        for rows in by_class.values():
            plan = rows[0][1]  # the same plan for every piece of a group
            s0, s1, _ = self.rows(plan, layer)
            if s1 == s0:
                continue
            head_ids = torch.tensor([h for _, h in plan.heads[s0:s1]], dtype=torch.int64, device=dev)
            seg = plan.segment_bytes // plan.dtype_bytes
            whole = [(p, v) for p, _, v in rows if p.t0 == 0 and p.t1 == plan.num_tokens]
            if whole:
                bids = torch.tensor([list(p.block_ids) for p, _ in whole], dtype=torch.int64, device=dev)
                offs = torch.tensor([[v.storage_offset() + (s0 + i) * seg for i in range(s1 - s0)]
                                     for _, v in whole], dtype=torch.int64, device=dev)
                yield bids, head_ids, _flat(whole[0][1]), offs, plan.num_tokens
            for p, _, v in rows:
                if p.t0 == 0 and p.t1 == plan.num_tokens:
                    continue
                # A load starting inside the chunk: stage K[t0:t1] | V[t0:t1] contiguously for the kernel.
                n = p.t1 - p.t0
                stage = v[s0:s1, :, p.t0 : p.t1].to(dev).contiguous().view(-1)
                bids = torch.tensor([list(p.block_ids)], dtype=torch.int64, device=dev)
                offs = (torch.arange(s1 - s0, device=dev, dtype=torch.int64) * 2 * n * self.D)[None, :]
                yield bids, head_ids, stage, offs, n

    def load_layer(self, kv_layer: torch.Tensor, layer: int, pieces: Sequence[Piece]) -> None:
        for bids, head_ids, buf, offs, T in self._calls(kv_layer, layer, pieces):
            self.scatter(kv_layer, bids, head_ids, buf, offs, layout=self.layout, num_tokens=T)

    def save_layer(self, kv_layer: torch.Tensor, layer: int, pieces: Sequence[Piece]) -> None:
        if any(p.t0 != 0 or p.t1 != p.extents[0][0].num_tokens for p in pieces):
            raise ValueError("stores move whole chunks only")
        for bids, head_ids, buf, offs, T in self._calls(kv_layer, layer, pieces):
            self.gather(kv_layer, bids, head_ids, buf, offs, layout=self.layout, num_tokens=T)


def make_copier(layout: BlockLayout, kv_layer: torch.Tensor) -> StridedCopier | PermCopier | KernelCopier:
    """The kernels on CUDA for the layouts they know; else strided copies where the probed layout is a
    strided view (every CPU ISA seen); else the permutation gather (exact for any bijection)."""
    if kv_layer.device.type == "cuda" and layout.name in ("LBNHC", "LBHNC"):
        return KernelCopier(layout.name, block_tokens=layout.block_tokens, head_dim=layout.head_dim,
                            use_triton=True)
    models = half_models(layout, kv_layer.element_size())
    return StridedCopier(layout, models) if models is not None else PermCopier(layout)
