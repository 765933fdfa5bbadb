"""Head maps: which KV heads of a model are global and which are local (sink + recent window).

A head map is produced by the head profiler (``kvd.calibrate.profiler``) from a calibration run
on the real model, stored as versioned JSON (``config/heads/*.json``) and registered with the daemon
together with the model. Every (layer, KV head) is classified; each local head carries its own sink
and window, so a map may give heads different windows where that buys bytes.

JSON shape (format 1)::

    {"format": 1, "model": "smollm2-135m", "fingerprint": "…" | null,
     "num_layers": 30, "num_kv_heads": 3,
     "heads": [[{"class": "global"}, {"class": "local", "sink": 4, "window": 256}, …], …],
     "scores": {"edge_mass": [[…]], …} | null, "calibration": {…} | null, "method": "…"}
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from kvd.core.errors import HeadMapError

if TYPE_CHECKING:
    from kvd.core.keys import ModelSpec

HEADMAP_FORMAT = 1


class HeadSpec(BaseModel):
    """One KV head. Global heads see the whole context; local heads ``[0, sink) ∪ (i - window, i]``."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    head_class: Literal["global", "local"] = Field(alias="class")
    sink: int = Field(default=0, ge=0, le=1 << 20)
    window: int = Field(default=0, ge=0, le=1 << 24)

    @model_validator(mode="after")
    def _local_needs_window(self) -> HeadSpec:
        if self.head_class == "local" and self.window <= 0:
            raise ValueError("a local head needs window > 0 (tokens of recent context it keeps)")
        return self

    @property
    def is_global(self) -> bool:
        return self.head_class == "global"

    def kept_tokens(self, seq_len: int) -> int:
        """Tokens of a ``seq_len`` context this head keeps: all, or sink ∪ last ``window``."""
        if self.is_global:
            return seq_len
        return min(seq_len, self.sink + self.window)


class HeadMap(BaseModel):
    """Every (layer, KV head) of one model: global, or local with its sink and window (JSON above).

    Read-only views for the hot paths (``sinks``, ``windows``, ``global_heads``, ``is_all_global``)
    are computed once per map and cached on it (the map is frozen, so they cannot go stale;
    ``model_copy`` drops them).
    """

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    format: int = HEADMAP_FORMAT
    model: str = Field(min_length=1)
    fingerprint: str | None = None
    num_layers: int = Field(gt=0, le=4096)
    num_kv_heads: int = Field(gt=0, le=4096)
    heads: list[list[HeadSpec]]
    method: str = "manual"
    scores: dict[str, list[list[float]]] | None = None
    calibration: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _shape(self) -> HeadMap:
        if self.format != HEADMAP_FORMAT:
            raise ValueError(f"format {self.format} is not supported (this kvd reads format {HEADMAP_FORMAT})")
        if len(self.heads) != self.num_layers:
            raise ValueError(f"heads lists {len(self.heads)} layers, num_layers says {self.num_layers}")
        for layer, row in enumerate(self.heads):
            if len(row) != self.num_kv_heads:
                raise ValueError(
                    f"heads[{layer}] lists {len(row)} KV heads, num_kv_heads says {self.num_kv_heads}"
                )
        for name, grid in (self.scores or {}).items():
            if len(grid) != self.num_layers or any(len(r) != self.num_kv_heads for r in grid):
                raise ValueError(f"scores[{name!r}] is not a [num_layers][num_kv_heads] grid")
        return self

    # ---- construction -------------------------------------------------------------------------

    @classmethod
    def all_global(cls, model: str, num_layers: int, num_kv_heads: int) -> HeadMap:
        """The map kvd uses when a model has none: every head keeps everything (plain offloading)."""
        row = [HeadSpec(head_class="global")] * num_kv_heads
        return cls(model=model, num_layers=num_layers, num_kv_heads=num_kv_heads,
                   heads=[list(row) for _ in range(num_layers)], method="all_global")

    @classmethod
    def from_classes(
        cls,
        model: str,
        is_global: list[list[bool]],
        *,
        sink: int,
        window: int | list[list[int]],
        **extra: Any,
    ) -> HeadMap:
        """Build from a boolean grid; ``window`` is one value or a per-head grid."""
        rows = []
        for layer, flags in enumerate(is_global):
            row = []
            for head, g in enumerate(flags):
                w = window if isinstance(window, int) else window[layer][head]
                row.append(HeadSpec(head_class="global") if g
                           else HeadSpec(head_class="local", sink=sink, window=w))
            rows.append(row)
        return cls(model=model, num_layers=len(rows), num_kv_heads=len(rows[0]) if rows else 0,
                   heads=rows, **extra)

    @classmethod
    def parse(cls, doc: dict[str, Any] | str | bytes, *, source: str = "head map") -> HeadMap:
        try:
            if isinstance(doc, (str, bytes)):
                return cls.model_validate_json(doc)
            return cls.model_validate(doc)
        except ValidationError as e:
            first = e.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "(top level)"
            raise HeadMapError(f"{source}: {where}: {first['msg']}; fix the file or re-run the head "
                               f"profiler (kvctl profile MODEL_DIR --out FILE)") from None

    @classmethod
    def load(cls, path: str | Path) -> HeadMap:
        p = Path(path)
        try:
            raw = p.read_bytes()  # bytes: pydantic's JSON parser names what is wrong with text that is not UTF-8
        except OSError as e:
            raise HeadMapError(f"cannot read head map {p}: {e.strerror}") from None
        return cls.parse(raw, source=str(p))

    def shard(self, heads: list[int], *, model: str, fingerprint: str | None) -> HeadMap:
        """The part of this map one tensor-parallel rank holds: its KV ``heads`` (``tp_heads``), in order,
        under the rank's own model name and fingerprint (each rank registers a model of its own)."""
        if not heads or any(not 0 <= h < self.num_kv_heads for h in heads):
            raise HeadMapError(f"heads {heads} are not KV heads of {self.model!r} ({self.num_kv_heads} per layer)")
        scores = None if self.scores is None else {
            name: [[row[h] for h in heads] for row in grid] for name, grid in self.scores.items()}
        return HeadMap(model=model, fingerprint=fingerprint, num_layers=self.num_layers, num_kv_heads=len(heads),
                       heads=[[row[h] for h in heads] for row in self.heads], method=self.method, scores=scores,
                       calibration=self.calibration)

    def save(self, path: str | Path) -> None:
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_suffix(p.suffix + ".tmp")
        tmp.write_text(self.to_json())
        tmp.replace(p)

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json", by_alias=True, exclude_none=True), indent=1) + "\n"

    # ---- queries ------------------------------------------------------------------------------

    def check_fits(self, num_layers: int, num_kv_heads: int, *, model: str = "the model") -> None:
        """Raise ``HeadMapError`` unless the map covers exactly this many layers and KV heads."""
        if self.num_layers != num_layers or self.num_kv_heads != num_kv_heads:
            raise HeadMapError(
                f"head map for {self.model!r} has {self.num_layers} layers × {self.num_kv_heads} KV heads, "
                f"{model} has {num_layers} × {num_kv_heads}; re-run the head profiler for it"
            )

    def spec(self, layer: int, head: int) -> HeadSpec:
        return self.heads[layer][head]

    def is_global(self, layer: int, head: int) -> bool:
        return self.heads[layer][head].is_global

    def global_heads(self, layer: int) -> list[int]:
        """KV heads of ``layer`` that are global, ascending (a new list each call)."""
        return list(self._heads_by_class[layer][0])

    def local_heads(self, layer: int) -> list[int]:
        """KV heads of ``layer`` that are local, ascending (a new list each call)."""
        return list(self._heads_by_class[layer][1])

    # Grids in the form attention kernels take (``window == 0`` marks a global head, whose sink is 0
    # too, whatever its JSON says). Cached: the page pool and the prefill read them per layer and call.

    @cached_property
    def sinks(self) -> tuple[tuple[int, ...], ...]:
        """``[layer][head] -> sink`` in tokens; 0 for global heads."""
        return tuple(tuple(0 if s.is_global else s.sink for s in row) for row in self.heads)

    @cached_property
    def windows(self) -> tuple[tuple[int, ...], ...]:
        """``[layer][head] -> window`` in tokens; 0 marks a global head."""
        return tuple(tuple(0 if s.is_global else s.window for s in row) for row in self.heads)

    @cached_property
    def is_all_global(self) -> bool:
        """Every head keeps everything: the map changes nothing (plain offloading)."""
        return all(s.is_global for row in self.heads for s in row)

    @cached_property
    def _heads_by_class(self) -> tuple[tuple[tuple[int, ...], tuple[int, ...]], ...]:
        # [layer] -> (global heads, local heads)
        return tuple((tuple(h for h, s in enumerate(row) if s.is_global),
                      tuple(h for h, s in enumerate(row) if not s.is_global)) for row in self.heads)

    def model_copy(self, *, update: Mapping[str, Any] | None = None, deep: bool = False) -> HeadMap:
        """pydantic's copy, minus the cached views (``update`` may change ``heads``)."""
        copied = super().model_copy(update=update, deep=deep)
        for name in [k for k in copied.__dict__ if k not in type(self).model_fields]:
            del copied.__dict__[name]
        return copied

    def class_grid(self) -> list[list[bool]]:
        """``[layer][head] -> is_global``."""
        return [[s.is_global for s in row] for row in self.heads]

    @property
    def num_global(self) -> int:
        return sum(s.is_global for row in self.heads for s in row)

    @property
    def global_ratio(self) -> float:
        return self.num_global / (self.num_layers * self.num_kv_heads)

    def max_window(self) -> int:
        return max((s.sink + s.window for row in self.heads for s in row if not s.is_global), default=0)

    def kv_fraction(self, seq_len: int) -> float:
        """KV bytes this map keeps for a ``seq_len`` context, over the bytes full KV keeps."""
        if seq_len <= 0:
            return 1.0
        kept = sum(s.kept_tokens(seq_len) for row in self.heads for s in row)
        return kept / (seq_len * self.num_layers * self.num_kv_heads)


def tp_heads(total: int, rank: int, size: int) -> list[int]:
    """The KV heads tensor-parallel rank ``rank`` of ``size`` holds, as vLLM (``QKVParallelLinear``) and
    SGLang split them: a contiguous ``total // size`` of them when there are at least as many heads as
    ranks, else one head, replicated over ``size // total`` consecutive ranks."""
    if not 0 <= rank < size:
        raise HeadMapError(f"tensor-parallel rank {rank} is not one of {size}")
    if total >= size:
        if total % size:
            raise HeadMapError(f"{total} KV heads do not split over {size} tensor-parallel ranks")
        n = total // size
        return list(range(rank * n, (rank + 1) * n))
    if size % total:
        raise HeadMapError(f"{total} KV heads do not replicate evenly over {size} tensor-parallel ranks")
    return [rank // (size // total)]


def load_for_rank(path: str | Path, spec: ModelSpec, *, whole: ModelSpec | None = None, rank: int = 0,
                  size: int = 1) -> HeadMap:
    """An engine's head map for ``spec``: the file at ``path`` as it is, or, for tensor-parallel rank
    ``rank`` of ``size`` (``spec`` the rank's model, ``whole`` the unsplit model's), the rank's part of
    the whole model's map. A map profiled for another model (its fingerprint, or its layer and head
    counts) is refused, naming both, before anything registers."""
    hm = HeadMap.load(Path(path).expanduser())
    if size > 1 and whole is None:
        raise HeadMapError("a tensor-parallel rank's head map needs the whole model's spec")
    model = whole if size > 1 and whole is not None else spec  # the map's model: checked for every rank count
    if hm.fingerprint is not None and hm.fingerprint != model.fingerprint():
        raise HeadMapError(f"head map {path} was profiled for the model with fingerprint {hm.fingerprint}; "
                           f"{model.model_id} has {model.fingerprint()}: profile one for it (kvctl profile)")
    if size > 1:
        hm.check_fits(model.num_layers, model.num_kv_heads, model=model.model_id)
        hm = hm.shard(tp_heads(model.num_kv_heads, rank, size), model=f"{hm.model} [tp{rank}/{size}]",
                      fingerprint=None if hm.fingerprint is None else spec.fingerprint())
    hm.check_fits(spec.num_layers, spec.num_kv_heads, model=spec.model_id)
    return hm
