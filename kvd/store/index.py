"""The index: which entries exist, where each extent's copies live, and what the tiers' policies see.

One ``Index`` per daemon. It owns the ordered list of ``Level``s (a tier and its eviction policy, top
first: the GPU pool when enabled, the host arena, then ssd and remote): the *memory* levels come first
(clients map them), the *record* levels after (``memory``, ``landing``, ``records``). It keeps every
policy in step with the copies: whenever an entry gains or loses a copy in a tier, that tier's policy
is told (``on_insert`` with the entry's new size there, or ``on_remove``). Nothing else calls the
policies' bookkeeping methods.

Maps kept here:
- ``entries``: key -> committed entry (the only entries lookups and leases see);
- ``pending``: key -> id of the reservation writing it (blocks other writers);
- ``doomed``: deleted entries still held by a reader, freed on their last release (by ``id``: the key
  may be stored, leased and deleted again meanwhile, and each such entry is freed at its own release);
- ``aliases``: alias key -> (entry key, tokens): another name for an entry's leading tokens.

Invariants: a key is in at most one of ``entries`` and ``pending``; an alias points to an
entry in ``entries`` (it goes when the entry goes); an entry in ``entries`` is whole
(``Entry.is_whole``). This module never frees bytes: the pipeline does, since record tiers free off
the event loop.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

from kvd.core.config import Settings
from kvd.policies.eviction import EvictionPolicy, make_eviction
from kvd.store.entries import Copy, Entry, EntryKey, Extent
from kvd.tiers.base import Tier


@dataclass(slots=True)
class Level:
    """One tier in the store's order (0 = top), the policy that picks its victims, and when extents
    are written into it: ``write_policy(head_class, hot)`` is ``write_through`` (at commit),
    ``write_back`` (when they leave the tiers above) or ``off``; None: ``write_back`` for all.
    ``hot``: the extent's placement keeps it hot (``Extent.is_hot``)."""

    level: int
    tier: Tier
    policy: EvictionPolicy
    write_policy: Callable[[str, bool], str] | None = None
    quota: Callable[[str], int | None] | None = None  # partition (tenant) -> bytes it may hold here
    exact_codec: str | None = None  # the codec of exact extents encoded for this tier (None: the placement's)

    @property
    def name(self) -> str:
        return self.tier.name

    def accepts(self, head_class: str, hot: bool = False) -> bool:
        return self.write_policy is None or self.write_policy(head_class, hot) != "off"

    def writes_through(self, head_class: str, hot: bool = False) -> bool:
        return self.write_policy is not None and self.write_policy(head_class, hot) == "write_through"

    @classmethod
    def of(cls, level: int, tier: Tier, settings: Settings, policy: EvictionPolicy | None = None) -> Level:
        """The level of ``tier`` at ``level``: its eviction policy from ``settings`` (unless given), and
        for a shared tier the remote write policy and codec of exact extents."""
        return cls(level, tier, policy if policy is not None else
                   make_eviction(settings.policy, capacity_bytes=tier.capacity_bytes),
                   settings.remote.write_policy.for_class if tier.shared else None,
                   exact_codec=settings.remote.exact_codec if tier.shared else None)


class Index:
    def __init__(self, levels: list[Level], *, num_layers: Callable[[str], int], clock: Callable[[], float],
                 partition_of: Callable[[str], str] = lambda namespace: "") -> None:
        self.levels = levels
        self.partition_of = partition_of  # namespace -> tenant
        self._usage: dict[tuple[str, str], int] = {}  # (tier, partition) -> bytes of indexed copies
        self._num_layers = num_layers  # fingerprint -> the model's layer count (policies' cost model)
        self.clock = clock
        self.entries: dict[EntryKey, Entry] = {}
        self.pending: dict[EntryKey, str] = {}
        self.doomed: dict[int, Entry] = {}  # id(entry) -> entry
        self.aliases: dict[EntryKey, tuple[EntryKey, int]] = {}
        self._per_model: dict[str, int] = {}  # fingerprint -> its entries in ``entries``
        self.published = None  # the shared lookup index (kvd.store.published.Publisher), once the store opens it
        self._levels_changed()

    # ---- levels --------------------------------------------------------------------------------

    def add_level(self, lv: Level) -> None:
        """A tier joins at the bottom while serving (``Store.add_tier``)."""
        assert lv.level == len(self.levels), "a level joins at the bottom"
        self.levels.append(lv)  # in place: the pipeline holds the same list
        self._levels_changed()

    def _levels_changed(self) -> None:
        # The lookup path asks for these per entry: kept, not rebuilt per call (measured: rebuilding
        # them was a tenth of a 128-hit lookup's time in the daemon).
        self.by_name = {lv.name: lv for lv in self.levels}
        #: The levels clients map (raw extents, top of the order: the GPU pool if any, then the arena).
        self.memory: list[Level] = [lv for lv in self.levels if not lv.tier.holds_records]
        self.memory_names: frozenset[str] = frozenset(lv.name for lv in self.memory)
        #: The record levels (SSD, remote): below the memory levels, where the codecs apply.
        self.records: list[Level] = [lv for lv in self.levels if lv.tier.holds_records]
        if self.published is not None:
            self.published.levels_changed()

    @property
    def landing(self) -> Level:
        """The host arena's level, the last memory level: where promotions from record tiers land, and
        the one every client maps (a reader without the GPU pool reads only here)."""
        return self.memory[-1]

    # ---- entries -------------------------------------------------------------------------------

    def get(self, key: EntryKey) -> Entry | None:
        return self.entries.get(key)

    def named(self, namespace: str, fingerprints: list[str], hashes: list[str]) -> list[Entry]:
        """The entries ``hashes`` name under any of ``fingerprints``, each once (an entry named twice is
        acted on, and counted, once)."""
        found = (e for h in hashes for fp in fingerprints if (e := self.entries.get((namespace, fp, h))) is not None)
        return list({id(e): e for e in found}.values())

    def resolve(self, key: EntryKey) -> tuple[Entry, int] | None:
        """The entry a key names and the tokens the key covers (all of them, or an alias's leading ones)."""
        e = self.entries.get(key)
        if e is not None:
            return e, e.num_tokens
        alias = self.aliases.get(key)
        if alias is None:
            return None
        e = self.entries.get(alias[0])
        return (e, alias[1]) if e is not None else None

    def insert(self, e: Entry) -> None:
        """Make a committed (or recovered) entry visible, with the copies it has."""
        assert e.key not in self.entries, f"entry {e.key} inserted twice"
        self.entries[e.key] = e
        self._per_model[e.fingerprint] = self._per_model.get(e.fingerprint, 0) + 1
        self.aliases.pop(e.key, None)  # the real entry serves its own key from now on
        for x in e.extents.values():
            for tier, c in x.copies.items():
                self._account(tier, e, c.loc.nbytes)
        for lv in self.levels:
            self._sync_policy(e, lv)
        if self.published is not None:
            self.published.watch(e)

    def add_alias(self, e: Entry, alias_hash: str, num_tokens: int) -> bool:
        """``alias_hash`` names ``e``'s first ``num_tokens`` tokens; False if the key is taken."""
        key = (e.namespace, e.fingerprint, alias_hash)
        if not 0 < num_tokens < e.num_tokens or key in self.entries or key in self.pending or key in self.aliases:
            return False
        self.aliases[key] = (e.key, num_tokens)
        e.aliases.append(alias_hash)
        if self.published is not None:
            self.published.alias(e, alias_hash)
        return True

    def forget(self, e: Entry) -> None:
        """The entry leaves the index (its bytes are the caller's to free) with its aliases."""
        if self.entries.get(e.key) is not e:
            return
        if self.published is not None:
            self.published.unwatch(e)
        del self.entries[e.key]
        if (n := self._per_model.pop(e.fingerprint) - 1) > 0:
            self._per_model[e.fingerprint] = n
        for x in e.extents.values():
            for tier, c in x.copies.items():
                self._account(tier, e, -c.loc.nbytes)
        for h in e.aliases:
            self.aliases.pop((e.namespace, e.fingerprint, h), None)
        e.aliases.clear()
        for lv in self.levels:
            lv.policy.on_remove(e.key)

    def __iter__(self) -> Iterator[Entry]:
        return iter(list(self.entries.values()))

    def __len__(self) -> int:
        return len(self.entries)

    def in_use(self, fingerprint: str) -> bool:
        """Entries of the model exist: indexed, being stored, or deleted and still read (a model is not
        forgotten, nor its head map changed, while any does)."""
        return fingerprint in self._per_model or any(k[1] == fingerprint for k in self.pending) \
            or any(e.fingerprint == fingerprint for e in self.doomed.values())

    # ---- copies --------------------------------------------------------------------------------

    def place(self, e: Entry, x: Extent, lv: Level, copy: Copy) -> None:
        """``x`` of ``e`` now has ``copy`` in ``lv``'s tier."""
        assert lv.name not in x.copies, f"{e.key} {x.head_class} already has a copy in {lv.name}"
        x.copies[lv.name] = copy
        if self.entries.get(e.key) is e:
            self._account(lv.name, e, copy.loc.nbytes)
            self._sync_policy(e, lv)

    def unplace(self, e: Entry, x: Extent, lv: Level) -> Copy | None:
        """Take ``x``'s copy in ``lv`` out of the books; returns it (its bytes are the caller's to free)."""
        copy = x.copies.pop(lv.name, None)
        if copy is not None and self.entries.get(e.key) is e:
            self._account(lv.name, e, -copy.loc.nbytes)
            self._sync_policy(e, lv)
        return copy

    def usage(self, tier: str, partition: str) -> int:
        """Bytes the indexed copies of ``partition``'s entries take in ``tier`` (for quotas)."""
        return self._usage.get((tier, partition), 0)

    def _account(self, tier: str, e: Entry, delta: int) -> None:
        k = (tier, self.partition_of(e.namespace))
        self._usage[k] = self._usage.get(k, 0) + delta

    def touch_all(self, entries: list[Entry], now: float) -> None:
        """``touch`` a request's entries, tail first (``tail_first``)."""
        for e in tail_first(entries):
            self.touch(e, now)

    def touch(self, e: Entry, now: float) -> None:
        """A reader used the entry: every tier holding it learns of the hit."""
        e.last_access = now
        for lv in self.levels:
            if e.in_tier(lv.name):
                lv.policy.on_access(e.key, now)

    def refresh(self, e: Entry) -> None:
        """The entry's metadata changed (pinned): the policies see it anew."""
        for lv in self.levels:
            self._sync_policy(e, lv)

    def meta(self, e: Entry, lv: Level):
        return e.policy_meta(lv.name, self._num_layers(e.fingerprint))

    def _sync_policy(self, e: Entry, lv: Level) -> None:
        if e.in_tier(lv.name):
            lv.policy.on_insert(e.key, self.meta(e, lv), self.clock())
        else:
            lv.policy.on_remove(e.key)


def tail_first(entries):
    """A batch of entries in the order the policies must meet them: later positions first. A prefix
    entry is reachable only while every entry before it in its sequence is there, so a sequence must
    lose its tail before its head; met head first (as requests list them), the head was the least
    recent of its sequence under LRU and ARC, evicted first, and the rest of the sequence unreachable."""
    return sorted(entries, key=lambda e: -e.start_token)
