"""Byte planes: split matches the reference (codec order: plane i = byte i) and merge inverts it."""

from __future__ import annotations

import pytest
import torch

from kvd.gpu_kernels import merge_byte_planes, merge_byte_planes_ref, split_byte_planes, split_byte_planes_ref


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("shape", [(3, 1000), (5,), (2, 64, 128)], ids=["S3x1000", "S5", "S2x64x128"])
def test_split_matches_reference_and_merge_inverts(shape, dtype, poison):
    g = torch.Generator().manual_seed(11)
    x = (torch.randn(shape, generator=g) * 100).to(dtype)
    planes = split_byte_planes(x)
    assert planes.shape == (x.element_size(), x.numel())
    assert torch.equal(planes, split_byte_planes_ref(x))
    back = merge_byte_planes(planes, dtype=dtype, shape=shape)
    assert torch.equal(back.view(torch.uint8), x.view(torch.uint8))
    assert torch.equal(merge_byte_planes_ref(planes, dtype=dtype, shape=shape).view(torch.uint8), x.view(torch.uint8))


def test_bf16_high_plane_holds_sign_and_exponent():
    x = torch.tensor([1.0, -2.0], dtype=torch.bfloat16)  # 0x3F80, 0xC000
    assert split_byte_planes(x).tolist() == [[0x80, 0x00], [0x3F, 0xC0]]


def test_empty_and_bad_input():
    assert split_byte_planes(torch.empty(0, dtype=torch.bfloat16)).shape == (2, 0)
    with pytest.raises(ValueError, match="contiguous"):
        split_byte_planes(torch.zeros(4, 4, dtype=torch.bfloat16).t())
    with pytest.raises(ValueError, match="planes"):
        merge_byte_planes(torch.zeros(3, 4, dtype=torch.uint8), dtype=torch.bfloat16)
