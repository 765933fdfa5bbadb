"""Byte-plane split and merge, the first step of the lossless codec (``kvd/codec.py``).

An element of E bytes (bf16/fp16: 2, fp32: 4), read little-endian, has bytes 0 (least significant)
.. E-1. ``split_byte_planes(x)`` returns ``planes [E, n]`` uint8 with ``planes[i]`` = byte i of every
element in order, each plane contiguous: exactly the codec's plane order (for bf16, plane 1 holds the
sign, exponent and top mantissa bits and compresses well; plane 0 is close to noise). Given an extent
buffer (K of every segment, then V, as laid out in memory) the planes come out in the codec's
"K bytes then V bytes" order. ``merge_byte_planes`` is the exact inverse. Running it on the GPU lets
cold data be prepared before it crosses PCIe.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvd.gpu_kernels._launch import is_interpreter

WORD_VIEWS = {2: torch.int16, 4: torch.int32}  # element size in bytes -> integer view
PLANE_DTYPES = (torch.bfloat16, torch.float16, torch.int16, torch.uint16, torch.float32, torch.int32)


@triton.jit
def _byte_planes_kernel(
    # pointers
    words_ptr, planes_ptr,
    # sizes
    num_words,
    # meta-parameters
    NUM_BYTES: tl.constexpr, BLOCK: tl.constexpr, SPLIT: tl.constexpr,
):
    offs = tl.cast(tl.program_id(0), tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < num_words
    if SPLIT:
        w = tl.load(words_ptr + offs, mask=mask, other=0).to(tl.int32)
        for i in tl.static_range(NUM_BYTES):
            tl.store(planes_ptr + i * num_words + offs, ((w >> (8 * i)) & 0xFF).to(tl.uint8), mask=mask)
    else:
        w = tl.zeros([BLOCK], tl.int32)
        for i in tl.static_range(NUM_BYTES):
            byte = tl.load(planes_ptr + i * num_words + offs, mask=mask, other=0).to(tl.int32)
            w = w | (byte << (8 * i))
        tl.store(words_ptr + offs, w.to(words_ptr.dtype.element_ty), mask=mask)


def _block() -> int:
    return 1024 if is_interpreter() else 4096


def _check_x(x: torch.Tensor) -> None:
    if x.dtype not in PLANE_DTYPES or not x.is_contiguous():
        raise ValueError(f"x must be a contiguous 2- or 4-byte tensor ({PLANE_DTYPES}), got {x.dtype} "
                         f"strides {x.stride()}")


def _check_planes(planes: torch.Tensor, dtype: torch.dtype) -> int:
    if dtype not in PLANE_DTYPES:
        raise ValueError(f"dtype {dtype} unsupported; expected one of {PLANE_DTYPES}")
    size = torch.empty((), dtype=dtype).element_size()
    if planes.dtype != torch.uint8 or planes.dim() != 2 or planes.shape[0] != size or not planes.is_contiguous():
        raise ValueError(f"planes must be contiguous uint8 [{size}, n] for {dtype}, got {planes.dtype} "
                         f"{tuple(planes.shape)}")
    return size


def split_byte_planes(x: torch.Tensor) -> torch.Tensor:
    """Contiguous ``x`` (any shape, E-byte elements) -> ``planes [E, x.numel()]`` uint8, plane i = byte i."""
    _check_x(x)
    size, n = x.element_size(), x.numel()
    planes = torch.empty((size, n), dtype=torch.uint8, device=x.device)
    if n:
        _byte_planes_kernel[(triton.cdiv(n, _block()),)](
            x.view(WORD_VIEWS[size]), planes, n, NUM_BYTES=size, BLOCK=_block(), SPLIT=True, num_warps=4)
    return planes


def merge_byte_planes(planes: torch.Tensor, *, dtype: torch.dtype, shape: tuple[int, ...] | None = None) -> torch.Tensor:
    """Inverse of ``split_byte_planes``: ``planes [E, n]`` -> tensor of ``dtype``, ``shape`` or ``[n]``."""
    size = _check_planes(planes, dtype)
    n = planes.shape[1]
    out = torch.empty(n, dtype=dtype, device=planes.device)
    if n:
        _byte_planes_kernel[(triton.cdiv(n, _block()),)](
            out.view(WORD_VIEWS[size]), planes, n, NUM_BYTES=size, BLOCK=_block(), SPLIT=False, num_warps=4)
    return out.view(shape) if shape is not None else out


def split_byte_planes_ref(x: torch.Tensor) -> torch.Tensor:
    """Plain torch, same signature and result as ``split_byte_planes`` (little-endian host)."""
    _check_x(x)
    return x.reshape(-1).view(torch.uint8).view(-1, x.element_size()).t().contiguous()


def merge_byte_planes_ref(planes: torch.Tensor, *, dtype: torch.dtype, shape: tuple[int, ...] | None = None) -> torch.Tensor:
    """Plain torch, same signature and result as ``merge_byte_planes``."""
    _check_planes(planes, dtype)
    out = planes.t().contiguous().view(dtype).reshape(-1)
    return out.view(shape) if shape is not None else out


__all__ = ["merge_byte_planes", "merge_byte_planes_ref", "split_byte_planes", "split_byte_planes_ref"]
