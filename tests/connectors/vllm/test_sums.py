"""``LoadSums`` fed by ``StridedCopier``: each extent's rows, hashed as the copier copies a layer, add
up to the daemon's whole-extent xxh3 when the layers come in order; out of order or incomplete, the
extents are hashed whole instead; a changed byte is found whichever way, and named by its entry's
first token; the copies themselves are what they are without sums."""

from __future__ import annotations

import pytest
import torch
import xxhash

from kvd.client.views import ExtentView, numpy_view
from kvd.connectors.vllm.copy import Piece, make_copier
from kvd.connectors.vllm.layout import BlockLayout, known_layout
from kvd.connectors.vllm.sums import LoadSums
from kvd.core.extents import plan_extents
from kvd.core.headmap import HeadMap
from kvd.core.keys import ModelSpec

L, H, D, N = 4, 3, 8, 16
T = 2 * N
SPEC = ModelSpec("m", num_layers=L, num_kv_heads=H, head_dim=D, kv_dtype="bfloat16")
# head 1 is local in every layer but one, so one class's heads are not consecutive there
HM = HeadMap.from_classes("m", [[h != 1 or i == 2 for h in range(H)] for i in range(L)], sink=4, window=8)


def extents(n: int) -> list[list[ExtentView]]:
    g = torch.Generator().manual_seed(n)
    return [[ExtentView(p, v, 0, 0, xxhash.xxh3_64_hexdigest(numpy_view(v)))
             for p in plan_extents(SPEC, HM, T).values()
             for v in [torch.randn(p.num_segments, 2, T, D, generator=g).bfloat16()]] for _ in range(n)]


def load(ext, layers_order, *, sums: bool):
    to = known_layout("LBHNC_KT", H, N, D)
    fr = torch.empty_like(to)
    fr[to] = torch.arange(to.numel())
    kv = [torch.zeros(8, H, N, 2 * D, dtype=torch.bfloat16) for _ in range(L)]
    cp = make_copier(BlockLayout("LBHNC_KT", H, N, D, to, fr), kv[0])
    pieces = [Piece([2 * i, 2 * i + 1], 0, T, e) for i, e in enumerate(ext)]
    s = LoadSums([(i * T, p) for i, p in enumerate(pieces)], L) if sums else None
    for layer in layers_order:
        cp.load_layer(kv[layer], layer, pieces)
        if s is not None:
            s.layer_copied(layer)
    return s, kv


@pytest.mark.parametrize("order", ["in-order", "reversed", "missing-a-layer"])
def test_sums_fed_by_the_copier_match_the_whole_extents_and_find_a_changed_byte(order):
    layers = {"in-order": list(range(L)), "reversed": list(range(L))[::-1], "missing-a-layer": list(range(L - 1))}[order]
    ext = extents(3)
    clean, kv = load(ext, layers, sums=True)
    assert len(clean) == 3 * len(ext[0]) and clean.failures() == []
    _, plain = load(ext, layers, sums=False)
    assert all(torch.equal(a, b) for a, b in zip(kv, plain))
    ext[1][-1].view.view(torch.int16)[-1, 1, -1, -1] ^= 1  # the last byte of entry 1
    ext[2][0].view.view(torch.int16)[0, 0, 0, 0] ^= 1  # the first of entry 2
    sums, _ = load(ext, layers, sums=True)
    assert sums.failures() == [T, 2 * T]
