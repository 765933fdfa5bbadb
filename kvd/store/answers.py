"""Answers built from entries: lookup rows, extent offsets for clients, and the hit counters.

Kept apart from the store's operations because these are pure functions of the index: what a reader
is told about an entry, and how the hit-rate metrics count it.

Hit accounting (``count_hits``): a lookup adds the tokens it asks about to ``kvd_lookup_tokens_total``
and the tokens a reader can actually load to ``kvd_hit_tokens_total``, each once per lookup, so their
ratio is a hit rate ≤ 100 %: for prefix entries only the leading run of complete entries counts (a hit
after a missing chunk cannot be used), capped at the reader's ``max_tokens``; labels say the kind and
the tier the tokens will be read from, never the head class (that counted every token twice).
"""

from __future__ import annotations

from dataclasses import dataclass

from kvd.core import protocol as P
from kvd.core.protocol_gpu import GpuPoolInfo
from kvd.core.protocol_lookup import prefix_hit_tokens
from kvd.daemon.metrics import Metrics
from kvd.store.entries import Entry
from kvd.store.index import Level
from kvd.tiers.gpu import GpuTier


@dataclass(slots=True)
class EntryRow:
    """Server-side form of ``EntryStatus``: building pydantic objects per lookup cost more than the
    lookup itself (3 µs each), so the daemon answers from these rows and ``LookupResult.to_json``."""

    index: int
    hash: str
    tier: str
    classes: tuple[str, ...]
    complete: bool
    num_tokens: int


@dataclass(slots=True)
class LookupResult:
    chunk_tokens: int
    num_prefix_hits: int
    prefix: list[EntryRow]
    chunks: list[EntryRow]

    def to_json(self) -> bytes:
        """Exactly the JSON of the equivalent ``LookupResponse`` (a test holds the two together)."""

        # Formatted directly: hashes, tiers and class names are the daemon's own ASCII tokens, so no
        # escaping is needed, and this is about twice as fast as json.dumps of the same dicts.
        def rows(rs: list[EntryRow]) -> str:
            return ",".join([
                f'{{"index":{r.index},"hash":"{r.hash}","tier":"{r.tier}","classes":{_names(r.classes)},'
                f'"complete":{"true" if r.complete else "false"},"num_tokens":{r.num_tokens}}}' for r in rs])

        return (f'{{"chunk_tokens":{self.chunk_tokens},"num_prefix_hits":{self.num_prefix_hits},'
                f'"prefix":[{rows(self.prefix)}],"chunks":[{rows(self.chunks)}]}}').encode()


_NAMES_JSON: dict[tuple[str, ...], str] = {}


def _names(key: tuple[str, ...]) -> str:
    """JSON of a list of head-class names, cached: a lookup answer repeats the same one or two lists
    in every row (this halves the daemon's time to write a 128-row answer)."""
    out = _NAMES_JSON.get(key)
    if out is None:
        out = "[" + ",".join(f'"{n}"' for n in key) + "]"
        if len(_NAMES_JSON) < 1024:  # head classes are few; never grow without bound
            _NAMES_JSON[key] = out
    return out


RowParts = tuple[str, tuple[str, ...], bool]  # (tier, classes, complete): what a row says of its entry


def row_parts(levels: list[Level], by_name: dict[str, Level], e: Entry, accept_lossy: bool,
              want: list[str] | None = None) -> RowParts | None:
    """What a lookup row says of ``e`` for a reader (``accept_lossy``; ``want``: the classes it reads,
    default all), or None when it can load nothing of it. ``complete``: every class it reads is there.

    ``tier``: the slowest tier the reader must read from (each extent from its fastest usable copy),
    i.e. what loading it costs: an entry whose cold local extent sits on SSD reads ``ssd``.
    """
    classes, slowest = [], -1
    for c, x in e.extents.items():
        if want is not None and c not in want:
            continue
        # The fastest usable copy: its level is the lowest. Extents have one or two copies, so this
        # walks the copies, not the levels.
        best = -1
        for tier, cp in x.copies.items():
            if accept_lossy or not cp.is_lossy:
                lv = by_name[tier].level
                if best < 0 or lv < best:
                    best = lv
        if best >= 0:
            classes.append(c)
            if best > slowest:
                slowest = best
    if not classes:
        return None
    complete = len(classes) == (len(e.extents) if want is None else len(want))
    return levels[slowest].name, tuple(classes), complete


_UNSET = object()


def cached_parts(levels: list[Level], by_name: dict[str, Level], e: Entry, accept_lossy: bool) -> RowParts | None:
    """``row_parts`` of ``e`` for a reader of every class, from the entry's cache (``Entry.rows``,
    emptied whenever a copy or a plan of the entry changes), computed once per change."""
    parts = e.rows.get(accept_lossy, _UNSET)
    if parts is _UNSET:
        parts = e.rows[accept_lossy] = row_parts(levels, by_name, e, accept_lossy)
    return parts


def row(levels: list[Level], by_name: dict[str, Level], e: Entry, index: int, hash_: str, num_tokens: int,
        accept_lossy: bool, want: list[str] | None = None) -> EntryRow | None:
    """The lookup row of ``e`` (``row_parts``) at ``index`` of the request, or None."""
    parts = row_parts(levels, by_name, e, accept_lossy, want)
    return None if parts is None else EntryRow(index, hash_, *parts, num_tokens)


def leading_hits(rows: list[EntryRow]) -> int:
    """Leading prefix entries stored completely: what an exact engine can load."""
    hits = 0
    for r in rows:
        if r.index != hits or not r.complete:
            break
        hits += 1
    return hits


def count_hits(metrics: Metrics, req: P.LookupRequest, result: LookupResult, *, num_hashes: int) -> None:
    # Summed per tier first: one labelled increment per tier, not per row (a 128-hit lookup spent a
    # third of its store time in prometheus_client's labels()).
    asked, per_tier = prefix_hit_tokens(num_hashes, result.chunk_tokens, req.max_tokens,
                                        ((r.num_tokens, r.tier) for r in result.prefix[: result.num_prefix_hits]))
    metrics.lookup_tokens.labels("prefix").inc(asked)
    for tier, n in per_tier.items():
        metrics.hit_tokens.labels("prefix", tier).inc(n)
    if req.chunk_hashes:
        # The denominator needs every asked chunk's length; the client sends it (chunk_num_tokens),
        # else only found chunks count and the chunk hit rate reads high.
        asked_chunks = sum(req.chunk_num_tokens) if req.chunk_num_tokens else sum(r.num_tokens for r in result.chunks)
        metrics.lookup_tokens.labels("chunk").inc(asked_chunks)
        per_tier = {}
        for r in result.chunks:
            if r.complete:
                per_tier[r.tier] = per_tier.get(r.tier, 0) + r.num_tokens
        for tier, n in per_tier.items():
            metrics.hit_tokens.labels("chunk", tier).inc(n)


def extent_infos(e: Entry, tiers: list[str], classes: list[str] | None = None,
                 accept_lossy: bool = True) -> list[P.ExtentInfo]:
    """Where ``e``'s extents (of ``classes``) lie, each in the first of the memory ``tiers`` (fastest
    first) that holds a copy the reader can use, with checksums and lossiness."""
    out = []
    for c, x in e.extents.items():
        if classes is not None and c not in classes:
            continue
        found = next(((t, cp) for t in tiers if (cp := x.copies.get(t)) is not None
                      and (accept_lossy or not cp.is_lossy)), None)
        if found is None:
            continue
        tier, copy = found
        out.append(P.ExtentInfo(head_class=c, offset=copy.loc.offset, nbytes=x.nbytes,
                                checksum=None if copy.checksum is None else f"{copy.checksum:016x}",
                                lossy=copy.is_lossy, tier=tier,
                                tokens=x.plan.span if x.plan.is_trimmed else None, layout=x.plan.layout))
    return out


def gpu_pool(levels: list[Level], partition: str, extents: list[P.ExtentInfo]) -> GpuPoolInfo | None:
    """The GPU pool of ``partition`` when some of ``extents`` lie in it: what the client maps them by."""
    if not any(x.tier == "gpu" for x in extents):
        return None
    tier = next((lv.tier for lv in levels if isinstance(lv.tier, GpuTier)), None)
    return tier.info(partition) if tier is not None else None
