"""The store's bookkeeping objects: registered models, entries, their extents and the copies of them.

Lifecycle of an entry (owned by ``kvd.store.store.Store``):

1. ``reserve`` creates an ``Entry`` with a slot run in the host arena for each extent, held by a
   ``Reservation``; it is *pending*: invisible to lookups, its key blocked for other writers.
2. ``commit`` checksums the extents and inserts the entry into the index, all at once: a lookup sees
   the whole entry or nothing.
3. Reads take a ``Lease``; an entry with ``holds > 0`` (readers, or the pipeline moving it) is never
   evicted, moved away or freed.
4. The pipeline gives extents copies in lower tiers (write-back, demotion) and back in the arena
   (promotion); eviction drops copies. An entry is usable only whole: when an extent loses its last
   copy (and was not let go on purpose by placement), the whole entry leaves the index.

Copies carry how their bytes were made: an arena copy decoded from an fp8 record is lossy, and stays
flagged lossy whatever tier it moves to; an exact reader is never given it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kvd.codecs import is_lossy
from kvd.core.extents import ExtentPlan, plan_extents
from kvd.core.headmap import HeadMap
from kvd.core.keys import ModelSpec, attention_tag
from kvd.policies.eviction import EntryMeta
from kvd.tiers.base import ExtentName, Location

EntryKey = tuple[str, str, str]  # (namespace, fingerprint, hash)


@dataclass(slots=True)
class ModelRecord:
    fingerprint: str
    spec: ModelSpec
    head_map: HeadMap
    registered_at: float
    tenants: set[str] = field(default_factory=set)  # tenants that registered it (this run; kvd.store.registry)
    last_used: float = 0.0  # clock of its last registration or request (kvd.store.registry.prune)
    _plans: dict[int, dict[str, ExtentPlan]] = field(default_factory=dict)  # num_tokens -> plans

    @property
    def num_global_heads(self) -> int:
        return self.head_map.num_global

    @property
    def attention(self) -> str:
        """The attention tag of the registered head map (what a head-aware reader must attend under)."""
        return attention_tag(self.head_map.sinks, self.head_map.windows)

    def plans(self, num_tokens: int) -> dict[str, ExtentPlan]:
        """Extent layout for an entry of ``num_tokens`` (cached: entries mostly share one length)."""
        p = self._plans.get(num_tokens)
        if p is None:
            if len(self._plans) > 1024:
                self._plans.clear()
            p = self._plans[num_tokens] = plan_extents(self.spec, self.head_map, num_tokens)
        return p


@dataclass(slots=True)
class Copy:
    """One copy of an extent's bytes in one tier."""

    loc: Location
    # How the bytes were made: "raw" (exactly the bytes committed, in a memory tier), "lossless"
    # (a record that decodes exactly), "fp8" / "int8" (lossy: decodes to approximations)
    codec: str
    checksum: int | None  # xxh3-64 of the bytes a reader of this copy gets (exact, or dequantized)
    # Known once (a copy's codec never changes): every lease asks it of every extent several times.
    is_lossy: bool = field(init=False)

    def __post_init__(self) -> None:
        self.is_lossy = is_lossy(self.codec)


class Copies(dict[str, Copy]):
    """An extent's copies (tier name -> ``Copy``): a dict that empties its entry's cache of lookup
    rows (``Entry.rows``) on every change. A 128-hit lookup answered each hit by walking every extent's
    copies (a third of its store time); it now reads the row cached on the entry, which cannot be
    staler than the copies because every way to change them, here and ``Extent.set_plan``, clears it."""

    __slots__ = ("rows",)

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.rows: dict = {}  # the entry's cache (a RowCache), bound by Entry.__post_init__

    def __setitem__(self, tier: str, copy: Copy) -> None:
        super().__setitem__(tier, copy)
        self.rows.clear()

    def __delitem__(self, tier: str) -> None:
        super().__delitem__(tier)
        self.rows.clear()

    def pop(self, *args):
        out = super().pop(*args)
        self.rows.clear()
        return out

    def popitem(self):
        out = super().popitem()
        self.rows.clear()
        return out

    def clear(self) -> None:
        super().clear()
        self.rows.clear()

    def update(self, *args, **kwargs) -> None:
        super().update(*args, **kwargs)
        self.rows.clear()

    def setdefault(self, tier: str, copy: Copy | None = None):
        out = super().setdefault(tier, copy)
        self.rows.clear()
        return out

    def __ior__(self, other):
        out = super().__ior__(other)
        self.rows.clear()
        return out


class RowCache(dict):
    """An entry's lookup rows (``Entry.rows``). Emptied after every change of a copy or a plan, and
    then tells ``on_change`` (the shared lookup index republishes the entry, ``kvd.store.published``)."""

    __slots__ = ("on_change",)

    def __init__(self) -> None:
        super().__init__()
        self.on_change = None

    def clear(self) -> None:
        super().clear()
        if self.on_change is not None:
            self.on_change()


@dataclass(slots=True)
class Extent:
    """One head class's segments of one entry, and every copy of them (tier name -> copy)."""

    plan: ExtentPlan
    checksum: int | None = None  # xxh3-64 of the exact bytes, set at commit
    copies: Copies = field(default_factory=Copies)
    # Head-aware placement, decided at commit (kvd.policies.placement): stays in the arena once it has
    # a copy below, and the codec of its copies in record tiers (None: never kept below the arena).
    is_hot: bool = True
    lower_codec: str | None = "lossless"
    dropped: bool = False  # let go on purpose (placement "drop" of far local tokens): not a loss

    @property
    def head_class(self) -> str:
        return self.plan.head_class

    @property
    def nbytes(self) -> int:
        return self.plan.nbytes

    def set_plan(self, plan: ExtentPlan) -> None:
        """Keep ``plan``'s part of the tokens from now on (trimmed at commit, or as a record says)."""
        self.plan = plan
        self.copies.rows.clear()

    def usable(self, accept_lossy: bool = False) -> bool:
        """A reader can get these bytes from some tier (``accept_lossy``: lossy copies count)."""
        return any(accept_lossy or not c.is_lossy for c in self.copies.values())


@dataclass(slots=True)
class Entry:
    key: EntryKey
    kind: str  # "prefix" | "chunk"
    num_tokens: int
    start_token: int
    end_token: int
    computed_under: str  # "exact" or a head map's attention tag (kvd.core.keys.attention_tag)
    extents: dict[str, Extent]  # head class -> extent
    created: float
    last_access: float
    pinned: bool = False
    holds: int = 0  # leases and pipeline moves in flight: while > 0 nothing is freed or evicted
    waiting: int = 0  # of the holds, leases still being answered (their promotions run): none reads bytes yet
    reuse_count: int = 0  # leases that used it
    seen: int = 1  # times stored or looked up (admission to the next tier counts these)
    aliases: list[str] = field(default_factory=list)  # alias hashes that point to this entry
    # Lookup rows per reader kind (and "trimmed"), filled by lookups and emptied by any change of a copy
    # or a plan (``Copies``): what a lookup tells a reader of this entry without walking its extents.
    rows: RowCache = field(default_factory=RowCache, repr=False, compare=False)

    def __post_init__(self) -> None:
        for x in self.extents.values():
            if not isinstance(x.copies, Copies):
                x.copies = Copies(x.copies)
            x.copies.rows = self.rows

    @property
    def namespace(self) -> str:
        return self.key[0]

    @property
    def fingerprint(self) -> str:
        return self.key[1]

    @property
    def hash(self) -> str:
        return self.key[2]

    @property
    def nbytes(self) -> int:
        return sum(x.nbytes for x in self.extents.values())

    @property
    def is_trimmed(self) -> bool:
        """Some extent keeps only part of the entry's tokens (capacity mode): no exact reader reads it.
        Asked per entry of every lookup: kept in ``rows`` (emptied when a plan changes)."""
        out = self.rows.get("trimmed")
        if out is None:
            out = self.rows["trimmed"] = any(x.plan.is_trimmed for x in self.extents.values())
        return out

    @property
    def kept_nbytes(self) -> int:
        """KV bytes the entry keeps: its extents less those let go on purpose (capacity mode)."""
        return sum(x.nbytes for x in self.extents.values() if not x.dropped)

    def name(self, head_class: str) -> ExtentName:
        """The name record tiers key this entry's ``head_class`` extent by."""
        return ExtentName(self.namespace, self.fingerprint, self.hash, head_class, self.kind, self.start_token,
                          self.end_token, self.num_tokens, self.computed_under)

    def in_tier(self, tier: str) -> bool:
        return any(tier in x.copies for x in self.extents.values())

    def tiers(self) -> list[str]:
        out: list[str] = []
        for x in self.extents.values():
            for t in x.copies:
                if t not in out:
                    out.append(t)
        return out

    def is_whole(self) -> bool:
        """Every extent still has a copy somewhere, or was let go on purpose."""
        return all(x.copies or x.dropped for x in self.extents.values())

    def policy_meta(self, tier: str, num_layers: int) -> EntryMeta:
        """What eviction policies see of this entry in ``tier``: sizes, position, head classes, never bytes."""
        exts = [x for x in self.extents.values() if tier in x.copies]
        nbytes = sum(x.copies[tier].loc.nbytes for x in exts)
        glob = sum(x.nbytes for x in exts if x.head_class == "global")
        total = sum(x.nbytes for x in exts)
        return EntryMeta(nbytes=nbytes, num_tokens=self.num_tokens, num_layers=num_layers,
                         start_token=self.start_token, end_token=self.end_token if self.kind == "prefix" else 0,
                         global_fraction=glob / total if total else 1.0,
                         pinned=self.pinned)


@dataclass(slots=True)
class Reservation:
    reservation_id: str
    owner_pid: int | None
    expires_at: float
    entries: dict[str, Entry]  # hash -> pending entry
    aliases: dict[str, list[tuple[str, int]]] = field(default_factory=dict)  # hash -> [(alias hash, tokens)]
    ttl_s: float = 0.0  # the TTL its client was told (expires_in_s): it renews on that cadence


def new_entry(model: ModelRecord, key: EntryKey, *, kind: str, num_tokens: int, start_token: int, end_token: int,
              computed_under: str, now: float) -> Entry:
    """A pending entry with its extents laid out (``kvd.core.extents``) and no copies yet."""
    return Entry(key=key, kind=kind, num_tokens=num_tokens, start_token=start_token, end_token=end_token,
                 computed_under=computed_under, extents={c: Extent(plan=p) for c, p in model.plans(num_tokens).items()},
                 created=now, last_access=now)


@dataclass(slots=True)
class Lease:
    lease_id: str
    owner_pid: int | None
    expires_at: float
    entries: list[Entry]  # each held once by this lease
    nbytes: dict[str, int] = field(default_factory=dict)  # tier -> bytes the reader copies from it
    ttl_s: float = 0.0  # the TTL its client was told (expires_in_s): it renews on that cadence
