"""A reuse request: segments, where they land in the assembled context, and how it is prefilled.

A request is an ordered list of ``Segment``s (system prompt, documents, question). A segment marked
``reusable`` has a **chunk entry**: its KV computed on its own at positions ``[0, n)`` and kept under
the content hash of its tokens, so it can be reused at any position of any later request. Segments
are laid end to end: segment ``i`` occupies ``[offset_i, offset_i + n_i)`` of the assembled context
and its cached keys are RoPE-shifted by ``offset_i``.

When to mark a segment reusable (docs/chunk_reuse.md): it comes back in other requests at other
positions (retrieved documents, tool outputs, few-shot blocks) and is long enough that its KV is worth
a lookup (tens of tokens or more). The question, and anything that appears once, is not.

Methods (``ReuseConfig.method``), all prefilling the same assembled context in one forward:

| method       | tokens whose hidden states are computed        | KV kept from that forward              |
| ------------ | ---------------------------------------------- | -------------------------------------- |
| ``recompute``| all, every layer (the reference)               | all heads                              |
| ``kvd``      | all, every layer (with Sparse FFN "freeze": all up to its layer, then the selected) | all heads (``local_kv="recomputed"``, the default); or global heads only, local heads keeping the cached KV (``"cached"``, RedKnot's rule) |
| ``naive``    | uncached tokens only                           | all heads, uncached tokens             |
| ``cacheblend``| all in layers ≤ check layer, then the ``ratio`` of cached tokens whose check-layer K deviates most (+ uncached) | all heads, those tokens |
| ``epic``     | the first ``epic_tokens`` of each cached segment + uncached tokens | all heads, those tokens |

``kvd`` attends with the head map (global heads: whole context; local heads: sink + window); the
baselines attend with full KV. Sparse FFN (``SparseFfn``) may be added to any method; the benchmarks
use it with ``kvd``. Where cached KV is not kept, the forward's own KV is (a token nothing is cached
for is always computed). docs/chunk_reuse.md has the measurements behind the defaults.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import torch

METHODS = ("recompute", "kvd", "naive", "cacheblend", "epic")


@dataclass(slots=True, frozen=True)
class Segment:
    """A run of tokens of a request; ``reusable`` segments are stored and looked up as chunk entries."""

    token_ids: tuple[int, ...]
    reusable: bool = False

    def __init__(self, token_ids: Sequence[int] | torch.Tensor, reusable: bool = False) -> None:
        shape = tuple(getattr(token_ids, "shape", ()))  # a tensor or array: one row, [n] or [1, n]
        if len(shape) > 1 and any(d != 1 for d in shape[:-1]):
            raise ValueError(f"a segment is one sequence of token ids, not a batch of shape {shape}: "
                             "one request per row")
        ids = token_ids.reshape(-1).tolist() if hasattr(token_ids, "reshape") else list(token_ids)
        if not ids:
            raise ValueError("a segment needs at least one token")
        object.__setattr__(self, "token_ids", tuple(int(t) for t in ids))
        object.__setattr__(self, "reusable", bool(reusable))

    def __len__(self) -> int:
        return len(self.token_ids)


@dataclass(slots=True, frozen=True)
class SparseFfn:
    """Sparse FFN: in layers ``>= dense_layers`` the FFN runs only on the tokens that carry ``mass`` of
    the attention-output mass (L2 norm of each token's attention output over heads and dims), plus
    the last ``recent_tokens`` tokens and at least ``min_keep``; the rest keep their residual stream
    unchanged. ``mass >= 1`` runs every token (exact)."""

    mass: float = 0.6
    dense_layers: int = 2
    recent_tokens: int = 128
    min_keep: int = 1
    # Budgeted variant: keep the ``keep_fraction`` of tokens with the largest importance (instead of
    # a mass threshold), so the FFN's cost is the same on every model and input.
    keep_fraction: float | None = None
    # "output_norm": L2 norm of the token's attention output (RedKnot); "attention": attention the
    # token receives from the last ``recent_tokens`` queries through the layer's global heads;
    # "kv_deviation": how far the global heads' recomputed K is from the cached K (CacheBlend's
    # signal, restricted to the heads kvd recomputes)
    importance: str = "output_norm"
    # What happens to a token that skips the FFN: "identity" (its residual passes unchanged and it
    # goes on to the next layer; every layer from ``dense_layers`` on selects again) or "freeze" (one
    # selection, at layer ``dense_layers``: a token not selected leaves the forward, and from the
    # next layer on every head uses its cached KV; tokens without cached KV are never frozen)
    skipped: str = "identity"

    def __post_init__(self) -> None:
        if (not 0.0 < self.mass or self.dense_layers < 0 or self.recent_tokens < 0 or self.min_keep < 1
                or (self.keep_fraction is not None and not 0.0 <= self.keep_fraction <= 1.0)
                or self.importance not in ("output_norm", "attention", "kv_deviation") or self.skipped not in ("identity", "freeze")):
            raise ValueError(f"bad Sparse FFN settings {self}: mass > 0, dense_layers >= 0, recent_tokens >= 0, "
                             "min_keep >= 1, keep_fraction in [0, 1], importance output_norm or attention")

    @property
    def is_dense(self) -> bool:
        return self.keep_fraction is None and self.mass >= 1.0 or self.keep_fraction == 1.0


@dataclass(slots=True, frozen=True)
class ReuseConfig:
    method: str = "kvd"
    sparse_ffn: SparseFfn | None = None
    cacheblend_ratio: float = 0.15  # share of cached tokens CacheBlend recomputes
    cacheblend_layer: int = 1  # the check layer (CacheBlend's code uses layer 1)
    epic_tokens: int = 32  # tokens recomputed at the start of each cached segment (EPIC's LegoLink)
    # kvd: which KV the local heads keep for cached tokens that the forward recomputes: "recomputed"
    # (the forward's, as global heads do; the default, see docs/chunk_reuse.md for the measurements)
    # or "cached" (RedKnot: the chunk's own KV, RoPE-shifted, as issue 7 describes)
    local_kv: str = "recomputed"
    # kvd: the first tokens of each cached segment never keep cached local-head KV (it was computed
    # as the start of a sequence: attention sinks in the middle of the context) and Sparse FFN
    # never freezes them
    boundary_tokens: int = 32

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown reuse method {self.method!r}; use one of {', '.join(METHODS)}")
        if (not 0.0 <= self.cacheblend_ratio <= 1.0 or self.epic_tokens < 0 or self.cacheblend_layer < 0
                or self.boundary_tokens < 0 or self.local_kv not in ("cached", "recomputed")):
            raise ValueError(f"bad reuse settings {self}")

    @property
    def uses_cache(self) -> bool:
        return self.method != "recompute"

    @property
    def freezes(self) -> bool:
        return self.sparse_ffn is not None and self.sparse_ffn.skipped == "freeze"

    @property
    def reads_cache(self) -> bool:
        """Whether any cached KV enters the result. kvd with recomputed local KV and no frozen tokens
        recomputes every head of every token, so it skips the chunk store altogether."""
        if self.method == "kvd":
            return self.local_kv == "cached" or self.freezes
        return self.uses_cache

    @property
    def cache_classes(self) -> list[str] | None:
        """Head classes of the chunk entries the method reads (None: all). kvd without frozen tokens
        reads only the local heads' extents: it recomputes the global heads."""
        if self.method == "kvd" and not self.freezes:
            return ["local"]
        return None


# The methods the benchmarks compare, by result-key name, and their settings (one place, so that the
# CPU fidelity run and the GPU speed run measure the same thing).
BENCH_METHODS = ("recompute", "kvd", "kvd_sparse_ffn", "naive", "cacheblend", "epic", "kvd_cached_local")
# Chosen by a sweep on the H200 (docs/chunk_reuse.md, "Choosing the Sparse FFN setting"): select at layer 4
# by the attention the last 128 queries pay through the global heads, keep 25% of the cached tokens. On
# held-out requests it was the most accurate setting that kept kvd+Sparse FFN >= 2.5x faster than recompute
# at 32K tokens; the earlier setting (layer 2, attention-output norm, 15%) was 3.7x but lost to EPIC.
SPARSE_FFN = SparseFfn(dense_layers=4, recent_tokens=128, keep_fraction=0.25, importance="attention",
                       skipped="freeze")


def method_config(name: str) -> ReuseConfig:
    """``ReuseConfig`` of a benchmark method name (``BENCH_METHODS``): ``kvd`` with the defaults,
    ``kvd_sparse_ffn`` adds ``SPARSE_FFN``, ``kvd_cached_local`` keeps the chunks' local-head KV.
    ``kvd_sparse_ffn[keep_fraction=0.3,dense_layers=4]`` overrides ``SPARSE_FFN`` fields (for sweeps)."""
    if name.startswith("kvd_sparse_ffn[") and name.endswith("]"):
        fields = {}
        for item in filter(None, name[len("kvd_sparse_ffn["):-1].split(",")):
            key, _, value = item.partition("=")
            if key not in SparseFfn.__dataclass_fields__:
                raise ValueError(f"{name!r}: {key!r} is not a SparseFfn field")
            kind = type(getattr(SPARSE_FFN, key))
            fields[key] = value if kind is str else (float(value) if key in ("mass", "keep_fraction") else int(value))
        return ReuseConfig("kvd", sparse_ffn=replace(SPARSE_FFN, **fields))
    if name == "kvd_sparse_ffn":
        return ReuseConfig("kvd", sparse_ffn=SPARSE_FFN)
    if name == "kvd_cached_local":
        return ReuseConfig("kvd", local_kv="cached")
    if name in METHODS:
        return ReuseConfig(name)
    raise ValueError(f"unknown benchmark method {name!r}; use one of {', '.join(BENCH_METHODS)}")


@dataclass(slots=True, frozen=True)
class Assembly:
    """Segments laid end to end. ``reused[t]``: token t comes with cached (shifted) KV."""

    token_ids: torch.Tensor  # [S] long
    offsets: tuple[int, ...]  # per segment
    lengths: tuple[int, ...]
    reused_segments: tuple[bool, ...]  # per segment: has a cached chunk entry in this request
    reused: torch.Tensor = field(repr=False)  # [S] bool

    @property
    def num_tokens(self) -> int:
        return int(self.token_ids.numel())

    def first_tokens(self, k: int) -> torch.Tensor:
        """``[S]`` bool: the first ``k`` tokens of every reused segment."""
        mask = torch.zeros(self.num_tokens, dtype=torch.bool)
        for off, n, r in zip(self.offsets, self.lengths, self.reused_segments):
            if r:
                mask[off : off + min(k, n)] = True
        return mask


def assemble(segments: Sequence[Segment], cached: Sequence[bool]) -> Assembly:
    """Lay ``segments`` end to end; ``cached[i]``: segment i's chunk KV is available."""
    if len(cached) != len(segments):
        raise ValueError(f"{len(cached)} cache flags for {len(segments)} segments")
    offsets, lengths, off = [], [], 0
    for s in segments:
        offsets.append(off)
        lengths.append(len(s))
        off += len(s)
    ids = torch.tensor([t for s in segments for t in s.token_ids], dtype=torch.long)
    reused = torch.zeros(off, dtype=torch.bool)
    for o, n, c in zip(offsets, lengths, cached):
        if c:
            reused[o : o + n] = True
    return Assembly(ids, tuple(offsets), tuple(lengths), tuple(bool(c) for c in cached), reused)


__all__ = ["BENCH_METHODS", "METHODS", "Assembly", "ReuseConfig", "SPARSE_FFN", "Segment", "SparseFfn", "assemble",
           "method_config"]
