"""Extent layout: where each (layer, KV head) segment of an entry lies inside its extents.

An entry's segments are packed per head class into **extents** so transfers stay large: one extent
holds every global-head segment of the entry, another every local-head segment (a model without a
head map has one ``global`` extent). Inside an extent, segments are ordered layer-major, then by head,
and each segment is ``K[T, D]`` immediately followed by ``V[T, D]`` in the KV dtype.

Worked example, SmolLM2 (30 layers × 3 KV heads, D=64, bf16), a 256-token chunk, head 0 global in
every layer: segment = 2 × 256 × 64 × 2 B = 64 KiB; the global extent holds (0,0), (1,0), … (29,0):
30 segments, 1.875 MiB, layer l at byte l × 64 KiB; the local extent holds (0,1), (0,2), (1,1), …:
60 segments, layer l's head 2 at (2l + 1) × 64 KiB.

The daemon and every client compute the same plan from the registered model and head map, so the
control API only carries extent offsets, never per-segment tables.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

from kvd.core.headmap import HeadMap
from kvd.core.keys import ModelSpec

HEAD_CLASSES = ("global", "local")


@dataclass(frozen=True)
class ExtentPlan:
    head_class: str
    heads: tuple[tuple[int, int], ...]  # (layer, kv head), layer-major
    num_tokens: int
    head_dim: int
    dtype_bytes: int

    @property
    def segment_bytes(self) -> int:
        return 2 * self.num_tokens * self.head_dim * self.dtype_bytes

    @property
    def nbytes(self) -> int:
        return self.segment_bytes * len(self.heads)

    @property
    def num_segments(self) -> int:
        return len(self.heads)

    @cached_property
    def _index(self) -> dict[tuple[int, int], int]:
        return {lh: i for i, lh in enumerate(self.heads)}

    def segment_index(self, layer: int, head: int) -> int:
        return self._index[(layer, head)]

    @cached_property
    def blocks(self) -> tuple[tuple[int, int, int, int, int], ...]:
        """Rectangles ``(layer0, layer1, head0, head1, first_segment)`` tiling the extent in order.

        Segments of a rectangle are consecutive in the extent, so a copy between the extent and a
        ``kv[L, 2, H, T, D]`` tensor is one strided copy per rectangle instead of one per segment.
        Example: heads (0,0), (1,0), (2,0) -> ((0, 3, 0, 1, 0),); (0,1), (0,2), (1,2) -> ((0, 1, 1, 3, 0),
        (1, 2, 2, 3, 2)).
        """
        rects: list[list[int]] = []
        i = 0
        while i < len(self.heads):
            layer, h0 = self.heads[i]
            j = i + 1
            while j < len(self.heads) and self.heads[j] == (layer, h0 + (j - i)):
                j += 1
            h1 = h0 + (j - i)
            whole_layer = j == len(self.heads) or self.heads[j][0] != layer
            prev = rects[-1] if rects else None
            if (prev is not None and whole_layer and prev[1] == layer and prev[2:4] == [h0, h1]
                    and prev[5]):  # prev also spans whole layers
                prev[1] = layer + 1
            else:
                starts_layer = i == 0 or self.heads[i - 1][0] != layer
                rects.append([layer, layer + 1, h0, h1, i, int(whole_layer and starts_layer)])
            i = j
        return tuple((r[0], r[1], r[2], r[3], r[4]) for r in rects)

    def layer_span(self, layer: int) -> tuple[int, int]:
        """``[first, last)`` segment indices of ``layer`` (consecutive, since the order is layer-major)."""
        idx = [i for i, (lyr, _) in enumerate(self.heads) if lyr == layer]
        return (idx[0], idx[-1] + 1) if idx else (0, 0)


def plan_extents(spec: ModelSpec, head_map: HeadMap | None, num_tokens: int) -> dict[str, ExtentPlan]:
    """``head class -> ExtentPlan`` for an entry of ``num_tokens`` tokens; classes without heads are absent."""
    hm = head_map or HeadMap.all_global(spec.model_id, spec.num_layers, spec.num_kv_heads)
    plans: dict[str, ExtentPlan] = {}
    for cls in HEAD_CLASSES:
        heads = tuple(
            (layer, head)
            for layer in range(spec.num_layers)
            for head in range(spec.num_kv_heads)
            if (hm.is_global(layer, head)) == (cls == "global")
        )
        if heads:
            plans[cls] = ExtentPlan(cls, heads, num_tokens, spec.head_dim, spec.dtype_bytes)
    return plans
