"""RoPE shift in place: move cached (post-RoPE) keys from positions s.. to d.. by one rotation R(d - s).

Shapes:

    k         [T, H, D] or [T, D]   bf16/fp16/fp32 keys, rotated in place; any strides, last dim contiguous
    inv_freq  [D / 2]               fp32, the model's rotary ``inv_freq`` (default or llama3-scaled alike)
    delta     int, or [T] int32/int64   d - s for every token, or one per token (chunks landing at
                                    different offsets)

Math (NeoX / Llama half-split layout, fp32): with x1 = k[..., :D/2], x2 = k[..., D/2:] and
angle[t, i] = float(delta[t]) * inv_freq[i] (an fp32 product, as the model forms ``pos * inv_freq``),

    k'[..., :D/2] = x1 cos(angle) - x2 sin(angle)
    k'[..., D/2:] = x2 cos(angle) + x1 sin(angle)

i.e. ``k' = k * cos(emb) + rotate_half(k) * sin(emb)`` with ``emb = cat(freqs, freqs)`` and
``rotate_half(x) = cat(-x2, x1)``. Rotations compose, R(d) R(s)^-1 = R(d - s), so only the difference is
needed. No attention magnitude scale is ever applied. Values are never rotated.

Kernel: a program rotates BLOCK_T tokens x BLOCK_H heads; the angle of each (token, frequency) is
computed once and reused over the heads. The angle is reduced modulo 2 pi in fp64 before the fp32
cos/sin, because GPU ``cos``/``sin`` in fp32 are accurate only near [-pi, pi] and angles reach 1e5.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvd.gpu_kernels._launch import (
    cast_rtne,
    check_dtype,
    check_last_dim_contiguous,
    is_interpreter,
    next_pow2,
)

TWO_PI = 6.283185307179586


@triton.jit
def _rope_shift_kernel(
    # pointers
    k_ptr, inv_freq_ptr, delta_ptr,
    # sizes
    delta_scalar, num_tokens, num_heads,
    # strides
    stride_kt, stride_kh,
    # meta-parameters
    HALF: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr,
    PER_TOKEN: tl.constexpr, INTERPRET: tl.constexpr,
):
    pid_t = tl.program_id(0)
    pid_h = tl.program_id(1)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_h = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_f = tl.arange(0, BLOCK_F)
    mask_t = offs_t < num_tokens
    mask_f = offs_f < HALF

    # -- angles: fp32 product as the model forms it, then reduced mod 2 pi in fp64 ------------
    inv_freq = tl.load(inv_freq_ptr + offs_f, mask=mask_f, other=0.0)
    if PER_TOKEN:
        delta = tl.load(delta_ptr + offs_t, mask=mask_t, other=0).to(tl.float32)
        angle = delta[:, None] * inv_freq[None, :]  # [BLOCK_T, BLOCK_F]
    else:
        angle = (delta_scalar * inv_freq)[None, :]  # [1, BLOCK_F]: one angle per frequency
    # fp64 constants made explicitly: a bare Python float would be rounded to fp32 first
    inv_two_pi = tl.full([], 0.15915494309189535, tl.float64)  # 1 / (2 pi)
    two_pi = tl.full([], 6.283185307179586, tl.float64)  # 2 pi
    angle64 = angle.to(tl.float64)
    turns = tl.floor(angle64 * inv_two_pi + 0.5)
    reduced = (angle64 - turns * two_pi).to(tl.float32)
    cos = tl.cos(reduced)[:, None, :]
    sin = tl.sin(reduced)[:, None, :]

    # -- rotate both halves of every (token, head) -------------------------------------------
    offs = (offs_t.to(tl.int64)[:, None, None] * stride_kt + offs_h.to(tl.int64)[None, :, None] * stride_kh
            + offs_f[None, None, :])
    mask = mask_t[:, None, None] & (offs_h < num_heads)[None, :, None] & mask_f[None, None, :]
    x1 = tl.load(k_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(k_ptr + offs + HALF, mask=mask, other=0.0).to(tl.float32)
    tl.store(k_ptr + offs, cast_rtne(x1 * cos - x2 * sin, k_ptr.dtype.element_ty, INTERPRET), mask=mask)
    tl.store(k_ptr + offs + HALF, cast_rtne(x2 * cos + x1 * sin, k_ptr.dtype.element_ty, INTERPRET), mask=mask)


def _as_3d(k: torch.Tensor) -> torch.Tensor:
    if k.dim() == 2:
        return k[:, None, :]
    if k.dim() != 3:
        raise ValueError(f"k must be [T, H, D] or [T, D], got shape {tuple(k.shape)}")
    return k


def _check(k, inv_freq, delta):
    check_dtype("k", k, (torch.bfloat16, torch.float16, torch.float32))
    check_last_dim_contiguous("k", k)
    D = k.shape[-1]
    if D % 2:
        raise ValueError(f"head dim {D} must be even for RoPE")
    if inv_freq.shape != (D // 2,) or inv_freq.dtype != torch.float32:
        raise ValueError(f"inv_freq must be fp32 [{D // 2}], got {inv_freq.dtype} {tuple(inv_freq.shape)}")
    check_last_dim_contiguous("inv_freq", inv_freq)  # the kernel reads it, and delta, with unit stride
    if isinstance(delta, torch.Tensor):
        if delta.shape != (k.shape[0],) or delta.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"delta tensor must be int32/int64 [{k.shape[0]}], got {delta.dtype} "
                             f"{tuple(delta.shape)}")
        check_last_dim_contiguous("delta", delta)
        if delta.device != k.device:
            raise ValueError(f"delta on {delta.device}, k on {k.device}")
    if inv_freq.device != k.device:
        raise ValueError(f"inv_freq on {inv_freq.device}, k on {k.device}")


def rope_shift(k: torch.Tensor, inv_freq: torch.Tensor, delta: int | torch.Tensor) -> torch.Tensor:
    """Rotate keys ``k`` in place by ``delta`` positions (module docstring); returns ``k``.

    Args:
        k: ``[T, H, D]`` or ``[T, D]`` post-RoPE keys, last dim contiguous.
        inv_freq: fp32 ``[D / 2]`` rotary frequencies of the model.
        delta: ``d - s`` as an int, or an int tensor ``[T]`` with one shift per token.
    """
    _check(k, inv_freq, delta)
    k3 = _as_3d(k)
    T, H, D = k3.shape
    if T == 0 or H == 0:
        return k
    per_token = isinstance(delta, torch.Tensor)
    block_h = min(next_pow2(H), 8)
    block_t = 4 if is_interpreter() else max(1, 32 // block_h)
    grid = (triton.cdiv(T, block_t), triton.cdiv(H, block_h))
    _rope_shift_kernel[grid](
        k3, inv_freq, delta if per_token else inv_freq,
        0.0 if per_token else float(delta), T, H,
        k3.stride(0), k3.stride(1),
        HALF=D // 2, BLOCK_F=next_pow2(D // 2), BLOCK_T=block_t, BLOCK_H=block_h, PER_TOKEN=per_token, INTERPRET=is_interpreter(),
        num_warps=4,
    )
    return k


def rope_shift_ref(k: torch.Tensor, inv_freq: torch.Tensor, delta: int | torch.Tensor) -> torch.Tensor:
    """Plain torch, same signature and effect: rotates ``k`` in place in fp32 and returns it."""
    _check(k, inv_freq, delta)
    k3 = _as_3d(k)
    T = k3.shape[0]
    if isinstance(delta, torch.Tensor):
        d = delta.to(torch.float32)
    else:
        d = torch.full((T,), float(delta), dtype=torch.float32, device=k.device)
    angle = d[:, None] * inv_freq[None, :]  # [T, D/2] fp32
    # same reduction as the kernel (fp64 mod 2 pi); mathematically a no-op for cos and sin
    angle64 = angle.double()
    reduced = (angle64 - torch.floor(angle64 / TWO_PI + 0.5) * TWO_PI).float()
    cos, sin = torch.cos(reduced)[:, None, :], torch.sin(reduced)[:, None, :]
    x = k3.float()
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    k3.copy_(torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(k.dtype))
    return k


__all__ = ["rope_shift", "rope_shift_ref"]
