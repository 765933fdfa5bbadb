"""What the vLLM connector's copiers move: ``Piece``, tokens of one chunk entry and the kernel blocks
that hold them, and ``LayerRows``, where one layer's segments of a head class lie in an extent."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from kvd.client.views import numpy_view
from kvd.core.extents import ExtentPlan


@dataclass
class Piece:
    """Tokens ``[t0, t1)`` of one chunk entry. ``t0`` is on a block; ``t1`` too, except at the end of a
    load that stops before the prompt's last token (that block is filled in part)."""

    block_ids: Sequence[int]  # kernel blocks holding tokens t0..t1-1, in token order
    t0: int
    t1: int
    extents: list[tuple[ExtentPlan, torch.Tensor]]  # per head class: plan, [num_segments, 2, T, D] view
    _arrays: list | None = field(default=None, init=False, repr=False)
    _tokens_major: list | None = field(default=None, init=False, repr=False)
    sums: list | None = field(default=None, init=False, repr=False)  # per extent: a running xxh3, or None

    def arrays(self) -> list:
        """``extents`` as ``(plan, numpy view)`` pairs (CPU views only), made once: a load or store
        slices them for every layer, and slicing numpy costs a fraction of slicing torch."""
        if self._arrays is None:
            self._arrays = [(e[0], numpy_view(e[1])) for e in self.extents]
        return self._arrays

    def tokens_major(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per extent, its K and V of tokens ``[t0, t1)`` as ``[tokens, segments, D]`` views (what an
        engine's cache write takes as keys and values once sliced to a layer's rows), made once."""
        if self._tokens_major is None:
            self._tokens_major = [(v[:, 0, self.t0 : self.t1].permute(1, 0, 2), v[:, 1, self.t0 : self.t1].permute(1, 0, 2))
                                  for _, v, *_ in self.extents]
        return self._tokens_major


class LayerRows:
    """``(plan, layer) -> (first segment, end segment, heads)`` with heads a slice where consecutive."""

    def __init__(self) -> None:
        self._cache: dict[tuple[str, int, int], tuple[int, int, slice | list[int]]] = {}

    def __call__(self, plan: ExtentPlan, layer: int):
        key = (plan.head_class, plan.num_tokens, layer)
        got = self._cache.get(key)
        if got is None:
            s0, s1 = plan.layer_span(layer)
            heads = [h for _, h in plan.heads[s0:s1]]
            hs: slice | list[int] = slice(heads[0], heads[-1] + 1) if heads and heads == list(
                range(heads[0], heads[-1] + 1)) else heads
            got = self._cache[key] = (s0, s1, hs)
        return got
