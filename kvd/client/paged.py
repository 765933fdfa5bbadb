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

from collections.abc import Sequence
from typing import TYPE_CHECKING

from kvd.gpu_kernels import gather_segments, gather_segments_ref, scatter_segments, scatter_segments_ref

if TYPE_CHECKING:
    import torch

    from kvd.client.transfer import EntryView
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
    # In place: (storage, the classes an entry has there) -> [(entry, [(plan, view) per class])]. Every
    # class and layer of a group goes in one launch (the kernel takes a (layer, head) list and an offset
    # per segment): a load of two classes was 64 launches for a 32-layer model, then 32, and launches,
    # not bytes, set its time (H100: 283-384 GB/s, then 811, the kernel alone 1360; docs/gpu.md).
    direct: dict[tuple[int, tuple[str, ...]], list[tuple[int, list]]] = {}
    staged: dict[str, list[tuple[int, ExtentPlan, torch.Tensor]]] = {}
    for s, e in enumerate(entries):
        here: dict[int, list] = {}
        for plan, view in e.extents:
            if view.device == device or (zero_copy and device.type == "cuda" and view.is_pinned()):
                here.setdefault(view.untyped_storage().data_ptr(), []).append((plan, view))
            else:
                staged.setdefault(plan.head_class, []).append((s, plan, view))
        for ptr, xs in here.items():
            direct.setdefault((ptr, tuple(p.head_class for p, _ in xs)), []).append((s, xs))
    for group in direct.values():
        buf = _flat(group[0][1][0][1])
        _launch(kernel, kv_layers, block_ids, layout, buf,
                [(s, [(plan, v.storage_offset()) for plan, v in xs]) for s, xs in group], aligned)
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
    import torch

    device = kv_layers[0].device
    plans = [plan for plan, _ in rows[0][1]]
    seg = 2 * plans[0].num_tokens * plans[0].head_dim  # elements of one segment: K[T, D] then V[T, D]
    bases = torch.tensor([[b for _, b in xs] for _, xs in rows], dtype=torch.int64)  # [entries, classes]
    aligned = aligned and seg % 16 == 0 and bool((bases % 16 == 0).all())  # checked here, promised to the kernel
    # every segment as (layer, head, class, index in its extent), grouped by layer (the sort is stable)
    segs = sorted(((lyr, h, c, i) for c, plan in enumerate(plans) for i, (lyr, h) in enumerate(plan.heads)),
                  key=lambda x: x[0])
    if not segs:
        return
    layers, heads, cls, idx = (list(col) for col in zip(*segs))
    offs = (bases[:, cls] + torch.tensor(idx, dtype=torch.int64)[None, :] * seg).to(device)  # [entries, segments]
    heads_d = torch.tensor(heads, dtype=torch.int64).to(device)
    ids = block_ids[[s for s, _ in rows]].to(device)
    layer_ids = torch.tensor(layers, dtype=torch.int64)
    if _alike(kv_layers):
        kernel(list(kv_layers), ids, heads_d, buf, offs, layout=layout, num_tokens=plans[0].num_tokens,
               aligned=aligned, layer_ids=layer_ids)
        return
    for layer, kv_layer in enumerate(kv_layers):
        sel = (layer_ids == layer).nonzero().flatten()
        if len(sel):
            c0, c1 = int(sel[0]), int(sel[-1]) + 1  # a layer's segments are consecutive
            kernel(kv_layer, ids, heads_d[c0:c1], buf, offs[:, c0:c1].contiguous(), layout=layout,
                   num_tokens=plans[0].num_tokens, aligned=aligned)


def _alike(kv_layers) -> bool:
    """Every layer tensor of one shape, strides, dtype and device, element-aligned to each other."""
    first = kv_layers[0]
    size = first.element_size()
    return all((t.shape, t.stride(), t.dtype, t.device) == (first.shape, first.stride(), first.dtype, first.device)
               and (t.data_ptr() - first.data_ptr()) % size == 0 for t in kv_layers)


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
