"""Byte-plane split and merge of 16-bit tensors, the first step of the lossless codec.

A bf16/fp16 tensor of n elements, viewed as little-endian bytes, interleaves low and high bytes
(``lo0 hi0 lo1 hi1 ...``). The high bytes (sign, exponent, top mantissa bits) compress well on their
own; the low bytes are close to noise. ``split_byte_planes`` returns ``planes [2, n]`` uint8 with
``planes[0]`` = the high-byte plane (bytes at odd addresses) and ``planes[1]`` = the low-byte plane,
each contiguous; ``merge_byte_planes`` is the exact inverse. Running it on the GPU lets cold data be
prepared before it crosses PCIe.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvd.gpu_kernels._launch import is_interpreter

SIXTEEN_BIT = (torch.bfloat16, torch.float16, torch.int16, torch.uint16)


@triton.jit
def _byte_planes_kernel(
    # pointers
    words_ptr, planes_ptr,
    # sizes
    num_words,
    # meta-parameters
    BLOCK: tl.constexpr, SPLIT: tl.constexpr,
):
    offs = tl.cast(tl.program_id(0), tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < num_words
    if SPLIT:
        w = tl.load(words_ptr + offs, mask=mask, other=0).to(tl.int32) & 0xFFFF
        tl.store(planes_ptr + offs, (w >> 8).to(tl.uint8), mask=mask)  # high plane first
        tl.store(planes_ptr + num_words + offs, (w & 0xFF).to(tl.uint8), mask=mask)
    else:
        hi = tl.load(planes_ptr + offs, mask=mask, other=0).to(tl.int32)
        lo = tl.load(planes_ptr + num_words + offs, mask=mask, other=0).to(tl.int32)
        tl.store(words_ptr + offs, ((hi << 8) | lo).to(tl.int16), mask=mask)


def _block() -> int:
    return 1024 if is_interpreter() else 4096


def split_byte_planes(x: torch.Tensor) -> torch.Tensor:
    """16-bit ``x`` (contiguous, any shape) -> ``planes [2, x.numel()]`` uint8: high bytes, then low bytes."""
    if x.dtype not in SIXTEEN_BIT or not x.is_contiguous():
        raise ValueError(f"x must be a contiguous 16-bit tensor, got {x.dtype} strides {x.stride()}")
    n = x.numel()
    planes = torch.empty((2, n), dtype=torch.uint8, device=x.device)
    if n:
        _byte_planes_kernel[(triton.cdiv(n, _block()),)](x.view(torch.int16), planes, n, BLOCK=_block(),
                                                         SPLIT=True, num_warps=4)
    return planes


def merge_byte_planes(planes: torch.Tensor, *, dtype: torch.dtype, shape: tuple[int, ...] | None = None) -> torch.Tensor:
    """Inverse of ``split_byte_planes``: ``planes [2, n]`` uint8 -> tensor of ``dtype`` (``shape`` or ``[n]``)."""
    if planes.dtype != torch.uint8 or planes.dim() != 2 or planes.shape[0] != 2 or not planes.is_contiguous():
        raise ValueError(f"planes must be contiguous uint8 [2, n], got {planes.dtype} {tuple(planes.shape)}")
    if dtype not in SIXTEEN_BIT:
        raise ValueError(f"dtype {dtype} is not a 16-bit type")
    n = planes.shape[1]
    out = torch.empty(n, dtype=dtype, device=planes.device)
    if n:
        _byte_planes_kernel[(triton.cdiv(n, _block()),)](out.view(torch.int16), planes, n, BLOCK=_block(),
                                                         SPLIT=False, num_warps=4)
    return out.view(shape) if shape is not None else out


def split_byte_planes_ref(x: torch.Tensor) -> torch.Tensor:
    """Plain torch, same signature and result as ``split_byte_planes`` (little-endian host)."""
    if x.dtype not in SIXTEEN_BIT or not x.is_contiguous():
        raise ValueError(f"x must be a contiguous 16-bit tensor, got {x.dtype} strides {x.stride()}")
    b = x.reshape(-1).view(torch.uint8).view(-1, 2)  # [n, (low, high)]
    return torch.stack((b[:, 1], b[:, 0])).contiguous()


def merge_byte_planes_ref(planes: torch.Tensor, *, dtype: torch.dtype, shape: tuple[int, ...] | None = None) -> torch.Tensor:
    """Plain torch, same signature and result as ``merge_byte_planes``."""
    out = torch.stack((planes[1], planes[0]), dim=1).contiguous().view(dtype).reshape(-1)
    return out.view(shape) if shape is not None else out


__all__ = ["merge_byte_planes", "merge_byte_planes_ref", "split_byte_planes", "split_byte_planes_ref"]
