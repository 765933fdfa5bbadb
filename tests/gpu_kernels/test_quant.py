"""fp8 / int8 quantization: codes and scales bit-exact against the reference (the codec's math).

Ragged: T not a multiple of the tile, an all-zero channel and token (scale 1.0), -0.0, values in the
e4m3 subnormal range, mantissa carries (e.g. 126.2 -> 128), and a strided view of a segment buffer.
"""

from __future__ import annotations

import pytest
import torch

from kvd.gpu_kernels import (
    dequantize_keys,
    dequantize_keys_ref,
    dequantize_values,
    dequantize_values_ref,
    quantize_keys,
    quantize_keys_ref,
    quantize_values,
    quantize_values_ref,
)

QDTYPES = [torch.float8_e4m3fn, torch.int8]


def _kv(S, T, D, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(S, T, D, generator=g) * torch.logspace(-4, 2, D)  # channels of very different scale
    x[0, :, 1] = 0.0  # zero channel
    x[-1, T // 2] = 0.0  # zero token
    x[0, 0, 0] = -0.0
    return x.to(dtype)


def _codes(q):
    return q.view(torch.uint8)


@pytest.mark.parametrize("qdtype", QDTYPES, ids=["fp8", "int8"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("shape", [(3, 37, 64), (2, 128, 128), (1, 5, 128), (1, 300, 64)],
                         ids=["S3-T37-D64", "S2-T128-D128", "S1-T5-D128", "S1-T300-D64-two-pass"])
def test_quantize_bit_exact_and_dequantize(shape, dtype, qdtype, poison):
    x = _kv(*shape, dtype, seed=sum(shape))
    for name, quant, quant_ref, deq, deq_ref in (
        ("keys", quantize_keys, quantize_keys_ref, dequantize_keys, dequantize_keys_ref),
        ("values", quantize_values, quantize_values_ref, dequantize_values, dequantize_values_ref),
    ):
        q, s = quant(x, qdtype=qdtype)
        q_ref, s_ref = quant_ref(x, qdtype=qdtype)
        assert torch.equal(s, s_ref), f"{name} scales differ"
        bad = int((_codes(q) != _codes(q_ref)).sum())
        assert bad == 0, f"{name}: {bad} codes differ from the reference"
        back = deq(q, s, dtype=dtype)
        assert torch.equal(back.view(torch.int16), deq_ref(q, s, dtype=dtype).view(torch.int16)), f"{name} dequant"
        # the format's error: int8 half a step (scale / 2); e4m3 half an ulp (2^-4 relative, 2^-10 scale
        # below the normal range); then the rounding of the result to the KV dtype (2^-8 relative)
        err = (back.float() - x.float()).abs()
        scale = s[..., None, :] if name == "keys" else s[..., :, None]
        ax = x.float().abs()
        if qdtype == torch.int8:
            bound = 0.5 * scale + ax * 2.0 ** -7
        else:
            bound = ax * (2.0 ** -4 + 2.0 ** -7) + scale * 2.0 ** -10
        assert (err <= bound * 1.0001 + 1e-7).all(), f"{name} dequant error above the format's"  # + fp16 subnormal ulp


@pytest.mark.parametrize("qdtype", QDTYPES, ids=["fp8", "int8"])
def test_quantize_strided_segment_view_and_2d(qdtype):
    """K of each segment in a canonical buffer [S, (K, V), T, D] is a strided view; 2-D input works too."""
    buf = _kv(4, 40, 64, torch.bfloat16, seed=9).reshape(2, 2, 40, 64)
    k = buf[:, 0]
    q, s = quantize_keys(k, qdtype=qdtype)
    q_ref, s_ref = quantize_keys_ref(k, qdtype=qdtype)
    assert torch.equal(s, s_ref) and torch.equal(_codes(q), _codes(q_ref))
    q2, s2 = quantize_values(buf[1, 1], qdtype=qdtype)
    q2_ref, s2_ref = quantize_values_ref(buf[1, 1], qdtype=qdtype)
    assert q2.shape == (40, 64) and s2.shape == (40,)
    assert torch.equal(s2, s2_ref) and torch.equal(_codes(q2), _codes(q2_ref))


def test_fp8_rounding_edges():
    """Ties to even, mantissa carry into the exponent, subnormals, saturation at 448."""
    row = torch.tensor([448.0, 126.2, 127.9, -31.5, 0.0137, 0.00098, -0.0009, 0.0, 17.0, 19.0, 440.0, 6.0])
    v = row[None, None, :].repeat(1, 2, 1)  # per-token max is 448: scale 1.0 exactly
    q, s = quantize_values(v, qdtype=torch.float8_e4m3fn)
    q_ref, _ = quantize_values_ref(v, qdtype=torch.float8_e4m3fn)
    assert float(s[0, 0]) == 1.0
    assert torch.equal(_codes(q), _codes(q_ref))


def test_rejects_bad_arguments():
    with pytest.raises(ValueError, match="qdtype"):
        quantize_keys(torch.randn(4, 8), qdtype=torch.int16)
    with pytest.raises(ValueError, match="scale"):
        dequantize_values(torch.zeros(2, 4, 8, dtype=torch.int8), torch.ones(2, 8), dtype=torch.bfloat16)
