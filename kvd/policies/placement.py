"""Head-aware placement: for one extent, hot (kept in the host arena) or cold (SSD only), and the
codec it gets on SSD.

The store packs an entry's segments into one extent per head class: the global heads, and one per
local *window group* (local heads of one sink and window, ``kvd.core.extents``). Global heads read
every earlier token, so their KV stays hot. A local head reads only its first ``sink`` tokens and the
last ``window`` tokens before the query, so a group's extent is needed hot only if the entry's tokens
overlap ``[0, sink)`` or the group's own window at the end of the sequence as known at store time;
elsewhere it goes cold, and may be compressed harder (``codec.local_cold_codec``) or not kept at all
(``drop``). Each group is placed by its own window: in the shipped SmolLM2 map the 64-token heads
go cold one chunk from the end, the 1536-token heads six chunks from it.

Codec on SSD (settings ``[codec]``):

| extent                         | hot | SSD codec                                           |
| ------------------------------ | --- | --------------------------------------------------- |
| global head                    | yes | ``global_cold_codec`` (lossless unless configured)  |
| local head, inside the window  | yes | ``hot_codec`` (raw or lossless: never lossy)        |
| local head, outside the window | no  | ``local_cold_codec`` (lossless, fp8, int8) or none (drop) |

Window rule: a local head's query at position ``p`` sees the stored keys ``(p − window, p)``
(``kvd.core.extents.needed``, the rule head-aware readers lease by). Placement keeps hot what a
reader of this very sequence reads, whether it sits at ``end_token`` (a longer prompt that continues
it) or at ``end_token − 1`` (the same prompt again: an engine computes at least its last token):
``[end − window, end)``. Tokens are ``[start_token, start_token + num_tokens)``.

Trimming (capacity mode): a hot local extent of which readers read only part — the chunk holding the
sink (4 tokens of 256), the chunk where a window starts — keeps only that span
(``kvd.core.extents.keep_span``; ``Placement.keep``) when ``local_cold_codec = drop`` and the entry
is a prefix computed under a head map. Only then: the operator chose to drop what head-aware readers
do not read, and KV computed under a head map has no exact reader (exact readers never see such an
entry: ``computed_under`` differs). An exact prefix keeps whole extents, so vLLM's hits while it is in
the arena stay hits. A trim that would save less than ``MIN_TRIM_SAVING`` of the extent is not made
(each costs a copy at commit): a window starting one token into a chunk keeps the whole chunk.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from kvd.core.config import CodecSettings
from kvd.core.errors import InvalidRequest
from kvd.core.extents import ExtentPlan, class_kind, keep_span, needed
from kvd.core.keys import EXACT

MIN_TRIM_SAVING = 0.125  # trim an extent only when that frees at least this share of its tokens


@dataclass(slots=True, frozen=True)
class Placement:
    is_hot: bool  # keep in the host arena
    ssd_codec: str | None  # codec when written to SSD; None: never written (local_cold_codec = drop)
    reason: str  # "global", "local_sink", "local_window", "local_cold"
    keep: tuple[int, int] | None = None  # trim to these entry tokens [lo, hi) (module doc); None: whole

    @property
    def is_dropped(self) -> bool:
        """Cold and not kept on SSD either: the extent is freed when it leaves the arena."""
        return not self.is_hot and self.ssd_codec is None


class HeadClassPlacement:
    def __init__(self, codec: CodecSettings) -> None:
        self.codec = codec

    def place(self, head_class: Literal["global", "local"], *, start_token: int, num_tokens: int,
              end_token: int | None, sink: int, window: int, trim: bool = False) -> Placement:
        """Placement of one extent of ``head_class`` holding tokens ``[start, start + num_tokens)``
        of a sequence that was ``end_token`` long at store time (None: the entry ends it). ``trim``:
        a hot local extent read only in part keeps only that part (module doc)."""
        if start_token < 0 or num_tokens <= 0 or sink < 0 or window < 0:
            raise InvalidRequest(f"placement of tokens [{start_token}, +{num_tokens}) with sink {sink}, "
                                 f"window {window}: all must be ≥ 0 and num_tokens > 0")
        if head_class == "global":
            return Placement(True, self.codec.global_cold_codec, "global")
        if head_class != "local":
            raise InvalidRequest(f"head class {head_class!r} is not 'global' or 'local'")
        end = start_token + num_tokens if end_token is None else max(end_token, start_token + num_tokens)
        plan = ExtentPlan("local", (), num_tokens, 0, 0, sink=sink, window=max(window, 1))
        keep = None
        if trim and (span := keep_span(plan, start_token, num_tokens, end)) is not None:
            keep = span if span[1] - span[0] <= (1 - MIN_TRIM_SAVING) * num_tokens else None
        if start_token < sink:
            return Placement(True, self.codec.hot_codec, "local_sink", keep)
        if needed(plan, start_token, num_tokens, end) or needed(plan, start_token, num_tokens, end - 1):
            return Placement(True, self.codec.hot_codec, "local_window", keep)
        cold = self.codec.local_cold_codec
        return Placement(False, None if cold == "drop" else cold, "local_cold")

    def place_entry(self, plans: dict[str, ExtentPlan], *, start_token: int, num_tokens: int,
                    end_token: int | None, kind: str = "prefix", computed_under: str = EXACT) -> dict[str, Placement]:
        """Placement of each of an entry's extents (``plans``: class -> plan), each local window group
        by its own sink and window; trimmed where the module doc says."""
        trim = self.codec.local_cold_codec == "drop" and kind == "prefix" and computed_under != EXACT
        return {c: self.place(class_kind(c), start_token=start_token, num_tokens=num_tokens,  # type: ignore[arg-type]
                              end_token=end_token, sink=p.sink, window=p.window, trim=trim)
                for c, p in plans.items()}
