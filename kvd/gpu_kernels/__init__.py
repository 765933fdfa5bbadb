"""Triton kernels of kvd, each with a plain-torch reference of the same signature (``*_ref``).

Imports only torch and triton. The references run anywhere (the CPU backend, tests); the kernels run
on CUDA GPUs and, for tests, on the CPU under ``TRITON_INTERPRET=1``. Shapes and contracts are in each
module's docstring; docs/kernels.md has the overview and the H200 measurements.

- ``segpaged_decode``: SegPagedAttention decode over per-(request, KV head) page lists (flash-decoding).
- ``segpaged_prefill``: varlen causal prefill/extend with per-head sink + window visibility.
- ``gather_segments`` / ``scatter_segments``: vLLM paged KV layouts <-> contiguous per-head segments.
- ``rope_shift``: rotate cached keys by a position delta, in place.

The fp8/int8 quantization and byte-plane kernels were removed (issue 18): the cold codecs run on the
host, where records are written from the arena, so no product path called them (docs/gpu.md).
"""

from kvd.gpu_kernels.gather_scatter import (
    LAYOUTS,
    gather_segments,
    gather_segments_ref,
    scatter_segments,
    scatter_segments_ref,
)
from kvd.gpu_kernels.rope_shift import rope_shift, rope_shift_ref
from kvd.gpu_kernels.segpaged_decode import segpaged_decode
from kvd.gpu_kernels.segpaged_prefill import segpaged_prefill
from kvd.gpu_kernels.segpaged_ref import segpaged_decode_ref, segpaged_prefill_ref

__all__ = [
    "LAYOUTS",
    "gather_segments", "gather_segments_ref", "scatter_segments", "scatter_segments_ref",
    "rope_shift", "rope_shift_ref",
    "segpaged_decode", "segpaged_decode_ref", "segpaged_prefill", "segpaged_prefill_ref",
]
