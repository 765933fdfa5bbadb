"""``StridedCopier``: copies between vLLM's KV blocks and kvd's canonical segments for every block
layout that is a strided view of a block (every CPU ISA and GPU layout seen), modelled from the
probed ``BlockLayout`` by ``half_models``. The other copiers are in ``kvd.connectors.vllm.copy``."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from kvd.client.views import copy_block, numpy_view
from kvd.connectors.vllm.engine_loads import EngineLoads
from kvd.connectors.vllm.layout import BlockLayout
from kvd.connectors.vllm.pieces import LayerRows, Piece


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


def half_models(layout: BlockLayout, itemsize: int) -> tuple[_HalfModel, _HalfModel] | None:
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


class StridedCopier(EngineLoads):
    """Layouts that are strided views of a block (every layout seen: vec, vec16, amx; LBHNC, LBNHC).

    Per layer, two passes through a token-ordered canonical staging buffer ``[H, 2, T, D]`` (reused,
    so it stays in cache; each piece padded to whole blocks): (A) per piece and head class, one copy
    of the extent's rows of this layer (``K | V`` of each head, contiguous on both sides: memcpy
    speed); (B) per run of consecutive kernel blocks and per K/V, one strided copy between the staging
    and vLLM's blocks, which does the ISA's packing (``vec``'s K transpose, ``amx``'s tiles; pairs of
    bf16 move as one int32 where the ISA keeps them together). A block a load fills in part (the
    prompt's last) gets only its loaded tokens: vLLM has already written the tokens it computes into
    the same block. Measured for a 4K-token load of SmolLM2 (``vec``, 91 MB, the shipped head map's 7
    extents per entry): 81 ms with the former per-(piece, class, K/V) copies into a block-ordered
    buffer and a gather of whole blocks, 38 ms with these, 26.6 ms with pass A on numpy views
    (``benchmarks/vllm_copier.py``; a memcpy of the same bytes: 6.5 ms). Stores run the same passes
    backwards (always whole blocks). Loads may run pass B through the engine's own cache write instead
    (``adopt_engine_write``: where it measures faster at start, as for ``amx``), straight from the
    extents, without pass A, when a piece's extents hold each of a layer's heads once in consecutive
    runs (``_write_direct``; ``EngineLoads`` in ``kvd.connectors.vllm.engine_loads``)."""

    partial_blocks = True  # a load may end inside a block

    def __init__(self, layout: BlockLayout, models: tuple[_HalfModel, _HalfModel]) -> None:
        self.layout = layout
        self.models = models
        self.rows = LayerRows()
        self._buf: torch.Tensor | None = None
        super().__init__()

    def _staging(self, kv_layer: torch.Tensor, pieces: Sequence[Piece]) -> torch.Tensor:
        """``[H, 2, T, D]`` with each piece padded to whole blocks, from a buffer kept across calls."""
        L = self.layout
        tokens = sum(len(p.block_ids) for p in pieces) * L.block_tokens
        n = L.num_heads * 2 * tokens * L.head_dim
        buf = self._buf
        if buf is None or buf.numel() < n or buf.dtype != kv_layer.dtype or buf.device != kv_layer.device:
            buf = self._buf = torch.empty(n, dtype=kv_layer.dtype, device=kv_layer.device)
        return buf[:n].view(L.num_heads, 2, tokens, L.head_dim)

    def _extent_pairs(self, stage: torch.Tensor, layer: int, pieces: Sequence[Piece]):
        """Pairs (extent part, staging part) of equal shape ``[heads, 2, n, D]``: pass A. On the CPU as
        numpy views (the pieces' arrays made once per load): about a thousand small copies per 4K
        load, whose torch slicing cost more than the bytes moved (pass A of a 4K load: 21 -> 9.6 ms).
        A piece with ``sums`` (``kvd.connectors.vllm.sums``) has each extent's rows of the layer hashed
        right after they are copied (the generator resumes once the copy is done)."""
        cpu = stage.device.type == "cpu"
        if cpu:
            stage = numpy_view(stage)
        o = 0
        for p in pieces:
            n = p.t1 - p.t0
            for j, (plan, view, *_) in enumerate(p.arrays() if cpu else p.extents):
                s0, s1, heads = self.rows(plan, layer)
                if s1 == s0:
                    continue
                src = view[s0:s1, :, p.t0 : p.t1]
                if isinstance(heads, slice):
                    yield src, stage[heads, :, o : o + n]
                else:
                    for i, h in enumerate(heads):
                        yield src[i : i + 1], stage[h : h + 1, :, o : o + n]
                if cpu and p.sums is not None and p.sums[j] is not None:
                    p.sums[j].update(view[s0:s1])  # just copied: these rows are still in cache
            o += len(p.block_ids) * self.layout.block_tokens

    def _wide(self, m: _HalfModel, base: int, dtype: torch.dtype):
        """(width, d sizes, d strides, dtype) to move ``m``'s innermost run of d as one element."""
        w = m.widen if base % m.widen == 0 else 1
        d_sizes = m.d_sizes[:-1] + (m.d_sizes[-1] // w,)
        d_strides = tuple(x // w for x in m.d_strides[:-1]) + ((1,) if w > 1 else m.d_strides[-1:])
        return w, d_sizes, d_strides, _WIDE[w * torch.empty(0, dtype=dtype).element_size()] if w > 1 else dtype

    def _block_pairs(self, stage: torch.Tensor, target: torch.Tensor, runs: list[tuple[int, int, int]]):
        """Pairs (staging part, block view) of equal shape, per run ``(first staged block, first block of
        ``target``, blocks)`` of whole blocks and per K/V: pass B."""
        L = self.layout
        N, E, H, D = L.block_tokens, L.block_elems, L.num_heads, L.head_dim
        for j, b, k in runs:
            base = target.storage_offset() + b * target.stride(0)
            for kv, m in enumerate(self.models):
                w, d_sizes, d_strides, wide = self._wide(m, base + m.base, stage.dtype)
                src = stage[:, kv, j * N : (j + k) * N].reshape(H, k * N, D).view(wide).view(H, k, *m.n_sizes, *d_sizes)
                dst = torch.as_strided(target.view(wide), (H, k, *m.n_sizes, *d_sizes),
                                       (m.stride_h // w, E // w, *(x // w for x in m.n_strides), *d_strides),
                                       (base + m.base) // w)
                yield src, dst

    def _partial_pairs(self, stage: torch.Tensor, kv_layer: torch.Tensor, j: int, b: int, r: int):
        """Pairs (staging part, block view) covering exactly tokens ``[0, r)`` of block ``b``: the
        token digits split into at most one rectangle per digit (``amx``: whole 16-token tiles, then
        the rest of one tile)."""
        L = self.layout
        N, H, D = L.block_tokens, L.num_heads, L.head_dim
        for kv, m in enumerate(self.models):
            t, elem, left = 0, kv_layer.storage_offset() + b * kv_layer.stride(0) + m.base, r
            for i, stride in enumerate(m.n_strides):
                inner = 1
                for x in m.n_sizes[i + 1 :]:
                    inner *= x
                q = left // inner
                if q:
                    src = stage[:, kv, j * N + t : j * N + t + q * inner].reshape(H, q, *m.n_sizes[i + 1 :], *m.d_sizes)
                    dst = torch.as_strided(kv_layer, (H, q, *m.n_sizes[i + 1 :], *m.d_sizes),
                                           (m.stride_h, stride, *m.n_strides[i + 1 :], *m.d_strides), elem)
                    yield src, dst
                t, elem, left = t + q * inner, elem + q * stride, left - q * inner
            assert left == 0 and D == math.prod(m.d_sizes)

    def _targets(self, kv_layer: torch.Tensor, pieces: Sequence[Piece]):
        """``(runs, partial, ids, blocks)``. ``runs``: runs of whole blocks as ``_block_pairs`` takes
        them; ``partial``: ``(staged block, block, tokens)`` of blocks filled in part. When the runs are
        many (fragmented ids), they target a block-ordered buffer ``blocks`` instead, whose rows then
        move to blocks ``ids`` with one scatter / gather of whole blocks (else both are None)."""
        N = self.layout.block_tokens
        staged = [(b, min(N, p.t1 - p.t0 - i * N)) for p in pieces for i, b in enumerate(p.block_ids)]
        whole = [(j, b) for j, (b, r) in enumerate(staged) if r == N]
        partial = [(j, b, r) for j, (b, r) in enumerate(staged) if r < N]
        runs: list[list[int]] = []
        for j, b in whole:
            if runs and runs[-1][0] + runs[-1][2] == j and runs[-1][1] + runs[-1][2] == b:
                runs[-1][2] += 1
            else:
                runs.append([j, b, 1])
        if len(runs) <= MAX_RUNS:
            return [tuple(x) for x in runs], partial, None, None
        blocks = torch.empty((len(whole), *kv_layer.shape[1:]), dtype=kv_layer.dtype, device=kv_layer.device)
        runs = []
        for i, (j, _) in enumerate(whole):  # runs of the staging, into consecutive rows of ``blocks``
            if runs and runs[-1][0] + runs[-1][2] == j:
                runs[-1][2] += 1
            else:
                runs.append([j, i, 1])
        return [tuple(x) for x in runs], partial, [b for _, b in whole], blocks

    def load_layer(self, kv_layer: torch.Tensor, layer: int, pieces: Sequence[Piece]) -> None:
        write = self.engine_write
        if write is not None and self._write_direct(write, kv_layer, layer, pieces):
            return
        stage = self._staging(kv_layer, pieces)
        for src, dst in self._extent_pairs(stage, layer, pieces):
            copy_block(dst, src, non_blocking=False)
        if write is not None:
            self._write_by_engine(write, stage, kv_layer, pieces)
        else:
            self._pass_b(stage, kv_layer, pieces)

    def _pass_b(self, stage: torch.Tensor, kv_layer: torch.Tensor, pieces: Sequence[Piece]) -> None:
        """Staging -> vLLM's blocks by strided copies (pass B of a load)."""
        runs, partial, ids, blocks = self._targets(kv_layer, pieces)
        for src, dst in self._block_pairs(stage, kv_layer if blocks is None else blocks, runs):
            copy_block(dst, src, non_blocking=False)
        if blocks is not None:
            _whole_blocks(kv_layer)[ids] = _whole_blocks(blocks)
        for j, b, r in partial:
            for src, dst in self._partial_pairs(stage, kv_layer, j, b, r):
                copy_block(dst, src, non_blocking=False)

    def save_layer(self, kv_layer: torch.Tensor, layer: int, pieces: Sequence[Piece]) -> None:
        stage = self._staging(kv_layer, pieces)
        runs, partial, ids, blocks = self._targets(kv_layer, pieces)
        if partial:
            raise ValueError("stores move whole blocks only")
        if blocks is not None:
            _whole_blocks(blocks)[:] = _whole_blocks(kv_layer)[ids]
        for dst, src in self._block_pairs(stage, kv_layer if blocks is None else blocks, runs):
            copy_block(dst, src, non_blocking=False)
        for dst, src in self._extent_pairs(stage, layer, pieces):
            copy_block(dst, src, non_blocking=False)


MAX_RUNS = 4  # more runs of consecutive blocks than this: stage in block order, then move whole blocks


def _whole_blocks(t: torch.Tensor):
    """Rows of whole blocks of a ``[blocks, ...]`` tensor with dense blocks: numpy on the CPU (fancy
    indexing without torch's thread pool), else torch."""
    flat = torch.as_strided(t, (t.shape[0], t[0].numel()), (t.stride(0), 1))
    return numpy_view(flat) if t.device.type == "cpu" else flat
