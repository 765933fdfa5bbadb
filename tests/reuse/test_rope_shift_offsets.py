"""The RoPE shift of an assembled context (``assemble_cached`` rotates a ``[S, L*Hkv, D]`` view whose
heads are ``S * D`` elements apart) past 2**31 elements: a Llama-3-8B context of 64K tokens has 256
such heads of 8M elements. The kernel runs through Triton's interpreter, in a child process, since an
int32 offset that wraps reads and writes outside the tensor (a segfault, or another head's keys)."""

from __future__ import annotations

import os
import subprocess
import sys

CHILD = """
import torch
from kvd.gpu_kernels import rope_shift, rope_shift_ref
S = 2 ** 30  # elements between heads: head 2 starts at element 2**31
base = torch.empty(2 * S + 4, dtype=torch.float32)  # 8 GiB of address space, three rows touched
k = base.as_strided((1, 3, 4), (4, S, 1))
for h in range(3):
    k[0, h] = torch.tensor([1.0, 2.0, 3.0, 4.0]) * (h + 1)
ref = k.clone()
inv = torch.tensor([1.0, 0.5])
rope_shift_ref(ref, inv, torch.tensor([3], dtype=torch.int32))
rope_shift(k, inv, torch.tensor([3], dtype=torch.int32))
assert torch.allclose(k, ref, atol=1e-5), (k, ref)
"""


def test_rope_shift_reaches_heads_past_2_31_elements():
    env = dict(os.environ, TRITON_INTERPRET="1")
    res = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, (res.returncode, res.stderr[-2000:])
