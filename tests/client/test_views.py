"""The copies between an entry's extents and an engine's KV: the host path (numpy views) moves the
same bytes as torch's own strided copy, into views, never into a silent copy."""

import numpy as np
import torch

from kvd.client.views import EntryView, ExtentView, extent_to_kv_views, host_arrays
from kvd.core.extents import plan_extents
from kvd.core.keys import ModelSpec

SPEC = ModelSpec("views", num_layers=3, num_kv_heads=2, head_dim=8, kv_dtype="bfloat16")
T = 16


def _entry(arena: torch.Tensor, num_tokens: int = T) -> EntryView:
    plan = plan_extents(SPEC, None, num_tokens)["global"]
    view = arena[: plan.num_segments * 2 * num_tokens * 8].view(plan.num_segments, 2, num_tokens, 8)
    return EntryView("e", num_tokens, (ExtentView(plan, view),))


def test_host_copies_move_the_same_bytes_as_torch_strided_copies():
    g = torch.Generator().manual_seed(0)
    big = torch.randn(3, 2, 2, 3 * T, 8, generator=g).to(torch.bfloat16)
    kv = big[:, :, :, T:]  # a strided source: not the start of its storage, not contiguous
    arena = torch.zeros(4096, dtype=torch.bfloat16)
    e = _entry(arena)
    e.write_from(kv, T)  # tokens T..2T of kv, through numpy views
    ref = torch.zeros_like(arena)
    plan, view = e.extents[0].plan, _entry(ref).extents[0].view
    for part, src in extent_to_kv_views(plan, view, kv, T):  # the torch path
        part.copy_(src)
    assert torch.equal(arena, ref) and arena.abs().sum() > 0

    out = torch.zeros(3, 2, 2, 2 * T, 8, dtype=torch.bfloat16)[:, :, :, :T + 5]  # strided destination
    e.read_into(out, 2, 12)  # the entry's first 12 tokens to positions 2..14
    assert torch.equal(out[:, :, :, 2:14], kv[:, :, :, T:T + 12])
    assert not out[:, :, :, :2].any() and not out[:, :, :, 14:].any()


def test_host_arrays_keeps_tensors_off_the_host_as_they_are():
    a, b = torch.zeros(4), torch.zeros(4, device="meta")
    assert isinstance(host_arrays(a, a)[0], np.ndarray)
    assert host_arrays(b, a) == (b, a)


def test_numpy_pairs_are_views_of_the_extent_and_the_kv_even_when_strided():
    plan = plan_extents(SPEC, None, T)["global"]
    rows = np.zeros((plan.num_segments, 2, 2 * T, 8), dtype=np.int16)[:, :, ::2]  # a strided extent
    kv = np.zeros((3, 2, 2, 2 * T, 8), dtype=np.int16)
    for part, src in extent_to_kv_views(plan, rows, kv, T):
        assert np.shares_memory(part, rows) and np.shares_memory(src, kv)
        np.copyto(part, 7)
        np.copyto(src, 5)
    assert (rows == 7).all() and (kv[:, :, :, T:] == 5).all() and not kv[:, :, :, :T].any()
