"""fp8 (e4m3) and int8 quantization of segments: per-channel scales for keys, per-token for values.

The math is the CPU codec's (``kvd/codec.py``), step for step, so either side decodes the other:

    keys   K [T, D]:  s_k[d] = max_t |K[t, d]| / QMAX      (fp32; a zero scale becomes 1.0)
    values V [T, D]:  s_v[t] = max_d |V[t, d]| / QMAX
    quantize:         y = clamp(x.float() / s, -QMAX, QMAX)   (IEEE fp32 division)
                      fp8:  y.to(torch.float8_e4m3fn)         (round to nearest even)
                      int8: torch.round(y).to(torch.int8)     (round half to even)
    dequantize:       (q.float() * s).to(dtype)
    QMAX = 448 for float8_e4m3fn, 127 for int8

Shapes: ``x [S, T, D]`` (S segments; any strides, last dim contiguous) or ``[T, D]``; ``q`` has x's
shape (contiguous); key scales ``[S, D]``, value scales ``[S, T]`` (``[D]`` / ``[T]`` for 2-D input).

Kernels: keys, one program per (segment, channel tile), reading the segment once when it has at most
256 tokens, else in two passes over T (max, then quantize; the second pass reads from L2); values, one
program per (segment, token tile) in one pass. fp8 codes come from the PTX
``cvt.rn.satfinite.e4m3x2.f32`` on GPUs that have it (sm_89+), through inline assembly: Triton 3.6's
own fp32 -> fp8e4nv cast gave other codes than torch for 9% of elements on the H200. Elsewhere (the
interpreter, whose cast carries wrongly, and older GPUs) the kernels round to the e4m3 grid themselves
(round to nearest even on the fp32 bit pattern) and then cast an exact value. Note for any torch
reference on CUDA: ``t / 448.0`` there is a multiply by the reciprocal, not the IEEE quotient; divide by
a tensor (as ``*_ref`` here does) to get the codec's math.
"""

from __future__ import annotations

import functools
import os

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

QMAX = {torch.float8_e4m3fn: 448.0, torch.int8: 127.0}
KV_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# fp8 codes on a GPU of compute capability >= 8.9 come from the PTX cvt.rn.satfinite.e4m3x2.f32
# (bit-identical to torch on all 134M codes of benchmarks/kernels.py on the H200, 1.6x faster than the
# in-kernel rounding, which the interpreter and older GPUs use). KVD_FP8_HW_CAST=0 turns it off.
FP8_HW_CAST = os.environ.get("KVD_FP8_HW_CAST", "1") != "0"


@functools.cache
def _has_e4m3_cvt(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index) >= (8, 9)


def _hw_cast(x: torch.Tensor) -> bool:
    return (FP8_HW_CAST and not is_interpreter() and x.device.type == "cuda"
            and _has_e4m3_cvt(x.device.index if x.device.index is not None else torch.cuda.current_device()))


@triton.jit
def _round_half_even(y):
    # |y| <= 2^22: floor(y + 0.5) is exact; a tie that landed on an odd integer goes down by one
    r = tl.floor(y + 0.5)
    is_tie = (r - y) == 0.5
    is_odd = (r.to(tl.int32) & 1) != 0
    return tl.where(is_tie & is_odd, r - 1.0, r)


@triton.jit
def _round_to_e4m3(y):
    # y in [-448, 448]. Normal range (|y| >= 2^-6): keep 3 mantissa bits, round to nearest even on the
    # fp32 bit pattern (a carry correctly bumps the exponent). Subnormals: multiples of 2^-9.
    a = tl.abs(y)
    bits = a.to(tl.int32, bitcast=True)
    bits = (bits + 0x7FFFF + ((bits >> 20) & 1)) & -0x100000  # ~0xFFFFF: 20 dropped mantissa bits
    normal = bits.to(tl.float32, bitcast=True)
    subnormal = _round_half_even(a * 512.0) * 0.001953125  # 2^9, 2^-9
    r = tl.where(a < 0.015625, subnormal, normal)  # 2^-6: smallest normal e4m3
    sign = y.to(tl.int32, bitcast=True) & -0x80000000  # keep the sign of -0.0 and tiny negatives
    return (r.to(tl.int32, bitcast=True) | sign).to(tl.float32, bitcast=True)


@triton.jit
def _cvt_e4m3x2(y):
    # PTX cvt.rn.satfinite.e4m3x2.f32 d, a, b puts a in the high byte: element 0 ($1) goes low (the
    # other order gives wrong codes for nearly every element; benchmarks/kernels.py checks each one).
    return tl.inline_asm_elementwise("cvt.rn.satfinite.e4m3x2.f32 $0, $2, $1;", "=h,r,r", [y],
                                     dtype=tl.int8, is_pure=True, pack=2)


@triton.jit
def _quantize_values_tile(x, scale, QMAX: tl.constexpr, IS_FP8: tl.constexpr, INTERPRET: tl.constexpr,
                          HW_CAST: tl.constexpr = False):
    """Codes as fp32 values on the target grid, or (``HW_CAST``: fp8 on a GPU) as int8 bit patterns."""
    y = tl.math.div_rn(x, scale)  # IEEE division, as torch's x / s
    y = tl.minimum(tl.maximum(y, -QMAX), QMAX)
    if IS_FP8 and HW_CAST:
        y = _cvt_e4m3x2(y)
    elif IS_FP8:
        # Round to the e4m3 grid here, so the cast is exact whatever its rounding: the interpreter's
        # carries wrongly, and Triton 3.6's fp32 -> fp8e4nv cast on the H200 gave other codes than
        # torch for 9% of the elements even with fp_downcast_rounding="rtne" (benchmarks/kernels.py,
        # 2026-11-28); GPUs with the e4m3 cvt take the inline-assembly branch above.
        y = _round_to_e4m3(y)
    else:
        y = _round_half_even(y)
    return y


@triton.jit
def _as_code(y, DTYPE: tl.constexpr, IS_FP8: tl.constexpr, HW_CAST: tl.constexpr):
    if IS_FP8 and HW_CAST:
        out = y.to(DTYPE, bitcast=True)
    else:  # (not an early return: Triton would still compile the other cast)
        out = y.to(DTYPE)
    return out


@triton.jit
def _quantize_keys_kernel(
    # pointers
    x_ptr, q_ptr, scale_ptr,
    # sizes
    num_tokens,
    # strides
    stride_xs, stride_xt, stride_qs, stride_qt, stride_ss,
    # meta-parameters
    HEAD_DIM: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, QMAX: tl.constexpr,
    IS_FP8: tl.constexpr, INTERPRET: tl.constexpr, ONE_PASS: tl.constexpr, HW_CAST: tl.constexpr,
):
    pid_s = tl.program_id(0)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    offs_t = tl.arange(0, BLOCK_T)
    x_seg = x_ptr + tl.cast(pid_s, tl.int64) * stride_xs
    q_seg = q_ptr + tl.cast(pid_s, tl.int64) * stride_qs
    if ONE_PASS:  # the whole [T, BLOCK_D] slab fits in registers: read it once
        rows = offs_t.to(tl.int64)
        mask = (offs_t < num_tokens)[:, None] & mask_d[None, :]
        # (names differ from the loop's below: Triton types variables across both branches)
        slab = tl.load(x_seg + rows[:, None] * stride_xt + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
        s1 = tl.math.div_rn(tl.max(tl.abs(slab), 0), QMAX)
        s1 = tl.where(s1 == 0.0, 1.0, s1)
        tl.store(scale_ptr + tl.cast(pid_s, tl.int64) * stride_ss + offs_d, s1, mask=mask_d)
        codes = _quantize_values_tile(slab, s1[None, :], QMAX, IS_FP8, INTERPRET, HW_CAST)
        tl.store(q_seg + rows[:, None] * stride_qt + offs_d[None, :],
                 _as_code(codes, q_ptr.dtype.element_ty, IS_FP8, HW_CAST), mask=mask)
        return

    # -- pass 1: per-channel max |x| over all tokens -------------------------------------------
    amax = tl.zeros([BLOCK_D], tl.float32)
    for t0 in range(0, num_tokens, BLOCK_T):
        mask = ((t0 + offs_t) < num_tokens)[:, None] & mask_d[None, :]
        x = tl.load(x_seg + (t0 + offs_t).to(tl.int64)[:, None] * stride_xt + offs_d[None, :], mask=mask, other=0.0)
        amax = tl.maximum(amax, tl.max(tl.abs(x.to(tl.float32)), 0))
    scale = tl.math.div_rn(amax, QMAX)
    scale = tl.where(scale == 0.0, 1.0, scale)
    tl.store(scale_ptr + tl.cast(pid_s, tl.int64) * stride_ss + offs_d, scale, mask=mask_d)

    # -- pass 2: quantize (this re-read comes from L2) -------------------------------------------
    for t0 in range(0, num_tokens, BLOCK_T):
        rows = (t0 + offs_t).to(tl.int64)
        mask = ((t0 + offs_t) < num_tokens)[:, None] & mask_d[None, :]
        x = tl.load(x_seg + rows[:, None] * stride_xt + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
        y = _quantize_values_tile(x, scale[None, :], QMAX, IS_FP8, INTERPRET, HW_CAST)
        tl.store(q_seg + rows[:, None] * stride_qt + offs_d[None, :], _as_code(y, q_ptr.dtype.element_ty, IS_FP8, HW_CAST),
                 mask=mask)


@triton.jit
def _quantize_values_kernel(
    # pointers
    x_ptr, q_ptr, scale_ptr,
    # sizes
    num_tokens,
    # strides
    stride_xs, stride_xt, stride_qs, stride_qt, stride_ss,
    # meta-parameters
    HEAD_DIM: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, QMAX: tl.constexpr,
    IS_FP8: tl.constexpr, INTERPRET: tl.constexpr, HW_CAST: tl.constexpr,
):
    pid_s = tl.program_id(0)
    offs_t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, BLOCK_D)
    mask_t = offs_t < num_tokens
    mask = mask_t[:, None] & (offs_d < HEAD_DIM)[None, :]
    rows = offs_t.to(tl.int64)
    x = tl.load(x_ptr + tl.cast(pid_s, tl.int64) * stride_xs + rows[:, None] * stride_xt + offs_d[None, :],
                mask=mask, other=0.0).to(tl.float32)
    scale = tl.math.div_rn(tl.max(tl.abs(x), 1), QMAX)  # per token
    scale = tl.where(scale == 0.0, 1.0, scale)
    tl.store(scale_ptr + tl.cast(pid_s, tl.int64) * stride_ss + offs_t, scale, mask=mask_t)
    y = _quantize_values_tile(x, scale[:, None], QMAX, IS_FP8, INTERPRET, HW_CAST)
    tl.store(q_ptr + tl.cast(pid_s, tl.int64) * stride_qs + rows[:, None] * stride_qt + offs_d[None, :],
             _as_code(y, q_ptr.dtype.element_ty, IS_FP8, HW_CAST), mask=mask)


@triton.jit
def _dequantize_kernel(
    # pointers
    q_ptr, scale_ptr, x_ptr,
    # sizes
    num_tokens,
    # strides
    stride_qs, stride_qt, stride_xs, stride_xt, stride_ss,
    # meta-parameters
    HEAD_DIM: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, PER_CHANNEL: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    pid_s = tl.program_id(0)
    offs_t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, BLOCK_D)
    mask_t = offs_t < num_tokens
    mask_d = offs_d < HEAD_DIM
    mask = mask_t[:, None] & mask_d[None, :]
    rows = offs_t.to(tl.int64)
    seg = tl.cast(pid_s, tl.int64)
    q = tl.load(q_ptr + seg * stride_qs + rows[:, None] * stride_qt + offs_d[None, :], mask=mask)
    if PER_CHANNEL:
        scale = tl.load(scale_ptr + seg * stride_ss + offs_d, mask=mask_d, other=1.0)[None, :]
    else:
        scale = tl.load(scale_ptr + seg * stride_ss + offs_t, mask=mask_t, other=1.0)[:, None]
    x = q.to(tl.float32) * scale
    tl.store(x_ptr + seg * stride_xs + rows[:, None] * stride_xt + offs_d[None, :],
             cast_rtne(x, x_ptr.dtype.element_ty, INTERPRET), mask=mask)


def _as_3d(name: str, x: torch.Tensor) -> torch.Tensor:
    if x.dim() == 2:
        return x[None]
    if x.dim() != 3:
        raise ValueError(f"{name} must be [S, T, D] or [T, D], got shape {tuple(x.shape)}")
    return x


def _check_quant(x: torch.Tensor, qdtype: torch.dtype) -> None:
    check_dtype("x", x, KV_DTYPES)
    check_last_dim_contiguous("x", x)
    if qdtype not in QMAX:
        raise ValueError(f"qdtype {qdtype} unsupported; expected torch.float8_e4m3fn or torch.int8")


def _quantize(x, qdtype, per_channel):
    _check_quant(x, qdtype)
    x3 = _as_3d("x", x)
    S, T, D = x3.shape
    q = torch.empty(x3.shape, dtype=qdtype, device=x.device)
    scale = torch.empty((S, D if per_channel else T), dtype=torch.float32, device=x.device)
    if S and T and D:
        block_d = next_pow2(D)
        meta = dict(HEAD_DIM=D, QMAX=QMAX[qdtype], IS_FP8=qdtype == torch.float8_e4m3fn,
                    INTERPRET=is_interpreter(), HW_CAST=_hw_cast(x), num_warps=4)
        strides = (x3.stride(0), x3.stride(1), q.stride(0), q.stride(1), scale.stride(0))
        if per_channel:
            block_d = min(block_d, 64)
            # Segments of up to 256 tokens (kvd's chunks) are quantized from registers in one read;
            # longer ones take two passes over T (max, then quantize; the re-read hits L2).
            one_pass = T <= 256
            block_t = next_pow2(T) if one_pass else (16 if is_interpreter() else 32)
            _quantize_keys_kernel[(S, triton.cdiv(D, block_d))](
                x3, q, scale, T, *strides, BLOCK_T=block_t, BLOCK_D=block_d, ONE_PASS=one_pass, **meta)
        else:
            block_t = 16 if is_interpreter() else max(1, 4096 // block_d)
            _quantize_values_kernel[(S, triton.cdiv(T, block_t))](
                x3, q, scale, T, *strides, BLOCK_T=block_t, BLOCK_D=block_d, **meta)
    if x.dim() == 2:
        return q[0], scale[0]
    return q, scale


def _dequantize(q, scale, dtype, per_channel):
    if q.dtype not in QMAX:
        raise ValueError(f"q has dtype {q.dtype}; expected torch.float8_e4m3fn or torch.int8")
    check_last_dim_contiguous("q", q)
    if dtype not in KV_DTYPES:
        raise ValueError(f"dtype {dtype} unsupported; expected one of {KV_DTYPES}")
    q3 = _as_3d("q", q)
    S, T, D = q3.shape
    s2 = scale[None] if scale.dim() == 1 else scale
    if s2.shape != (S, D if per_channel else T) or s2.dtype != torch.float32 or s2.stride(-1) != 1:
        raise ValueError(f"scale must be contiguous fp32 {(S, D if per_channel else T)}, got {s2.dtype} "
                         f"{tuple(s2.shape)}")
    x = torch.empty(q3.shape, dtype=dtype, device=q.device)
    if S and T and D:
        block_d = next_pow2(D)
        block_t = 16 if is_interpreter() else max(1, 4096 // block_d)
        _dequantize_kernel[(S, triton.cdiv(T, block_t))](
            q3, s2, x, T, q3.stride(0), q3.stride(1), x.stride(0), x.stride(1), s2.stride(0),
            HEAD_DIM=D, BLOCK_T=block_t, BLOCK_D=block_d, PER_CHANNEL=per_channel, INTERPRET=is_interpreter(),
            num_warps=4)
    return x[0] if q.dim() == 2 else x


def quantize_keys(k: torch.Tensor, *, qdtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys ``[S, T, D]`` -> (codes of qdtype ``[S, T, D]``, per-channel fp32 scales ``[S, D]``)."""
    return _quantize(k, qdtype, per_channel=True)


def quantize_values(v: torch.Tensor, *, qdtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Values ``[S, T, D]`` -> (codes ``[S, T, D]``, per-token fp32 scales ``[S, T]``)."""
    return _quantize(v, qdtype, per_channel=False)


def dequantize_keys(q: torch.Tensor, scale: torch.Tensor, *, dtype: torch.dtype) -> torch.Tensor:
    """Codes ``[S, T, D]`` and per-channel scales ``[S, D]`` -> keys of ``dtype``."""
    return _dequantize(q, scale, dtype, per_channel=True)


def dequantize_values(q: torch.Tensor, scale: torch.Tensor, *, dtype: torch.dtype) -> torch.Tensor:
    """Codes ``[S, T, D]`` and per-token scales ``[S, T]`` -> values of ``dtype``."""
    return _dequantize(q, scale, dtype, per_channel=False)


def _quantize_ref(x, qdtype, per_channel):
    _check_quant(x, qdtype)
    qmax = QMAX[qdtype]
    xf = x.float()
    amax = xf.abs().amax(dim=-2 if per_channel else -1)
    # a tensor divisor: torch on CUDA divides by a Python scalar as a multiply by its reciprocal,
    # which is not the IEEE quotient the codec specifies (differs in the last bit now and then)
    scale = amax / torch.full_like(amax, qmax)
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    y = (xf / (scale.unsqueeze(-2) if per_channel else scale.unsqueeze(-1))).clamp(-qmax, qmax)
    q = y.to(qdtype) if qdtype == torch.float8_e4m3fn else torch.round(y).to(qdtype)
    return q, scale


def quantize_keys_ref(k: torch.Tensor, *, qdtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain torch, same signature and result as ``quantize_keys``."""
    return _quantize_ref(k, qdtype, per_channel=True)


def quantize_values_ref(v: torch.Tensor, *, qdtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain torch, same signature and result as ``quantize_values``."""
    return _quantize_ref(v, qdtype, per_channel=False)


def dequantize_keys_ref(q: torch.Tensor, scale: torch.Tensor, *, dtype: torch.dtype) -> torch.Tensor:
    """Plain torch, same signature and result as ``dequantize_keys``."""
    return (q.float() * scale.unsqueeze(-2)).to(dtype)


def dequantize_values_ref(q: torch.Tensor, scale: torch.Tensor, *, dtype: torch.dtype) -> torch.Tensor:
    """Plain torch, same signature and result as ``dequantize_values``."""
    return (q.float() * scale.unsqueeze(-1)).to(dtype)


__all__ = [
    "QMAX",
    "dequantize_keys", "dequantize_keys_ref", "dequantize_values", "dequantize_values_ref",
    "quantize_keys", "quantize_keys_ref", "quantize_values", "quantize_values_ref",
]
