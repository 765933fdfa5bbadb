"""RoPE shift against its torch reference, and against re-applying the model's RoPE at new positions.

Tolerance vs the reference: one output ulp (the kernel's cos/sin and FMA contraction may round the
fp32 result differently); in fp32, 1e-5 relative. Against a fresh RoPE at the new position: 2e-3,
since the model's own fp32 angle pos * inv_freq rounds differently from delta * inv_freq.
"""

from __future__ import annotations

import pytest
import torch

from kvd.gpu_kernels import rope_shift, rope_shift_ref

ULP = {torch.bfloat16: 2.0 ** -7, torch.float16: 2.0 ** -10, torch.float32: 1e-5}


def _inv_freq(D, base=500000.0):
    return 1.0 / (base ** (torch.arange(0, D, 2, dtype=torch.float32) / D))


def _llama3_inv_freq(D, base=500000.0, factor=8.0, low=1.0, high=4.0, original=8192):
    """Llama-3.1 'llama3' rope_scaling: per-band rescaled frequencies (just another inv_freq array)."""
    inv = _inv_freq(D, base)
    wavelen = 2 * torch.pi / inv
    low_wl, high_wl = original / low, original / high
    smooth = (original / wavelen - low) / (high - low)
    scaled = torch.where(wavelen > low_wl, inv / factor, inv)
    mid = (wavelen <= low_wl) & (wavelen >= high_wl)
    return torch.where(mid, (1 - smooth) * inv / factor + smooth * inv, scaled)


def _rope(x, pos, inv_freq):
    """The model's RoPE (NeoX halves) in fp32: x [T, H, D] at positions pos [T]."""
    freqs = pos.float()[:, None] * inv_freq[None, :]
    emb = torch.cat([freqs, freqs], dim=-1)
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return x * emb.cos()[:, None, :] + torch.cat([-x2, x1], dim=-1) * emb.sin()[:, None, :]


CASES = [
    # id, T, H, D, delta (int or "per-token")
    ("T37-H3-D128-d100000", 37, 3, 128, 100000),
    ("T20-H8-D64-d-517", 20, 8, 64, -517),
    ("T9-H2-D64-d0", 9, 2, 64, 0),
    ("T33-H5-D128-per-token", 33, 5, 128, "per-token"),
    ("T16-H1-D64-per-token", 16, 1, 64, "per-token"),
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_rope_shift_matches_reference(case, dtype, close):
    _, T, H, D, delta = case
    g = torch.Generator().manual_seed(T * H)
    if delta == "per-token":
        delta = torch.randint(-4000, 140000, (T,), generator=g, dtype=torch.int32)
    k = (torch.randn(T, H, D, generator=g) * 3).to(dtype)
    inv = _inv_freq(D)
    out, ref = k.clone(), k.clone()
    assert rope_shift(out, inv, delta) is out
    rope_shift_ref(ref, inv, delta)
    close("k shifted", out, ref, atol=ULP[dtype] * 8, rtol=ULP[dtype])


def test_rope_shift_of_strided_view_touches_only_the_view(close):
    """Keys of 2 heads out of 4 in a page-pool-like [T, 4, D] tensor; the others stay as they were."""
    g = torch.Generator().manual_seed(3)
    pool = torch.randn(12, 4, 64, generator=g).to(torch.bfloat16)
    before = pool.clone()
    view = pool[:, 1:3]
    inv = _llama3_inv_freq(64)
    ref = view.clone()
    rope_shift(view, inv, 4096)
    rope_shift_ref(ref, inv, 4096)
    close("view", pool[:, 1:3], ref, atol=2 ** -4, rtol=2 ** -7)
    assert torch.equal(pool[:, [0, 3]], before[:, [0, 3]])


@pytest.mark.parametrize("inv_name", ["default", "llama3"])
def test_shift_equals_rope_at_the_new_position(inv_name, close):
    """k at positions s.. shifted by d - s equals RoPE applied directly at d.. (fp32)."""
    D = 128
    inv = _inv_freq(D) if inv_name == "default" else _llama3_inv_freq(D)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(24, 2, D, generator=g)
    src = torch.arange(24) + 7
    dst = torch.arange(24) * 3 + 5000  # per-token targets, as when chunks land at different offsets
    k = _rope(x, src, inv)
    rope_shift(k, inv, (dst - src).int())
    close("shifted vs fresh RoPE", k, _rope(x, dst, inv), atol=2e-3, rtol=1e-3)


def test_shift_there_and_back_is_identity(close):
    k = torch.randn(10, 2, 64).to(torch.float16)
    back = k.clone()
    inv = _inv_freq(64)
    rope_shift(back, inv, 77777)
    rope_shift(back, inv, -77777)
    close("round trip", back, k, atol=4e-3, rtol=4e-3)


def test_rejects_bad_arguments():
    k = torch.randn(4, 2, 64)
    with pytest.raises(ValueError, match="inv_freq"):
        rope_shift(k, torch.ones(64), 1)
    with pytest.raises(ValueError, match="delta"):
        rope_shift(k, _inv_freq(64), torch.ones(5, dtype=torch.int32))
    with pytest.raises(ValueError, match="contiguous"):
        rope_shift(torch.randn(64, 4).t(), _inv_freq(4), 1)


def test_rejects_strided_delta_and_inv_freq():
    """The kernel reads delta and inv_freq with unit stride: strided views must be refused, not read
    as if contiguous (a [::2]-like delta rotated tokens by their neighbours' zeros)."""
    k = torch.randn(4, 2, 64)
    delta = torch.stack([torch.tensor([3, -5, 7, 100]), torch.zeros(4, dtype=torch.int64)], 1)[:, 0]
    inv = torch.stack([_inv_freq(64), torch.zeros(32)], 1)[:, 0]
    assert delta.stride() == (2,) and inv.stride() == (2,)
    with pytest.raises(ValueError, match="delta.*contiguous"):
        rope_shift(k, _inv_freq(64), delta)
    with pytest.raises(ValueError, match="inv_freq.*contiguous"):
        rope_shift(k, inv, 5)
