"""Copies between leased or reserved entries and an engine's paged KV, with the gather/scatter kernels.

The engine's KV is one tensor per layer in a paged layout, ``kv_layers[l]: [num_blocks, H, N, 2D]``
(vLLM's GPU layouts ``LBNHC`` / ``LBHNC``: ``kvd.gpu_kernels.gather_scatter``); entry ``s`` of the
transaction holds its T tokens in blocks ``block_ids[s]`` (``T / N`` of them, in token order).

Where an extent lies decides the copy (``kvd.client.transfer`` hands out the views):

- on the engine's device (the daemon's GPU pool, ``kvd.tiers.gpu``): the kernels read or write the
  pool in place, device to device, one launch for every layer, entry and head class at once;
- in the arena, for a GPU engine: the kernels read and write the pinned (``cudaHostRegister``-ed) arena
  in place, over PCIe (zero copy: measured 41-49 GB/s into an H100, 0.80-0.90x a pinned cudaMemcpy,
  where staging each extent through a device buffer first gave 24-35 GB/s: docs/gpu.md); an arena that is not
  pinned, or ``zero_copy=False``, is staged through a device buffer, ``staging_bytes`` at a time;
- everything on the CPU (the engine's KV too): the kernels' torch references, or the Triton
  interpreter, on the arena in place.

Both functions return when every copy is done (the lease may be released, the reservation committed).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import TYPE_CHECKING

from kvd.gpu_kernels import gather_segments, gather_segments_ref, scatter_segments, scatter_segments_ref
from kvd.gpu_kernels.gather_scatter import LayersNotAlike

if TYPE_CHECKING:
    import torch

    from kvd.client.views import EntryView
    from kvd.core.extents import ExtentPlan

STAGING_BYTES = 256 << 20  # device staging per batch of arena extents: bounds the memory a load takes


def load_paged(entries: Sequence[EntryView], kv_layers: Sequence[torch.Tensor], block_ids: torch.Tensor, *,
               layout: str, zero_copy: bool = True, staging_bytes: int = STAGING_BYTES, use_triton: bool = True,
               aligned: bool = True) -> None:
    """Scatter every extent of ``entries`` into ``kv_layers`` (entry ``s`` into blocks ``block_ids[s]``).
    ``aligned``: let the kernels use 16-byte vectors where every segment starts on 16 elements."""
    kernel = scatter_segments if use_triton else scatter_segments_ref
    _move(entries, kv_layers, block_ids, layout, zero_copy, staging_bytes, kernel, aligned, to_kv=True)


def store_paged(entries: Sequence[EntryView], kv_layers: Sequence[torch.Tensor], block_ids: torch.Tensor, *,
                layout: str, zero_copy: bool = True, staging_bytes: int = STAGING_BYTES, use_triton: bool = True,
                aligned: bool = True) -> None:
    """Gather every extent of ``entries`` out of ``kv_layers`` (entry ``s`` from blocks ``block_ids[s]``)."""
    kernel = gather_segments if use_triton else gather_segments_ref
    _move(entries, kv_layers, block_ids, layout, zero_copy, staging_bytes, kernel, aligned, to_kv=False)


def _move(entries, kv_layers, block_ids, layout, zero_copy, staging_bytes, kernel, aligned, *, to_kv: bool) -> None:
    import torch

    if not entries:
        return
    if len({e.num_tokens for e in entries}) != 1 or block_ids.shape[0] != len(entries):
        raise ValueError(f"{len(entries)} entries of {sorted({e.num_tokens for e in entries})} tokens with "
                         f"block_ids {tuple(block_ids.shape)}: one length, one row of blocks per entry")
    device = kv_layers[0].device
    # In place: (buffer, the classes an entry has there) -> [(entry, [ExtentView per class])]. Every
    # class and layer of a group goes in one launch (the kernel takes a (layer, head) list and an offset
    # per segment): a load of two classes was 64 launches for a 32-layer model, then 32, and launches,
    # not bytes, set its time (H100: 283-384 GB/s, then 811, now 1,169, the kernel alone 1,451; docs/gpu.md).
    # The walk asks no tensor anything (each extent knows its buffer and offset): it runs once per
    # extent of every load.
    direct: dict[tuple, list[tuple[int, list]]] = {}
    staged: dict[str, list[tuple[int, ExtentPlan, torch.Tensor]]] = {}
    in_place: dict[int, bool] = {}  # buffer -> the kernels can read and write it where it is
    pinned_ok = zero_copy and device.type == "cuda"
    for s, e in enumerate(entries):
        here: dict[int, list] = {}
        for x in e.extents:
            ok = in_place.get(x.buffer)
            if ok is None:
                ok = in_place[x.buffer] = x.view.device == device or (pinned_ok and x.view.is_pinned())
            if ok:
                if x.buffer in here:
                    here[x.buffer].append(x)
                else:
                    here[x.buffer] = [x]
            else:
                staged.setdefault(x.plan.head_class, []).append((s, x.plan, x.view))
        for buffer, xs in here.items():
            key = (buffer, *[x.plan.head_class for x in xs])
            if key in direct:
                direct[key].append((s, xs))
            else:
                direct[key] = [(s, xs)]
    for group in direct.values():
        buf = _flat(group[0][1][0].view)
        _launch(kernel, kv_layers, block_ids, layout, buf,
                [(s, [(x.plan, x.offset) for x in xs]) for s, xs in group], aligned)
    for rows in staged.values():
        for batch in _batches(rows, rows[0][1].nbytes, staging_bytes):
            _staged(kernel, kv_layers, block_ids, layout, batch, device, aligned, to_kv=to_kv)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _launch(kernel, kv_layers, block_ids, layout: str, buf, rows: list[tuple[int, list[tuple[ExtentPlan, int]]]],
            aligned: bool) -> None:
    """One kernel launch for every layer, entry and class of ``rows``: ``(entry, [(plan, base)])``, the
    same classes in the same order for each entry, extent ``plan`` starting at element ``base`` of
    ``buf``. Worked example: segment ``(layer l, head h)`` is number ``i`` of its extent
    (``plan.heads[i] == (l, h)``), so it starts ``base + i * 2 * T * D`` elements into ``buf``; the
    launch takes every segment's (layer, head) and its offset per entry. Layers that one launch cannot
    reach together (different shapes, strides or devices) get a launch each."""
    import numpy as np
    import torch

    device = kv_layers[0].device
    plans = tuple(plan for plan, _ in rows[0][1])
    seg = 2 * plans[0].num_tokens * plans[0].head_dim  # elements of one segment: K[T, D] then V[T, D]
    bases = np.array([[b for _, b in xs] for _, xs in rows], dtype=np.int64)  # [entries, classes]
    aligned = aligned and seg % 16 == 0 and not (bases % 16).any()  # checked here, promised to the kernel
    layers, heads_d, cls_d, idx_d = _segments(plans, device)
    if not len(layers):
        return
    # [entries, segments], computed where the kernel reads it: only the small bases cross to the device
    offs = torch.from_numpy(bases).to(device)[:, cls_d] + idx_d[None, :] * seg
    which = [s for s, _ in rows]
    ids = block_ids if which == list(range(len(block_ids))) else block_ids[which]
    ids = ids.to(device)
    try:
        kernel(list(kv_layers), ids, heads_d, buf, offs, layout=layout, num_tokens=plans[0].num_tokens,
               aligned=aligned, layer_ids=torch.from_numpy(layers))
        return
    except LayersNotAlike:
        pass  # layers one launch cannot reach together: a launch each
    for layer, kv_layer in enumerate(kv_layers):
        c0, c1 = np.searchsorted(layers, [layer, layer + 1])  # a layer's segments are consecutive
        if c1 > c0:
            kernel(kv_layer, ids, heads_d[c0:c1], buf, offs[:, c0:c1], layout=layout,
                   num_tokens=plans[0].num_tokens, aligned=aligned)


@functools.lru_cache(maxsize=64)
def _segments(plans: tuple[ExtentPlan, ...], device):
    """Every segment of ``plans``, grouped by layer (the sort is stable): its layer as a numpy array
    (the host checks it), then its KV head, class (index into ``plans``) and index in its extent as
    tensors on ``device``. The same for every load of one model's entries, so built once (the lists
    took ~0.3 ms a load)."""
    import numpy as np
    import torch

    segs = sorted(((lyr, h, c, i) for c, plan in enumerate(plans) for i, (lyr, h) in enumerate(plan.heads)),
                  key=lambda x: x[0])
    cols = np.array(segs, dtype=np.int64).reshape(-1, 4)
    layers, heads, cls, idx = (np.ascontiguousarray(cols[:, i]) for i in range(4))
    return (layers, *(torch.from_numpy(a).to(device) for a in (heads, cls, idx)))


def _staged(kernel, kv_layers, block_ids, layout: str, batch, device, aligned: bool, *, to_kv: bool) -> None:
    """Arena extents through a device buffer: one copy per extent each way, the kernels on the device."""
    import torch

    plan = batch[0][1]
    n = plan.nbytes // plan.dtype_bytes  # elements of one extent
    stage = torch.empty(len(batch) * n, dtype=batch[0][2].dtype, device=device)
    if to_kv:
        for i, (_, _, view) in enumerate(batch):
            stage[i * n : (i + 1) * n].copy_(view.reshape(-1), non_blocking=True)
    _launch(kernel, kv_layers, block_ids, layout, stage, [(s, [(plan, i * n)]) for i, (s, _, _) in enumerate(batch)],
            aligned)
    if not to_kv:
        for i, (_, _, view) in enumerate(batch):
            view.reshape(-1).copy_(stage[i * n : (i + 1) * n])


def _batches(items: list, nbytes: int, budget: int):
    per = max(1, budget // max(nbytes, 1))
    for i in range(0, len(items), per):
        yield items[i : i + per]


def _flat(view: torch.Tensor) -> torch.Tensor:
    """The whole storage behind ``view`` as a 1-D tensor of its dtype (the pool or the arena)."""
    import torch

    st = view.untyped_storage()
    return torch.empty(0, dtype=view.dtype, device=view.device).set_(st, 0, (st.nbytes() // view.element_size(),))
