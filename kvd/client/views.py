"""An entry's extents as tensors, and the copies between them and an engine's KV.

A lease or a reservation (``kvd.client.transfer``) hands out each usable entry as an ``EntryView``:
per head class, a tensor ``[num_segments, 2, T, D]`` that is a view of the mapped arena (or of the
daemon's GPU pool), never a copy. ``read_into`` / ``write_from`` move its tokens to or from a KV tensor
``[L, 2, H, T, D]``; ``copy_block`` is the one strided copy they (and the vLLM copiers) use.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

from kvd.client.handle import ModelHandle
from kvd.core import protocol as P
from kvd.core.errors import DaemonUnavailable, HeadMapError
from kvd.core.extents import ExtentPlan

if TYPE_CHECKING:
    import torch


def numpy_view(t):
    """A numpy view of a CPU tensor of any dtype, as same-size integers (numpy has no bf16); strides kept."""
    import torch

    return t.view({1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]).numpy()


def copy_block(dst, src, *, non_blocking: bool = True) -> None:
    """``dst[...] = src`` for two equal-shape (strided) tensors of one dtype, or two numpy arrays. On the CPU through numpy,
    on the calling thread: measured 5-15% faster than torch's strided copy here, and it never waits for
    torch's OpenMP pool. vLLM pins those threads to cores; when another process holds one of them,
    every large torch copy waits for it (measured: 10x slower loads on a busy 2-core machine), and vLLM
    forbids changing the thread count in its workers."""
    import numpy as np

    if isinstance(dst, np.ndarray):  # numpy views already (kvd.connectors.vllm.strided's pass A)
        np.copyto(dst, src, casting="no")
    elif dst.device.type == "cpu" and src.device.type == "cpu":
        np.copyto(numpy_view(dst), numpy_view(src), casting="no")
    else:
        dst.copy_(src, non_blocking=non_blocking)


def extent_to_kv_views(plan: ExtentPlan, extent, kv, s0: int, num_tokens: int | None = None):
    """Pairs ``(extent part, kv part)`` of equal shape ``[layers, heads, 2, n, D]``, one per block of
    the plan: copying each pair moves the entry's first ``num_tokens`` tokens (default: all) that the
    extent holds to or from ``kv[L, 2, H, s0:, D]``. A trimmed extent holds the entry's tokens
    ``plan.span``: they go to ``s0 + lo`` on, and the rest of ``kv`` is not touched.

    ``extent`` and ``kv`` are both torch tensors or both numpy arrays (``host_arrays``): the pairs are
    views either way, never copies (the numpy reshape is told never to copy: it would raise)."""
    t, d = plan.num_tokens, plan.head_dim
    lo = plan.first_token
    n = t if num_tokens is None else max(0, min(t, num_tokens - lo))
    host = not hasattr(kv, "permute")  # numpy
    for l0, l1, h0, h1, seg0 in plan.blocks:
        rows, shape = extent[seg0 : seg0 + (l1 - l0) * (h1 - h0)], (l1 - l0, h1 - h0, 2, t, d)
        part = _np_reshape(rows, shape) if host else rows.view(shape)
        src = kv[l0:l1, :, h0:h1, s0 + lo : s0 + lo + n]
        yield part[..., :n, :], (src.transpose(0, 2, 1, 3, 4) if host else src.permute(0, 2, 1, 3, 4))


def _np_reshape(a, shape):
    import numpy as np

    return np.reshape(a, shape, copy=False)


def host_arrays(view, kv):
    """``(view, kv)`` as numpy views when both are in host memory, else as they are. Slicing numpy
    views costs a few µs less per block than torch's: the store copy rose from 0.72-0.76 to 0.80-0.86
    of a memcpy of the same bytes, alternated on one VM (``benchmarks/results/control_plane.copy_ab.json``)."""
    if view.device.type == "cpu" and kv.device.type == "cpu":
        return numpy_view(view), numpy_view(kv)
    return view, kv


class ExtentView(NamedTuple):
    plan: ExtentPlan
    view: torch.Tensor  # [num_segments, 2, T, D] in the KV dtype, a view of the mapped arena or GPU pool
    # Where ``view`` starts, known from the daemon's answer without asking the tensor (the GPU copies
    # group a load's extents by buffer and pass their offsets to one kernel launch, kvd.client.paged):
    buffer: int = 0  # the address of the whole arena or pool the view lies in
    offset: int = 0  # elements from the start of that buffer's storage
    checksum: str | None = None  # the daemon's xxh3-64 of the extent's bytes (host extents; None: none kept)


@dataclass(slots=True, frozen=True)
class EntryView:
    """One entry's extents in the mapped arena (per head class, in the daemon's order)."""

    hash: str
    num_tokens: int  # tokens the extents hold
    extents: tuple[ExtentView, ...]

    def read_into(self, kv, start: int = 0, num_tokens: int | None = None) -> None:
        """Copy the entry's first ``num_tokens`` (default all) tokens into ``kv[L, 2, H, start:, D]``.
        Synchronous, also to a GPU: the lease may be released right after."""
        for plan, view, *_ in self.extents:
            src, dst_kv = host_arrays(view, _same_dtype(view, kv))
            for part, dst in extent_to_kv_views(plan, src, dst_kv, start, num_tokens):
                copy_block(_same_shape(dst, part), part, non_blocking=False)

    def write_from(self, kv, start: int = 0) -> None:
        """Copy ``kv[L, 2, H, start:start+T, D]`` into the entry's extents (all its tokens)."""
        for plan, view, *_ in self.extents:
            dst, src_kv = host_arrays(view, _same_dtype(view, kv))
            for part, src in extent_to_kv_views(plan, dst, src_kv, start):
                copy_block(part, _same_shape(src, part), non_blocking=False)


def _same_dtype(view, kv):
    """``kv``, if it holds the extent's dtype: host copies go through same-size integer views, which would
    move another dtype's bits as they are (float16 as bfloat16), and torch's would convert."""
    if kv.dtype != view.dtype:
        raise ValueError(f"kv dtype {kv.dtype} is not the entry's KV dtype {view.dtype}")
    return kv


def _same_shape(kv_part, part):
    """``kv_part``, if it has the extent part's shape: copies broadcast, so a kv of one token (or head)
    there would fill every token (head) of the extent with it."""
    if tuple(kv_part.shape) != tuple(part.shape):
        raise ValueError(f"kv part of shape {tuple(kv_part.shape)} for an extent part of {tuple(part.shape)}: "
                         "kv must be [layers, 2, kv heads, tokens, head_dim] and hold the entry's tokens from start")
    return kv_part


def answer_plan(plans: dict[str, ExtentPlan], x: P.ExtentInfo) -> ExtentPlan:
    """The layout of an answered extent: its class's plan, trimmed to ``x.tokens`` when the daemon
    kept only those (``ValueError`` if they are not a span of it). ``HeadMapError`` when the daemon
    lays the extent out by another head map than this client's (another engine registered the model
    with another map since): its bytes would be read or written as other heads."""
    plan = plans.get(x.head_class)
    if plan is None or (x.layout is not None and x.layout != plan.layout):
        raise HeadMapError(f"the daemon lays out extent {x.head_class!r} by another head map than this client "
                           "registered (another engine registered the model with another map): not read or "
                           "written; give every engine of this model the same head map, or register a new revision")
    return plan.trim(*x.tokens) if x.tokens is not None else plan


def entry_views(h: ModelHandle, arena_id: str, key: str, extents: Sequence[P.ExtentInfo], num_tokens: int,
                gpu_pool: P.GpuPoolInfo | None) -> EntryView:
    """Entry ``key``'s extents as tensors: views of the mapped arena, or of the GPU pool."""
    plans = h.plans(num_tokens)
    return EntryView(key, num_tokens, tuple(_extent(h, arena_id, x, answer_plan(plans, x), gpu_pool)
                                            for x in extents))


def _extent(h: ModelHandle, arena_id: str, x: P.ExtentInfo, plan: ExtentPlan,
            gpu_pool: P.GpuPoolInfo | None) -> ExtentView:
    if x.nbytes != plan.nbytes:  # the view spans plan.nbytes: past the end of a smaller slot run
        raise HeadMapError(f"the daemon answered extent {x.head_class!r} of {x.nbytes} bytes where this client's "
                           f"layout has {plan.nbytes}: not read or written")
    if x.tier != "gpu":
        arena = h.client.arena(arena_id)
        base = arena.torch_bytes()  # uint8: its storage offset is in bytes
        view = arena.torch_extent(x, plan, h.spec.kv_dtype)
    else:
        if h.gpu is None or gpu_pool is None:
            raise DaemonUnavailable("the daemon answered an extent in its GPU pool without the pool, or to a "
                                    "handle that does not map it")
        base = h.gpu.pool(gpu_pool)
        view = h.gpu.extent(gpu_pool, x, plan, h.spec.kv_dtype)
    start = base.storage_offset() * base.element_size() + x.offset  # bytes from the storage's start
    return ExtentView(plan, view, base.data_ptr() - base.storage_offset() * base.element_size(),
                      start // plan.dtype_bytes, x.checksum if x.tier != "gpu" else None)
