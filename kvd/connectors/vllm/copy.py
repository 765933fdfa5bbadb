"""Copies between vLLM's per-layer paged KV views and kvd's canonical segments (views of the arena).

vLLM hands each layer's KV as ``kv_layer[num_blocks, H, N, 2D]`` whose bytes inside a block depend on
the attention backend: the GPU backends use plain strided layouts (``LBNHC``, ``LBHNC``), the CPU backend
packs each (block, head) by ISA (``vec``: K transposed ``[D, N]`` then V ``[N, D]``; ``amx``: VNNI tiles;
others may differ). kvd stores every segment canonically, ``K[T, D]`` then ``V[T, D]``, so stored KV is
portable across engines, layouts and ISAs, and the head map's codecs can read it.

``kvd.connectors.vllm.layout`` finds, by probing the engine's own cache-write kernel, where each
(head, K/V, token, dim) of a block lies (a ``BlockLayout``). Copiers built on it (``make_copier`` picks):

- ``StridedCopier`` (CPU; any layout that is a strided view of a block, which every CPU ISA and GPU
  layout seen is): per layer, strided copies between the arena and a block-ordered staging buffer,
  then whole blocks into place. On the CPU through numpy (one thread; see ``kvd.client.transfer.copy_block`` for why).
- ``PermCopier`` (a layout that is no strided view): the same with a gather by the permutation.
- ``KernelCopier`` (CUDA, layouts ``LBNHC``/``LBHNC``): ``kvd.gpu_kernels`` gather/scatter, reading or
  writing the (pinned) arena directly; ``use_triton=False`` runs their torch references (tests).

A ``Piece`` is tokens ``[t0, t1)`` of one chunk entry: the kernel blocks holding them (in token order)
and the entry's extents. Loads may start inside a chunk (vLLM's own prefix hit ends on a block boundary
that is not a chunk boundary); stores always move whole chunks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from kvd.client.transfer import copy_block, numpy_view
from kvd.connectors.vllm.layout import BlockLayout
from kvd.core.extents import ExtentPlan
from kvd.gpu_kernels import gather_segments, gather_segments_ref, scatter_segments, scatter_segments_ref


@dataclass
class Piece:
    """Tokens ``[t0, t1)`` (multiples of the block size) of one chunk entry."""

    block_ids: Sequence[int]  # kernel blocks holding tokens t0..t1-1, in token order
    t0: int
    t1: int
    extents: list[tuple[ExtentPlan, torch.Tensor]]  # per head class: plan, [num_segments, 2, T, D] view


class _LayerRows:
    """``(plan, layer) -> (first segment, end segment, heads)`` with heads a slice where consecutive."""

    def __init__(self) -> None:
        self._cache: dict[tuple[str, int, int], tuple[int, int, slice | list[int]]] = {}

    def __call__(self, plan: ExtentPlan, layer: int):
        key = (plan.head_class, plan.num_tokens, layer)
        got = self._cache.get(key)
        if got is None:
            s0, s1 = plan.layer_span(layer)
            heads = [h for _, h in plan.heads[s0:s1]]
            hs: slice | list[int] = slice(heads[0], heads[-1] + 1) if heads and heads == list(
                range(heads[0], heads[-1] + 1)) else heads
            got = self._cache[key] = (s0, s1, hs)
        return got


class PermCopier:
    """Moves whole blocks through the probed permutation (any layout with dense blocks)."""

    def __init__(self, layout: BlockLayout) -> None:
        self.layout = layout
        self.rows = _LayerRows()

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
            for plan, view in p.extents:
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
            for plan, view in p.extents:
                s0, s1, heads = self.rows(plan, layer)
                if s1 > s0:
                    dst = view[s0:s1].view(s1 - s0, 2, -1, N, D)[:, :, j0 : j0 + k]
                    dst.copy_(canon[o : o + k, heads].permute(1, 2, 0, 3, 4))
            o += k


@dataclass(frozen=True)
class _HalfModel:
    """Block position of (head h, token n, dim d) of one half (K or V) as a strided view:
    ``base + h * stride_h + sum(digit_i(n) * n_strides[i]) + sum(digit_j(d) * d_strides[j])``, where
    ``n`` and ``d`` are split into the mixed-radix digits ``n_sizes`` / ``d_sizes`` (most significant
    first). Examples (N=128, D=64, bf16): ``vec`` K is ``n_sizes=(128,), n_strides=(1,),
    d_sizes=(64,), d_strides=(128,)``; ``amx`` K tiles 16 tokens x 2 dims: ``n (8, 16) x (1024, 2)``,
    ``d (32, 2) x (32, 1)``."""

    base: int
    stride_h: int
    n_sizes: tuple[int, ...]
    n_strides: tuple[int, ...]
    d_sizes: tuple[int, ...]
    d_strides: tuple[int, ...]
    widen: int  # elements moved as one (the innermost d digit is contiguous on both sides)


def _digits(pos: torch.Tensor) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """``pos[i] - pos[0]`` as a sum of per-bit strides, merged into runs; None if not of that form."""
    n = pos.numel()
    steps = (pos - pos[0]).tolist()
    if all(steps[i] == i * steps[1] for i in range(n)) if n > 1 else True:
        return (n,), (steps[1] if n > 1 else 0,)
    if n & (n - 1):
        return None
    bits = [steps[1 << k] for k in range(n.bit_length() - 1)]
    runs: list[tuple[int, int]] = []  # (size, stride), least significant first
    k = 0
    while k < len(bits):
        j = k + 1
        while j < len(bits) and bits[j] == bits[k] << (j - k):
            j += 1
        runs.append((1 << (j - k), bits[k]))
        k = j
    runs.reverse()
    return tuple(r[0] for r in runs), tuple(r[1] for r in runs)


def _half_models(layout: BlockLayout, itemsize: int) -> tuple[_HalfModel, _HalfModel] | None:
    H, N, D = layout.num_heads, layout.block_tokens, layout.head_dim
    pos = layout.to_canon.cpu().view(H, 2, N, D)
    out = []
    for kv in (0, 1):
        p = pos[:, kv]
        base = int(p[0, 0, 0])
        sh = int(p[1, 0, 0]) - base if H > 1 else 0
        dn, dd = _digits(p[0, :, 0]), _digits(p[0, 0, :])
        if dn is None or dd is None:
            return None
        w = 1
        while (dd[1][-1] == 1 and dd[0][-1] % (2 * w) == 0 and 2 * w * itemsize <= 8
               and all(x % (2 * w) == 0 for x in (base, sh, D, *dn[1], *dd[1][:-1]))):
            w *= 2
        m = _HalfModel(base, sh, *dn, *dd, w)
        if not torch.equal(_positions(m, H), p.reshape(-1)):
            return None
        out.append(m)
    return out[0], out[1]


def _positions(m: _HalfModel, H: int) -> torch.Tensor:
    grid = torch.arange(H) * m.stride_h + m.base
    for size, stride in zip(m.n_sizes + m.d_sizes, m.n_strides + m.d_strides):
        grid = grid[..., None] + torch.arange(size) * stride
    return grid.reshape(-1)


_WIDE = {2: torch.int16, 4: torch.int32, 8: torch.int64}  # bytes moved as one element -> dtype


class StridedCopier:
    """Layouts that are strided views of a block (every layout seen: vec, vec16, amx; LBHNC, LBNHC):
    per (piece, head class, K/V) one strided copy between the arena and a block-ordered staging
    buffer, then one ``index_copy_`` / ``index_select`` of whole blocks per layer. About a memcpy's
    speed where the ISA keeps ``d`` contiguous; pairs of bf16 move as one int32 where it does not."""

    def __init__(self, layout: BlockLayout, models: tuple[_HalfModel, _HalfModel]) -> None:
        self.layout = layout
        self.models = models
        self.rows = _LayerRows()

    def _views(self, staging: torch.Tensor, o: int, p: Piece, plan: ExtentPlan, view: torch.Tensor, layer: int):
        """Pairs (arena view, staging view) of equal shape for piece ``p``'s class ``plan``."""
        L = self.layout
        N, E = L.block_tokens, L.block_elems
        s0, s1, heads = self.rows(plan, layer)
        k, j0 = len(p.block_ids), p.t0 // N
        head_runs = [(i, i + 1, h) for i, h in enumerate(heads)] if isinstance(heads, list) else [
            (0, s1 - s0, heads.start)]
        for kv, m in enumerate(self.models):
            w = m.widen
            d_sizes = m.d_sizes[:-1] + (m.d_sizes[-1] // w,)
            d_strides = tuple(x // w for x in m.d_strides[:-1]) + ((1,) if w > 1 else m.d_strides[-1:])
            wide = _WIDE[w * view.element_size()] if w > 1 else view.dtype
            for r0, r1, h0 in head_runs:
                src = view[s0 + r0 : s0 + r1, kv, j0 * N : (j0 + k) * N].reshape(r1 - r0, k, N, L.head_dim)
                src = src.view(wide).view(r1 - r0, k, *m.n_sizes, *d_sizes)
                base = staging.view(wide)
                dst = torch.as_strided(base, (r1 - r0, k, *m.n_sizes, *d_sizes),
                                       (m.stride_h // w, E // w, *(x // w for x in m.n_strides), *d_strides),
                                       base.storage_offset() + (o * E + m.base + h0 * m.stride_h) // w)
                yield src, dst

    def _staging(self, kv_layer: torch.Tensor, pieces: Sequence[Piece]):
        ids = torch.tensor([b for p in pieces for b in p.block_ids], dtype=torch.int64, device=kv_layer.device)
        blocks = torch.as_strided(kv_layer, (kv_layer.shape[0], self.layout.block_elems), (kv_layer.stride(0), 1))
        return ids, blocks

    def load_layer(self, kv_layer: torch.Tensor, layer: int, pieces: Sequence[Piece]) -> None:
        ids, blocks = self._staging(kv_layer, pieces)
        staging = torch.empty((len(ids), self.layout.block_elems), dtype=kv_layer.dtype, device=kv_layer.device)
        o = 0
        for p in pieces:
            for plan, view in p.extents:
                for src, dst in self._views(staging, o, p, plan, view, layer):
                    copy_block(dst, src, non_blocking=False)
            o += len(p.block_ids)
        if kv_layer.device.type == "cpu":
            numpy_view(blocks)[ids.numpy()] = numpy_view(staging)
        else:
            blocks.index_copy_(0, ids, staging)

    def save_layer(self, kv_layer: torch.Tensor, layer: int, pieces: Sequence[Piece]) -> None:
        ids, blocks = self._staging(kv_layer, pieces)
        if kv_layer.device.type == "cpu":
            staging = torch.from_numpy(numpy_view(blocks)[ids.numpy()]).view(kv_layer.dtype)
        else:
            staging = blocks.index_select(0, ids)
        o = 0
        for p in pieces:
            for plan, view in p.extents:
                for src, dst in self._views(staging, o, p, plan, view, layer):
                    copy_block(src, dst, non_blocking=False)
            o += len(p.block_ids)


def _flat(view: torch.Tensor) -> torch.Tensor:
    """The whole storage behind ``view`` as a 1-D tensor of its dtype (the arena, for the kernels)."""
    st = view.untyped_storage()
    return torch.empty(0, dtype=view.dtype, device=view.device).set_(st, 0, (st.nbytes() // view.element_size(),))


class KernelCopier:
    """``kvd.gpu_kernels`` gather/scatter over named layouts; segments stay in the arena (zero copy)."""

    def __init__(self, layout: str, *, block_tokens: int, head_dim: int, use_triton: bool) -> None:
        self.layout = layout
        self.N, self.D = block_tokens, head_dim
        self.rows = _LayerRows()
        self.gather = gather_segments if use_triton else gather_segments_ref
        self.scatter = scatter_segments if use_triton else scatter_segments_ref

    def _calls(self, kv_layer, layer: int, pieces: Sequence[Piece]):
        """Yield ``(block_ids [S, nb], head_ids, buf, offsets [S, nh], T)``: per head class, one call for
        the whole-chunk pieces (segments read in place) and one per partial piece (staged)."""
        dev = kv_layer.device
        by_class: dict[str, list[tuple[Piece, ExtentPlan, torch.Tensor]]] = {}
        for p in pieces:
            for plan, view in p.extents:
                by_class.setdefault(plan.head_class, []).append((p, plan, view))
        for rows in by_class.values():
            plan = rows[0][1]  # one model: every piece of a class has the same plan
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
    models = _half_models(layout, kv_layer.element_size())
    return StridedCopier(layout, models) if models is not None else PermCopier(layout)
