"""Helpers shared by the kernel launchers: interpreter detection, argument checks, small maths.

Launchers check their arguments here and raise ``ValueError`` naming the tensor, the value seen and
what was expected; they never call ``.contiguous()`` silently (STYLE.md §3).
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl


def is_interpreter() -> bool:
    """True when Triton runs kernels through its CPU interpreter (tests without a GPU).

    Kernels take it as the constexpr ``INTERPRET`` and then work around two faults of Triton 3.9's
    interpreter: it multiplies bf16 tiles in ``tl.dot`` as raw uint16 bits (so dot operands are upcast
    to fp32: products of bf16/fp16 are exact in fp32, only the summation order differs), and its
    fp32 -> bf16 / fp8 casts truncate or carry wrongly (so values are first rounded to the target grid
    on their bit pattern, after which the cast is exact). On the GPU the hardware does both directly.
    """
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # interpreter: a few persistent programs exercise the work loop
    return _cuda_sms(device.index if device.index is not None else torch.cuda.current_device())


@functools.cache
def _cuda_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def next_pow2(n: int) -> int:
    return triton.next_power_of_2(max(1, int(n)))


def check_last_dim_contiguous(name: str, t: torch.Tensor) -> None:
    if t.stride(-1) != 1:
        raise ValueError(f"{name} must have a contiguous last dim, got shape {tuple(t.shape)} strides {t.stride()}")


def check_ndim(name: str, t: torch.Tensor, ndim: int, what: str) -> None:
    if t.dim() != ndim:
        raise ValueError(f"{name} must be {what}, got shape {tuple(t.shape)}")


def check_dtype(name: str, t: torch.Tensor, allowed: tuple[torch.dtype, ...]) -> None:
    if t.dtype not in allowed:
        names = ", ".join(str(d) for d in allowed)
        raise ValueError(f"{name} has dtype {t.dtype}, expected one of {names}")


def check_index(name: str, t: torch.Tensor, ndim: int, what: str) -> None:
    """An index tensor: int32 (or int64 where stated by the caller), ``ndim`` dims, last dim contiguous."""
    check_ndim(name, t, ndim, what)
    check_dtype(name, t, (torch.int32, torch.int64))
    check_last_dim_contiguous(name, t)


def check_same_device(**tensors: torch.Tensor) -> None:
    devices = {n: t.device for n, t in tensors.items()}
    if len(set(devices.values())) > 1:
        raise ValueError(f"tensors must be on one device, got {devices}")


@triton.jit
def cast_rtne(x, DTYPE: tl.constexpr, INTERPRET: tl.constexpr):
    """fp32 ``x`` to ``DTYPE``, rounding to nearest even (the GPU's cast; see ``is_interpreter``)."""
    if INTERPRET and DTYPE == tl.bfloat16:
        bits = x.to(tl.int32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -0x10000  # keep 8 mantissa bits, ties to even
        x = bits.to(tl.float32, bitcast=True)
    return x.to(DTYPE)
