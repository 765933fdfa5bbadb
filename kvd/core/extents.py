"""Extent layout: where each (layer, KV head) segment of an entry lies inside its extents.

An entry's segments are packed per head class into **extents** so transfers stay large: one extent
holds every global-head segment of the entry; local heads are packed by their visibility, one extent
per distinct ``(sink, window)`` of the head map (a *window group*), so that placement and head-aware
loads honour each head's own window while an extent still holds many segments. A model without a
head map has one ``global`` extent. Inside an extent, segments are ordered layer-major, then by head,
and each segment is ``K[T, D]`` immediately followed by ``V[T, D]`` in the KV dtype.

Class names: ``global``; ``local`` when every local head has the same sink and window (the common
case, and the name earlier kvd used); otherwise ``local.s<sink>.w<window>`` per group, e.g. the
shipped SmolLM2 map's six groups ``local.s4.w64`` … ``local.s4.w1536``. ``class_kind`` maps a name to
``global`` or ``local`` (metrics, write policies and ``classes=["local"]`` filters use the kind).
A map with more than ``MAX_LOCAL_GROUPS`` distinct windows is grouped by window rounded up to a
power of two (sink: the group's largest): an extent is then kept for its widest head, which errs on
the side of keeping bytes, never of losing them.

Worked example, SmolLM2 (30 layers × 3 KV heads, D=64, bf16), a 256-token chunk, head 0 global in
every layer: segment = 2 × 256 × 64 × 2 B = 64 KiB; the global extent holds (0,0), (1,0), … (29,0):
30 segments, 1.875 MiB, layer l at byte l × 64 KiB; the local extent holds (0,1), (0,2), (1,1), …:
60 segments, layer l's head 2 at (2l + 1) × 64 KiB.

The daemon and every client compute the same plan from the registered model and head map, so the
control API only carries extent offsets, never per-segment tables.

**Trimmed extents** (capacity mode, ``kvd.policies.placement``): a local group's extent may keep only
the tokens ``[first_token, first_token + num_tokens)`` of its entry that readers of the stored sequence
read (its sink, or the start of its window inside the chunk). The layout is the same with fewer tokens
per segment; ``entry_tokens`` says how many the entry holds, and lease answers carry the span
(``ExtentInfo.tokens``), so a client derives the trimmed plan with ``trim``. ``keep_span`` is the
rule, a pure function of the entry, so the daemon rebuilding its index from records finds the same
span; ``covers`` says whether a trimmed extent holds all a reader at a position reads.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, replace
from functools import cached_property

from kvd.core.headmap import HeadMap
from kvd.core.keys import ModelSpec

HEAD_CLASSES = ("global", "local")  # the kinds; an extent's class name is one of these or local.s<S>.w<W>
MAX_LOCAL_GROUPS = 8  # more distinct windows than this: grouped by power-of-two window


def class_kind(head_class: str) -> str:
    """``global`` or ``local`` for an extent class name (``local.s4.w64`` -> ``local``)."""
    return "global" if head_class == "global" else "local"


def local_class(sink: int, window: int) -> str:
    return f"local.s{sink}.w{window}"


def matches(head_class: str, wanted: str) -> bool:
    """A class filter entry: an exact name, or a kind (``local`` names every local group)."""
    return head_class == wanted or (wanted == "local" and class_kind(head_class) == "local")


def needed(plan: ExtentPlan, start_token: int, num_tokens: int, position: int) -> bool:
    """Does a reader whose next query sits at ``position`` read this extent of an entry holding tokens
    ``[start_token, start_token + num_tokens)``? Global extents: always. A local group: if the tokens
    overlap its sink ``[0, sink)`` or the stored keys its window shows that query,
    ``(position - window, position)`` (the query's own key is computed, not loaded; later queries see
    less of the stored part, never more)."""
    if plan.window == 0:
        return True
    end = start_token + num_tokens
    return start_token < plan.sink or (end > position - plan.window + 1 and start_token < position)


def keep_span(plan: ExtentPlan, start_token: int, num_tokens: int, end_token: int) -> tuple[int, int] | None:
    """The entry tokens ``[lo, hi)`` (relative to the entry) of a local group's extent that head-aware
    readers of the stored sequence read, the span placement keeps hot: the sink's tokens and the
    window before a query at ``end_token`` or ``end_token - 1`` (the same prompt again), i.e.
    ``[end - window, end)``; the hull when both fall in one entry. None: nothing (the extent is cold).
    Global extents (window 0) keep everything. Example: window 64, entry ``[3840, 4096)`` of a
    4097-token sequence -> ``(193, 256)``; sink 4, entry ``[0, 256)`` of it -> ``(0, 4)``."""
    if plan.window == 0:
        return 0, num_tokens
    lo, hi = num_tokens, 0
    if start_token < plan.sink:
        lo, hi = 0, min(plan.sink - start_token, num_tokens)
    w0 = max(end_token - plan.window - start_token, 0)
    if w0 < num_tokens and end_token > start_token:
        lo, hi = min(lo, w0), num_tokens
    return (lo, hi) if lo < hi else None


def _holds_sink(plan: ExtentPlan, start_token: int, num_tokens: int) -> bool:
    """A trimmed extent holds all of the sink that falls in its entry (if any does)."""
    lo, hi = plan.span
    return start_token >= plan.sink or (lo == 0 and hi >= min(plan.sink - start_token, num_tokens))


def covers(plan: ExtentPlan, start_token: int, num_tokens: int, position: int) -> bool:
    """Does this extent (trimmed or whole) hold every token of its entry a head-aware reader whose next
    query sits at ``position`` reads (``needed``'s rule: the sink, and the stored keys of
    ``(position - window, position)``)?"""
    if not plan.is_trimmed:
        return True
    if not _holds_sink(plan, start_token, num_tokens):
        return False
    lo, hi = plan.span
    w0 = max(position - plan.window + 1 - start_token, 0)  # the window's stored keys in this entry
    w1 = min(position - start_token, num_tokens)
    return w0 >= w1 or (lo <= w0 and w1 <= hi)


def trimmed_from(plan: ExtentPlan, start_token: int, num_tokens: int) -> float:
    """The least position from which a trimmed extent ``covers`` what a reader reads, at every position
    after it too: a span ending before its entry does (the sink chunk) once the window has passed the
    entry, one starting inside it once the window starts at or after the span; never without the sink."""
    if not _holds_sink(plan, start_token, num_tokens):
        return math.inf
    lo, hi = plan.span
    if hi < num_tokens:
        return start_token + num_tokens + plan.window - 1
    return start_token + lo + plan.window - 1


@dataclass(frozen=True)
class ExtentPlan:
    head_class: str
    heads: tuple[tuple[int, int], ...]  # (layer, kv head), layer-major
    num_tokens: int
    head_dim: int
    dtype_bytes: int
    sink: int = 0  # local groups: the sink and window every head of the group reads (0, 0: global)
    window: int = 0
    first_token: int = 0  # trimmed extents: the entry token the extent starts at (module doc)
    entry_tokens: int | None = None  # trimmed extents: the entry's tokens; None: the extent holds them all

    @property
    def is_trimmed(self) -> bool:
        return self.entry_tokens is not None

    @property
    def span(self) -> tuple[int, int]:
        """``[lo, hi)``: the entry's tokens this extent holds."""
        return self.first_token, self.first_token + self.num_tokens

    def trim(self, lo: int, hi: int) -> ExtentPlan:
        """This (whole) extent's layout keeping only the entry's tokens ``[lo, hi)``."""
        if self.is_trimmed or not 0 <= lo < hi <= self.num_tokens:
            raise ValueError(f"cannot trim {self.head_class} ({self.num_tokens} tokens"
                             f"{', trimmed already' if self.is_trimmed else ''}) to [{lo}, {hi})")
        return replace(self, num_tokens=hi - lo, first_token=lo, entry_tokens=self.num_tokens)

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
    def layout(self) -> str:
        """Which heads the extent holds, and how (class, members, sink, window, head_dim, dtype), as 16 hex
        digits; not its tokens (a trimmed extent has its whole form's). The model fingerprint leaves the
        head map out, so daemons that register one model with different head maps name extents alike
        that hold other heads: records carry this (``kvd.tiers.record``) so neither is served as the other."""
        doc = repr((self.head_class, self.heads, self.sink, self.window, self.head_dim, self.dtype_bytes))
        return hashlib.blake2b(doc.encode(), digest_size=8).hexdigest()

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
    """``head class -> ExtentPlan`` for an entry of ``num_tokens`` tokens: ``global`` first, then the
    local window groups by ascending window; classes without heads are absent."""
    hm = head_map or HeadMap.all_global(spec.model_id, spec.num_layers, spec.num_kv_heads)
    groups = local_groups(hm)
    members: dict[tuple[int, int] | None, list[tuple[int, int]]] = {None: []}
    for g in groups.values():
        members.setdefault(g, [])
    for layer in range(spec.num_layers):
        for head in range(spec.num_kv_heads):
            members[groups.get((layer, head))].append((layer, head))
    plans: dict[str, ExtentPlan] = {}
    if members[None]:
        plans["global"] = ExtentPlan("global", tuple(members[None]), num_tokens, spec.head_dim, spec.dtype_bytes)
    keys = sorted({g for g in groups.values()}, key=lambda g: (g[1], g[0]))
    for sink, window in keys:
        name = "local" if len(keys) == 1 else local_class(sink, window)
        plans[name] = ExtentPlan(name, tuple(members[(sink, window)]), num_tokens, spec.head_dim,
                                 spec.dtype_bytes, sink=sink, window=window)
    return plans


def local_groups(hm: HeadMap) -> dict[tuple[int, int], tuple[int, int]]:
    """``(layer, head) -> (sink, window)`` of its extent, for every local head (see the module doc)."""
    exact = {(layer, head): (s.sink, s.window) for layer, row in enumerate(hm.heads)
             for head, s in enumerate(row) if not s.is_global}
    if len(set(exact.values())) <= MAX_LOCAL_GROUPS:
        return exact
    bucket = {lh: 1 << max(w - 1, 0).bit_length() for lh, (_, w) in exact.items()}
    sinks: dict[int, int] = {}
    for lh, (sink, _) in exact.items():
        sinks[bucket[lh]] = max(sinks.get(bucket[lh], 0), sink)
    return {lh: (sinks[b], b) for lh, b in bucket.items()}
