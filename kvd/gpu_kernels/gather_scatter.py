"""Gather / scatter between an engine's paged KV layout and kvd's contiguous per-head segments.

A **segment** of (entry, layer, KV head) is ``K[T, D]`` immediately followed by ``V[T, D]``, row-major,
in the KV dtype. An entry's T tokens live in the engine's blocks ``block_ids[s, 0..]`` (N tokens each,
not contiguous, not sorted; token t is in block ``block_ids[s, t // N]`` at slot ``t % N``).

Shapes (S entries, nb blocks per entry, nh heads moved, N tokens per block, D head dim):

    kv_layer     [num_blocks, H, N, 2D]  one layer's KV as vLLM hands it to ``register_kv_caches``
                                         (a 4-D view whose strides follow the layout)
    block_ids    [S, nb] or [nb]         int32/int64
    head_ids     [nh]                    int32/int64 KV heads to move
    offsets      [S, nh] or [nh]         int64 element offsets into ``buf`` of segment (s, head_ids[j])
    buf          1-D                     dtype of kv_layer; may be pinned host memory when kv_layer is
                                         on the GPU: the kernel then reads or writes it over PCIe
                                         directly (zero copy), so segments may sit anywhere in the arena
    num_tokens   T <= nb * N             tokens per entry (a partial last block); default nb * N
    aligned      bool                    the caller promises every offset is a multiple of 16 elements:
                                         the kernel may then move ``buf`` in 16-byte vectors (kvd's
                                         extents start on slot boundaries, and segments are 2 T D long)
    layer_ids    [nh] or None, host      several layers in one launch: ``kv_layer`` is then the list of
                                         every layer's tensor (same shape, strides, dtype, device) and
                                         segment j is head ``head_ids[j]`` of layer ``layer_ids[j]``

Layouts (``layout``), vLLM 0.32 (see shared/reference/ENGINES.md 1.5):

    "LBNHC"     GPU default: per layer physically [B, N, H, 2D]; K = C[..., :D], V = C[..., D:]
    "LBHNC"     GPU: physically [B, H, N, 2D]; each (block, head) a contiguous [N, 2D] run
    "LBHNC_KT"  CPU backend (ISA ``vec``): each (block, head) run of 2 N D elements is K stored
                transposed [D, N] followed by V [N, D]; kv_layer must be the contiguous 4-D view

For the two GPU layouts everything comes from the strides, so any stride permutation of
``[B, H, N, 2D]`` works; the name is checked against the strides to catch a wrong layout early.
Gather then scatter restores every moved element bit for bit.

One launch for many layers: an engine allocates each layer's KV as its own tensor, so the kernel takes
the lowest-addressed layer as its base and, per segment, the element distance from it to the
segment's layer (``seg_base``). A load of a 32-layer model was 32 launches whose host time (5.3 ms
against 3.2 ms of copying on an H100, docs/gpu.md) set its speed; it is one launch now.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
import triton
import triton.language as tl

from kvd.gpu_kernels._launch import check_index, is_interpreter, next_pow2

LAYOUTS = ("LBNHC", "LBHNC", "LBHNC_KT")


@triton.jit
def _gather_scatter_kernel(
    # pointers
    kv_ptr, buf_ptr, block_ids_ptr, head_ids_ptr, seg_base_ptr, offsets_ptr,
    # sizes
    num_tokens,
    # strides
    stride_kvb, stride_kvh, stride_kvn, stride_bis, stride_offs,
    # meta-parameters
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_TOKENS: tl.constexpr, BLOCK_T: tl.constexpr,
    K_TRANSPOSED: tl.constexpr, TO_BUF: tl.constexpr, ALIGNED: tl.constexpr,
):
    pid_t = tl.program_id(0)
    pid_h = tl.program_id(1)
    pid_s = tl.program_id(2)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, BLOCK_D)
    mask_t = offs_t < num_tokens
    mask = mask_t[:, None] & (offs_d < HEAD_DIM)[None, :]

    # -- engine side: token t of entry s is slot t % N of block block_ids[s, t // N] ----------------
    head = tl.load(head_ids_ptr + pid_h).to(tl.int64)
    layer_base = tl.load(seg_base_ptr + pid_h)  # elements from kv_ptr to this segment's layer
    block = tl.load(block_ids_ptr + tl.cast(pid_s, tl.int64) * stride_bis + offs_t // BLOCK_TOKENS,
                    mask=mask_t, other=0).to(tl.int64)
    slot = (offs_t % BLOCK_TOKENS).to(tl.int64)
    run = layer_base + block * stride_kvb + head * stride_kvh  # start of the (block, head) cell
    if K_TRANSPOSED:
        # CPU run [2N, D]: K^T [D, N] then V [N, D]
        k_offs = run[:, None] + offs_d[None, :].to(tl.int64) * BLOCK_TOKENS + slot[:, None]
        v_offs = run[:, None] + BLOCK_TOKENS * HEAD_DIM + slot[:, None] * HEAD_DIM + offs_d[None, :]
    else:
        k_offs = (run + slot * stride_kvn)[:, None] + offs_d[None, :]
        v_offs = k_offs + HEAD_DIM  # C = [K | V] of one (token, head)

    # -- kvd side: segment = K[T, D] then V[T, D] at offsets[s, j] --------------------------------
    seg = tl.load(offsets_ptr + tl.cast(pid_s, tl.int64) * stride_offs + pid_h)
    if ALIGNED:  # offsets loaded at run time: without the hint no access to buf is vectorized
        seg = tl.multiple_of(seg, 16)
    bk_offs = seg + offs_t.to(tl.int64)[:, None] * HEAD_DIM + offs_d[None, :]
    bv_offs = bk_offs + tl.cast(num_tokens, tl.int64) * HEAD_DIM

    if TO_BUF:
        tl.store(buf_ptr + bk_offs, tl.load(kv_ptr + k_offs, mask=mask), mask=mask)
        tl.store(buf_ptr + bv_offs, tl.load(kv_ptr + v_offs, mask=mask), mask=mask)
    else:
        tl.store(kv_ptr + k_offs, tl.load(buf_ptr + bk_offs, mask=mask), mask=mask)
        tl.store(kv_ptr + v_offs, tl.load(buf_ptr + bv_offs, mask=mask), mask=mask)


class LayersNotAlike(ValueError):
    """The layers given for one launch differ in shape, strides, dtype or device, or are not
    element-aligned to each other: the caller launches per layer instead."""


def _layers(kv_layer, head_ids, layer_ids):
    """``(base layer, every layer or None, seg_base [nh] int64 on the device or None)``. One layer:
    itself. Several (``layer_ids``): the lowest-addressed layer, the list, and each segment's distance
    from the base in elements."""
    if layer_ids is None:
        if not isinstance(kv_layer, torch.Tensor):
            raise ValueError("kv_layer is a list of layers: pass layer_ids, the layer of each head_ids entry")
        return kv_layer, None, None
    layers = list(kv_layer)
    check_index("layer_ids", layer_ids, 1, "[num_heads]")
    if layer_ids.shape != head_ids.shape:
        raise ValueError(f"layer_ids {tuple(layer_ids.shape)} must match head_ids {tuple(head_ids.shape)}")
    if not layers:
        raise ValueError("kv_layer: an empty list of layers")
    first = layers[0]
    like = (first.shape, first.stride(), first.dtype, first.device)
    for i, t in enumerate(layers):
        if (t.shape, t.stride(), t.dtype, t.device) != like:
            raise LayersNotAlike(f"layer {i} is {tuple(t.shape)} {t.stride()} {t.dtype} {t.device}, layer 0 "
                                 f"{tuple(first.shape)} {first.stride()} {first.dtype} {first.device}: one launch "
                                 "needs every layer alike")
    if layer_ids.device.type != "cpu":
        raise ValueError(f"layer_ids must be on the host (the launcher checks them), got {layer_ids.device}")
    ids = layer_ids.numpy()
    if len(ids) and not 0 <= ids.min() <= ids.max() < len(layers):
        raise ValueError(f"layer_ids must be in [0, {len(layers)}), got {ids.min()}..{ids.max()}")
    ptrs = np.array([t.data_ptr() for t in layers], dtype=np.int64)
    size = first.element_size()
    dist = ptrs - ptrs.min()
    if (dist % size).any():
        raise LayersNotAlike(f"layer tensors are not {size}-byte aligned to each other: one launch cannot reach them")
    seg_base = torch.from_numpy(dist[ids] // size).to(first.device)
    return layers[int(ptrs.argmin())], layers, seg_base


@functools.lru_cache(maxsize=32)
def _zeros(n: int, device: torch.device) -> torch.Tensor:
    """``seg_base`` of a one-layer launch (never written): one allocation per size, not per launch
    (the vLLM connector launches once per layer and head class)."""
    return torch.zeros(n, dtype=torch.int64, device=device)


def _normalize(kv_layer, block_ids, head_ids, buf, offsets, layout, num_tokens):
    """Checks; returns (block_ids [S, nb], offsets [S, nh], T)."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout {layout!r} unknown; expected one of {LAYOUTS}")
    if kv_layer.dim() != 4 or kv_layer.shape[3] % 2:
        raise ValueError(f"kv_layer must be [num_blocks, H, N, 2D], got {tuple(kv_layer.shape)}")
    nblk, H, N, C = kv_layer.shape
    sb, sh, sn, sc = kv_layer.stride()
    if sc != 1:
        raise ValueError(f"kv_layer's last dim must be contiguous, strides {kv_layer.stride()}")
    expected = {"LBNHC": sn > sh, "LBHNC": sh > sn, "LBHNC_KT": kv_layer.is_contiguous()}[layout]
    if H > 1 and N > 1 and not expected:
        raise ValueError(f"kv_layer strides {kv_layer.stride()} for shape {tuple(kv_layer.shape)} do not "
                         f"match layout {layout}; read the layout from cache_config.kv_cache_layout")
    if block_ids.dim() == 1:
        block_ids = block_ids[None, :]
    if offsets.dim() == 1:
        offsets = offsets[None, :]
    check_index("block_ids", block_ids, 2, "[S, blocks per entry] or [blocks]")
    check_index("head_ids", head_ids, 1, "[num_heads]")
    if offsets.dtype != torch.int64 or offsets.dim() != 2 or offsets.stride(-1) != 1:
        raise ValueError(f"offsets must be int64 [S, num_heads] or [num_heads], got {offsets.dtype} "
                         f"{tuple(offsets.shape)}")
    S, nb = block_ids.shape
    if offsets.shape != (S, head_ids.shape[0]):
        raise ValueError(f"offsets {tuple(offsets.shape)} must be [S={S}, num_heads={head_ids.shape[0]}]")
    T = nb * N if num_tokens is None else int(num_tokens)
    if not 0 <= T <= nb * N:
        raise ValueError(f"num_tokens={T} must be in [0, {nb} blocks x {N} tokens]")
    if buf.dim() != 1 or buf.dtype != kv_layer.dtype:
        raise ValueError(f"buf must be 1-D {kv_layer.dtype}, got {buf.dtype} {tuple(buf.shape)}")
    on_gpu = kv_layer.device.type == "cuda"
    for name, t in (("block_ids", block_ids), ("head_ids", head_ids), ("offsets", offsets)):
        if t.device != kv_layer.device:
            raise ValueError(f"{name} on {t.device}, kv_layer on {kv_layer.device}")
    if buf.device != kv_layer.device and not (on_gpu and buf.device.type == "cpu" and buf.is_pinned()):
        raise ValueError(f"buf on {buf.device} must be on {kv_layer.device} or pinned host memory")
    return block_ids, offsets, T


# Tokens per program and warps, per head_dim bucket: TILE[next_pow2(D)] = (BLOCK_T, num_warps). On an
# H100 (benchmarks/gpu_copy_tiles.py, benchmarks/results/gpu_copy_tiles.json: LBNHC, D 128, bf16,
# 128 MiB per launch) every tile from 8 to 64 tokens with 1 to 8 warps moved 1,354-1,371 GB/s, 0.96x
# a device copy; tiles near 2048 elements are kept as the middle of that flat range.
TILE = {64: (32, 4), 128: (16, 4), 256: (8, 4)}


def _tile(D: int) -> tuple[int, int]:
    return TILE.get(next_pow2(D), (max(1, 2048 // next_pow2(D)), 4))


def _run(kv_layer, block_ids, head_ids, buf, offsets, layout, num_tokens, to_buf, aligned=False, tile=None,
         layer_ids=None):
    kv_layer, _, seg_base = _layers(kv_layer, head_ids, layer_ids)
    block_ids, offsets, T = _normalize(kv_layer, block_ids, head_ids, buf, offsets, layout, num_tokens)
    S, nh = offsets.shape
    if S == 0 or nh == 0 or T == 0:
        return
    if seg_base is None:
        seg_base = _zeros(nh, kv_layer.device)
    D = kv_layer.shape[3] // 2
    block_t, num_warps = tile or _tile(D)
    if is_interpreter():
        block_t = 16
    grid = (triton.cdiv(T, block_t), nh, S)
    return _gather_scatter_kernel[grid](
        kv_layer, buf, block_ids, head_ids, seg_base, offsets,
        T,
        kv_layer.stride(0), kv_layer.stride(1), kv_layer.stride(2), block_ids.stride(0), offsets.stride(0),
        HEAD_DIM=D, BLOCK_D=next_pow2(D), BLOCK_TOKENS=kv_layer.shape[2], BLOCK_T=block_t,
        K_TRANSPOSED=layout == "LBHNC_KT", TO_BUF=to_buf, ALIGNED=bool(aligned) and D % 16 == 0, num_warps=num_warps,
    )


def gather_segments(kv_layer, block_ids, head_ids, dst, dst_offsets, *, layout, num_tokens=None,
                    aligned=False, tile=None, layer_ids=None) -> None:
    """Copy segments (entry s, head head_ids[j]) from ``kv_layer`` into ``dst`` at ``dst_offsets[s, j]``.
    ``tile``: (tokens per program, warps) instead of ``TILE``'s (the tile sweep only). ``layer_ids``:
    ``kv_layer`` is every layer's tensor and segment j comes from layer ``layer_ids[j]`` (one launch)."""
    _run(kv_layer, block_ids, head_ids, dst, dst_offsets, layout, num_tokens, True, aligned, tile, layer_ids)


def scatter_segments(kv_layer, block_ids, head_ids, src, src_offsets, *, layout, num_tokens=None,
                     aligned=False, tile=None, layer_ids=None) -> None:
    """The exact reverse of ``gather_segments``: write segments from ``src`` into ``kv_layer``."""
    _run(kv_layer, block_ids, head_ids, src, src_offsets, layout, num_tokens, False, aligned, tile, layer_ids)


def _segment_views(kv_layer, block_ids, head, layout, T):
    """K [T, D] and V [T, D] of one (entry, head), as copies gathered with torch indexing."""
    nblk, H, N, C = kv_layer.shape
    D = C // 2
    blocks = block_ids.long()
    if layout == "LBHNC_KT":
        run = kv_layer[blocks, head].reshape(len(blocks), 2 * N * D)
        k = run[:, : N * D].reshape(-1, D, N).transpose(1, 2).reshape(-1, D)
        v = run[:, N * D:].reshape(-1, D)
    else:
        cells = kv_layer[blocks, head]  # [nb, N, 2D]
        k = cells[..., :D].reshape(-1, D)
        v = cells[..., D:].reshape(-1, D)
    return k[:T], v[:T]


def gather_segments_ref(kv_layer, block_ids, head_ids, dst, dst_offsets, *, layout, num_tokens=None,
                        aligned=False, layer_ids=None) -> None:
    """Plain torch, same signature and effect as ``gather_segments`` (works on the CPU backend's KV)."""
    kv_layer, layers, _ = _layers(kv_layer, head_ids, layer_ids)
    block_ids, offsets, T = _normalize(kv_layer, block_ids, head_ids, dst, dst_offsets, layout, num_tokens)
    D = kv_layer.shape[3] // 2
    for s in range(offsets.shape[0]):
        for j, head in enumerate(head_ids.tolist()):
            k, v = _segment_views(kv_layer if layers is None else layers[int(layer_ids[j])], block_ids[s], head,
                                  layout, T)
            off = int(offsets[s, j])
            dst[off: off + T * D].copy_(k.reshape(-1))
            dst[off + T * D: off + 2 * T * D].copy_(v.reshape(-1))


def scatter_segments_ref(kv_layer, block_ids, head_ids, src, src_offsets, *, layout, num_tokens=None,
                         aligned=False, layer_ids=None) -> None:
    """Plain torch, same signature and effect as ``scatter_segments``."""
    base, layers, _ = _layers(kv_layer, head_ids, layer_ids)
    block_ids, offsets, T = _normalize(base, block_ids, head_ids, src, src_offsets, layout, num_tokens)
    nblk, H, N, C = base.shape
    D = C // 2
    tok = torch.arange(T, device=base.device)
    for s in range(offsets.shape[0]):
        blocks = block_ids[s].long()[tok // N]
        slots = tok % N
        for j, head in enumerate(head_ids.tolist()):
            kv_layer = base if layers is None else layers[int(layer_ids[j])]
            off = int(offsets[s, j])
            k = src[off: off + T * D].reshape(T, D)
            v = src[off + T * D: off + 2 * T * D].reshape(T, D)
            if layout == "LBHNC_KT":
                run = kv_layer.view(nblk, H, 2 * N * D)
                d = torch.arange(D, device=kv_layer.device)
                run[blocks[:, None], head, d[None, :] * N + slots[:, None]] = k.to(kv_layer.device)
                run[blocks[:, None], head, N * D + slots[:, None] * D + d[None, :]] = v.to(kv_layer.device)
            else:
                kv_layer[blocks, head, slots, :D] = k.to(kv_layer.device)
                kv_layer[blocks, head, slots, D:] = v.to(kv_layer.device)


__all__ = ["LAYOUTS", "LayersNotAlike", "gather_segments", "gather_segments_ref", "scatter_segments", "scatter_segments_ref"]
