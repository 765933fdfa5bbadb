"""The store's bookkeeping objects: registered models, entries and their extents, reservations, leases.

Lifecycle of an entry (owned by ``kvd.store.Store``):

1. ``reserve`` creates an ``Entry`` with host slot runs for each extent, held by a ``Reservation``;
   it is *pending*: invisible to lookups, its key is blocked for other writers.
2. ``commit`` checksums the extents and inserts the entry into the index, all at once per entry:
   a lookup sees the whole entry or nothing.
3. Reads take a ``Lease``; a leased entry's extents cannot be evicted, moved or dropped.
4. Demotion copies extents to SSD and frees host slots; eviction drops them; an entry with no extent
   left anywhere leaves the index.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kvd.core.extents import ExtentPlan, plan_extents
from kvd.core.headmap import HeadMap
from kvd.core.keys import ModelSpec
from kvd.policies.eviction import EntryMeta
from kvd.tiers.base import Location

EntryKey = tuple[str, str, str]  # (namespace, fingerprint, hash)


@dataclass(slots=True)
class ModelRecord:
    fingerprint: str
    spec: ModelSpec
    head_map: HeadMap
    registered_at: float
    _plans: dict[int, dict[str, ExtentPlan]] = field(default_factory=dict)  # num_tokens -> plans

    @property
    def num_global_heads(self) -> int:
        return self.head_map.num_global

    def plans(self, num_tokens: int) -> dict[str, ExtentPlan]:
        """Extent layout for an entry of ``num_tokens`` (cached: entries mostly share one length)."""
        p = self._plans.get(num_tokens)
        if p is None:
            if len(self._plans) > 1024:
                self._plans.clear()
            p = self._plans[num_tokens] = plan_extents(self.spec, self.head_map, num_tokens)
        return p


@dataclass(slots=True)
class Extent:
    """One head class's segments of one entry, and every place a copy of them lives."""

    plan: ExtentPlan
    checksum: int | None = None  # xxh3-64 of the raw bytes, set at commit
    host: Location | None = None  # slot run in the arena
    ssd: Location | None = None  # record in the SSD tier
    ssd_codec: str | None = None  # codec of the SSD copy; lossy codecs make it unloadable for exact readers
    dropped: bool = False  # deliberately not kept anywhere (placement "drop" of far local tokens)
    # Head-aware placement, decided at commit (kvd.policies.placement): keep in the arena or not,
    # and the codec of its SSD copy (None: never written to SSD).
    is_hot: bool = True
    ssd_target: str | None = "lossless"

    @property
    def head_class(self) -> str:
        return self.plan.head_class

    @property
    def nbytes(self) -> int:
        return self.plan.nbytes

    @property
    def is_lossless(self) -> bool:
        return self.host is not None or self.ssd_codec in (None, "raw", "lossless")

    def tiers(self) -> list[str]:
        return [t for t, loc in (("host", self.host), ("ssd", self.ssd)) if loc is not None]


@dataclass(slots=True)
class Entry:
    key: EntryKey
    kind: str  # "prefix" | "chunk"
    num_tokens: int
    start_token: int
    end_token: int
    extents: dict[str, Extent]  # head class -> extent
    created: float
    last_access: float
    pinned: bool = False
    leases: int = 0
    reuse_count: int = 0  # lookups and leases that found it
    seen: int = 1  # times stored or looked up (admission to SSD counts these)

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

    def fastest_tier(self) -> str | None:
        if any(x.host for x in self.extents.values()):
            return "host"
        if any(x.ssd for x in self.extents.values()):
            return "ssd"
        return None

    def available_classes(self, *, exact: bool = True) -> list[str]:
        """Head classes whose bytes can be served (``exact``: losslessly)."""
        return [
            c for c, x in self.extents.items()
            if (x.host is not None or x.ssd is not None) and (x.is_lossless or not exact)
        ]

    def is_complete(self) -> bool:
        return len(self.available_classes()) == len(self.extents)

    def policy_meta(self, tier: str, num_layers: int) -> EntryMeta:
        """What eviction policies see of this entry in ``tier``: sizes, position, head classes, never bytes."""
        exts = [x for x in self.extents.values() if (x.host if tier == "host" else x.ssd) is not None]
        nbytes = sum(x.nbytes if tier == "host" else x.ssd.nbytes for x in exts)
        glob = sum(x.nbytes for x in exts if x.head_class == "global")
        total = sum(x.nbytes for x in exts)
        return EntryMeta(nbytes=nbytes, num_tokens=self.num_tokens, num_layers=num_layers,
                         start_token=self.start_token, global_fraction=glob / total if total else 1.0,
                         pinned=self.pinned)

    def tiers(self) -> list[str]:
        out: list[str] = []
        for x in self.extents.values():
            for t in x.tiers():
                if t not in out:
                    out.append(t)
        return out


@dataclass(slots=True)
class Reservation:
    reservation_id: str
    owner_pid: int | None
    expires_at: float
    entries: dict[str, Entry]  # hash -> pending entry


@dataclass(slots=True)
class Lease:
    lease_id: str
    owner_pid: int | None
    expires_at: float
    keys: list[EntryKey]
    nbytes: int = 0
    # Extents pinned by this lease (head class filter applied): key -> classes
    classes: dict[EntryKey, list[str]] = field(default_factory=dict)
