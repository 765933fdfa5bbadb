"""``StridedCopier``: copies between vLLM's KV blocks and kvd's canonical segments for every block
layout that is a strided view of a block (every CPU ISA and GPU layout seen), modelled from the
probed ``BlockLayout`` by ``half_models``. The other copiers are in ``kvd.connectors.vllm.copy``."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from kvd.client.views import copy_block, numpy_view
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


_NP_WIDE = {2: "int16", 4: "int32", 8: "int64"}  # bytes moved as one element -> numpy dtype name


@dataclass(frozen=True)
class _Copy:
    """One strided copy of a layer's rows ``[g0, g1)`` of an extent (their half ``kv``) to or from
    whole blocks: the block side is ``shape = (heads, blocks, *n_sizes, *d_sizes)`` at byte ``rel`` from
    the run's first block, with byte ``strides`` (the blocks' stride filled in per layer tensor); ``w``
    elements move as one (bf16 pairs or quads where the ISA keeps them together)."""

    g0: int
    g1: int
    kv: int
    w: int
    rel: int
    inner: tuple[int, ...]  # (*n_sizes, *d_sizes) in units of w elements
    strides: tuple[int, ...]  # bytes: head, then inner; the block stride goes between them


class StridedCopier:
    """Layouts that are strided views of a block (every layout seen: vec, vec16, amx; LBHNC, LBNHC).

    One pass, straight between the extents and vLLM's blocks: per piece, run of consecutive blocks,
    group of consecutive heads of a head class in this layer and K/V, one strided copy that does the
    ISA's packing (``vec``'s K transpose, ``amx``'s tiles; pairs or quads of bf16 move as one integer
    where both sides keep them together). What does not depend on the piece (shapes, strides, which
    rows) is worked out once per (head class, layer), and a piece's source arrays once per load, so a
    copy costs a slice and one view. A block a load fills in part (the prompt's last) gets only its
    loaded tokens: vLLM has already written the tokens it computes into the same block.

    On the CPU the copies run through numpy (one thread; see ``kvd.client.views.copy_block``). Measured
    for a 4K-token load of SmolLM2 (``vec``, 94 MB, the shipped head map's 7 extents per entry,
    ``benchmarks/vllm_copier.py``): 81 ms with per-(piece, class, K/V) torch copies into a block-ordered
    buffer, 26.6-40 ms (by the VM's day) with two passes through a token-ordered staging buffer (the
    extents' rows, then the packing), and one pass since (docs/vllm.md has the same-run A/B). Stores run
    the same copies backwards (whole blocks only)."""

    partial_blocks = True  # a load may end inside a block

    def __init__(self, layout: BlockLayout, models: tuple[_HalfModel, _HalfModel]) -> None:
        self.layout = layout
        self.models = models
        self.rows = LayerRows()
        self._plans: dict[tuple[str, int, int, int, int], list[_Copy]] = {}

    def _copies(self, plan, layer: int, itemsize: int, elem0: int, block_stride: int) -> list[_Copy]:
        """The copies of ``plan``'s rows of ``layer``, for block-side element offsets congruent to
        ``elem0`` (mod 8: what decides whether elements can move widened)."""
        key = (plan.head_class, plan.num_tokens, layer, elem0 % 8, block_stride)
        got = self._plans.get(key)
        if got is not None:
            return got
        s0, s1, heads = self.rows(plan, layer)
        groups = ([(s0, s1, heads.start)] if isinstance(heads, slice)
                  else [(s0 + i, s0 + i + 1, h) for i, h in enumerate(heads)])
        got = []
        for g0, g1, h in groups:
            for kv, m in enumerate(self.models):
                rel = h * m.stride_h + m.base
                w = m.widen if (elem0 + rel) % m.widen == 0 and block_stride % m.widen == 0 else 1
                d_sizes = m.d_sizes[:-1] + (m.d_sizes[-1] // w,)
                d_strides = tuple(x // w for x in m.d_strides[:-1]) + ((1,) if w > 1 else m.d_strides[-1:])
                unit = itemsize * w
                got.append(_Copy(g0, g1, kv, w, rel * itemsize, m.n_sizes + d_sizes,
                                 tuple(x * unit for x in (m.stride_h // w, *(y // w for y in m.n_strides), *d_strides))))
        self._plans[key] = got
        return got

    def _pairs(self, kv_layer: torch.Tensor, layer: int, pieces: Sequence[Piece]):
        """Pairs ``(extent part, block part)`` of equal shape whose copies move ``pieces`` for ``layer``."""
        N = self.layout.block_tokens
        cpu = kv_layer.device.type == "cpu"
        side = _BlockSide(kv_layer)
        for p in pieces:
            runs = p.sources.get(N)
            if runs is None:
                runs = p.sources[N] = _runs(p, N)
            for j, b, k, r in runs:
                base = side.elem(b)
                for plan, view, *_ in (p.arrays() if cpu else p.extents):
                    t = p.t0 + j * N
                    for c in self._copies(plan, layer, side.itemsize, base, side.block_stride):
                        if r == N:
                            src = _source(p, plan, view, c, t, k, N, side.itemsize)[c.g0 : c.g1]
                            yield src, side.view(base, c, k)
                        else:  # the last block, filled in part: at most one rectangle per token digit
                            yield from self._partial(side, view, c, t, base, r)

    def _partial(self, side: _BlockSide, view, c: _Copy, t: int, base: int, r: int):
        """Pairs covering tokens ``[0, r)`` of one block (``amx``: whole 16-token tiles, then the rest of
        one tile); elements move one at a time here."""
        m = self.models[c.kv]
        rel = c.rel // side.itemsize
        left, elem = r, base + rel
        for i, stride in enumerate(m.n_strides):
            inner = math.prod(m.n_sizes[i + 1 :])
            q = left // inner
            if q:
                shape = (c.g1 - c.g0, q, *m.n_sizes[i + 1 :], *m.d_sizes)
                src = view[c.g0 : c.g1, c.kv, t : t + q * inner].reshape(shape)
                strides = (m.stride_h, stride, *m.n_strides[i + 1 :], *m.d_strides)
                yield src, side.raw(elem, shape, strides)
            t, elem, left = t + q * inner, elem + q * stride, left - q * inner
        assert left == 0

    def load_layer(self, kv_layer: torch.Tensor, layer: int, pieces: Sequence[Piece]) -> None:
        copy = _copy_np if kv_layer.device.type == "cpu" else copy_block
        for src, dst in self._pairs(kv_layer, layer, pieces):
            copy(dst, src)

    def save_layer(self, kv_layer: torch.Tensor, layer: int, pieces: Sequence[Piece]) -> None:
        N = self.layout.block_tokens
        if any(p.t0 % N or (p.t1 - p.t0) % N for p in pieces):
            raise ValueError("stores move whole blocks only")
        copy = _copy_np if kv_layer.device.type == "cpu" else copy_block
        for dst, src in self._pairs(kv_layer, layer, pieces):
            copy(dst, src)


def _copy_np(dst, src) -> None:
    """``copy_block`` for numpy arrays, minus its dispatch: the copier makes thousands per load."""
    np.copyto(dst, src, casting="no")


def _runs(p: Piece, N: int) -> list[tuple[int, int, int, int]]:
    """``(first block's index in the piece, its id, blocks, tokens in the last)`` per run of consecutive
    whole blocks of ``p``; a block filled in part is a run of its own (with ``tokens < N``)."""
    out: list[list[int]] = []
    n = p.t1 - p.t0
    for i, b in enumerate(p.block_ids):
        r = min(N, n - i * N)
        if r == N and out and out[-1][3] == N and out[-1][1] + out[-1][2] == b:
            out[-1][2] += 1
        else:
            out.append([i, b, 1, r])
    return [tuple(x) for x in out]


def _source(p: Piece, plan, view, c: _Copy, t: int, k: int, N: int, itemsize: int):
    """``view``'s half ``c.kv`` of tokens ``[t, t + k N)`` as ``[segments, k, *c.inner]`` in units of
    ``c.w`` elements, made once per piece, run and copy shape (a load slices it for every layer; the
    piece's ``sources`` also keeps its runs, under the block size)."""
    cache = p.sources
    key = (plan.head_class, c.kv, c.w, t, k, c.inner)
    got = cache.get(key)
    if got is None:
        part = view[:, c.kv, t : t + k * N]
        if c.w > 1:
            part = part.view(np.dtype(_NP_WIDE[itemsize * c.w])) if isinstance(part, np.ndarray) else part.view(
                _TORCH_WIDE[itemsize * c.w])
        got = cache[key] = part.reshape(part.shape[0], k, *c.inner)
    return got


_TORCH_WIDE = {2: torch.int16, 4: torch.int32, 8: torch.int64}


class _BlockSide:
    """vLLM's blocks of one layer as views at element offsets: numpy arrays over the layer's storage on
    the CPU (a view is one constructor call), ``torch.as_strided`` elsewhere."""

    def __init__(self, kv_layer: torch.Tensor) -> None:
        self.itemsize = kv_layer.element_size()
        self.block_stride = kv_layer.stride(0)
        self.offset = kv_layer.storage_offset()
        st = kv_layer.untyped_storage()
        self._flat = torch.empty(0, dtype=kv_layer.dtype, device=kv_layer.device).set_(
            st, 0, (st.nbytes() // self.itemsize,))
        self._cpu = kv_layer.device.type == "cpu"
        self._np = numpy_view(self._flat) if self._cpu else None
        self._wide: dict[int, object] = {}

    def elem(self, block: int) -> int:
        return self.offset + block * self.block_stride

    def _base(self, w: int):
        got = self._wide.get(w)
        if got is None:
            if self._cpu:
                got = self._np if w == 1 else self._np.view(np.dtype(_NP_WIDE[self.itemsize * w]))
            else:
                got = self._flat if w == 1 else self._flat.view(_TORCH_WIDE[self.itemsize * w])
            self._wide[w] = got
        return got

    def view(self, elem: int, c: _Copy, k: int):
        """Blocks ``[elem, ...)``: ``k`` of them, as copy ``c``'s block side."""
        shape = (c.g1 - c.g0, k, *c.inner)
        unit = self.itemsize * c.w
        strides = (c.strides[0], self.block_stride * self.itemsize, *c.strides[1:])
        start = elem * self.itemsize + c.rel
        base = self._base(c.w)
        if self._cpu:
            return np.ndarray(shape, base.dtype, base, start, strides)
        return torch.as_strided(base, shape, tuple(x // unit for x in strides), start // unit)

    def raw(self, elem: int, shape: tuple[int, ...], strides: tuple[int, ...]):
        """Elements at ``elem + sum(i * stride)``, one at a time (strides in elements)."""
        if self._cpu:
            return np.ndarray(shape, self._np.dtype, self._np, elem * self.itemsize,
                              tuple(x * self.itemsize for x in strides))
        return torch.as_strided(self._flat, shape, strides, elem)
